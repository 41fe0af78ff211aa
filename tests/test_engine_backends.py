"""The worker's model step on every backbone backend: same scores as fp32 eager, one runner per backbone."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from support import wait_until
from worker_helpers import pending, push_frames, scores

from dfm_stream import backends, config, inference
from dfm_stream.cpus import model_threads
from dfm_stream.errors import BackendError
from dfm_stream.model.dfm import DFMModel

SIZE = (64, 64)


@pytest.fixture(scope="module")
def fitted() -> tuple[DFMModel, torch.Tensor]:
    torch.manual_seed(0)
    model = DFMModel("resnet18", "layer2", pre_trained=False, n_comps=0.97, pooling_kernel_size=2).eval()
    model.fit(model.get_features(torch.randn(12, 3, *SIZE))[0])
    return model, torch.randn(5, 3, *SIZE) * 1.5


def eager_scores(model: DFMModel, batch: torch.Tensor) -> inference.BatchScores:
    engine = inference.Engine("cpu", "fp32", "eager")
    return engine.score(engine.prepare(copy.deepcopy(model), SIZE), batch)


@pytest.mark.parametrize("backend", ["auto", "channels_last", "fused", "mkldnn", "onnxruntime", "openvino"])
def test_engine_scores_and_maps_match_fp32_eager(backend: str, fitted: tuple[DFMModel, torch.Tensor]) -> None:
    if backend != "auto" and not backends.is_available(backend):
        pytest.skip(f"{backend} is not installed (optional extra)")
    model, batch = fitted
    reference = eager_scores(model, batch)
    engine = inference.Engine("cpu", "fp32", backend, batch_size=4)
    prepared = engine.prepare(copy.deepcopy(model), SIZE)
    got = engine.score(prepared, batch)  # 5 frames: more than the batch size the runner was built for
    assert engine.backend == (backends.auto_candidates("cpu")[0] if backend == "auto" else backend)
    rel = np.abs(got.scores - reference.scores) / np.abs(reference.scores)
    assert rel.max() <= backends.SCORE_RTOL, f"{backend}: scores differ by {rel.max():.2e} relative"
    assert got.maps is not None and reference.maps is not None
    np.testing.assert_allclose(got.maps, reference.maps, rtol=1e-3, atol=1e-3 * np.abs(reference.maps).max())


def test_the_runner_is_built_once_per_backbone_and_image_size(fitted: tuple[DFMModel, torch.Tensor]) -> None:
    model, _ = fitted
    engine = inference.Engine("cpu", "fp32", "fused", batch_size=2)
    prepared = engine.prepare(copy.deepcopy(model), SIZE)
    first = engine.runner(prepared.feature_extractor, SIZE)
    assert engine.runner(prepared.feature_extractor, SIZE) is first
    assert engine.runner(prepared.feature_extractor, (32, 32)) is not first
    # a copy of the backbone (another model with the same weights) does not inherit the runners
    other = copy.deepcopy(prepared.feature_extractor)
    assert engine.runner(other, SIZE) is not first
    # a model prepared without its image size gets its runner on the first batch
    lazy = engine.prepare(copy.deepcopy(model))
    assert len(engine.score(lazy, torch.randn(3, 3, *SIZE)).scores) == 3
    assert engine.runner(lazy.feature_extractor, SIZE).backend == "fused"


def test_the_cli_and_config_know_every_backend_and_precision() -> None:
    assert ("auto", *backends.BACKENDS) == config.WORKER_BACKENDS
    assert config.WORKER_PRECISIONS == inference.PRECISIONS


def test_a_backend_that_is_not_installed_is_a_clear_error() -> None:
    missing = next((b for b in ("openvino", "onnxruntime") if not backends.is_available(b)), None)
    if missing is None:
        pytest.skip("every optional runtime is installed here")
    with pytest.raises(BackendError, match=r"pip install 'dfm-stream\["):
        inference.Engine("cpu", "fp32", missing)


def test_work_refuses_a_missing_backend_before_touching_redis(artifact, tmp_path) -> None:
    missing = next((b for b in ("openvino", "onnxruntime") if not backends.is_available(b)), None)
    if missing is None:
        pytest.skip("every optional runtime is installed here")
    cmd = [sys.executable, "-m", "dfm_stream.cli", "work", "--model", str(artifact.path)]
    cmd += ["--redis", "redis://127.0.0.1:1", "--backend", missing, "--metrics-port", "-1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert f"backend {missing} is not installed" in done.stderr
    assert "Traceback" not in done.stderr


def test_worker_processes_on_two_backends_publish_the_same_scores(redis_client, redis_url, artifact, procs):
    frames = artifact.good[:4] + artifact.defect[:3]
    runs = {"eager": "cam-eager", "fused": "cam-fused"}
    for camera in runs.values():
        push_frames(redis_client, camera, frames)
    threads = {"eager": [], "fused": ["--threads", "1"]}  # and the thread count changes nothing either
    for backend, camera in runs.items():
        worker = procs.dfm(
            *("work", "--redis", redis_url, "--model", str(artifact.path), "--cameras", camera),
            *("--device", "cpu", "--backend", backend, "--batch-size", "4", "--metrics-port", "-1"),
            *threads[backend],
            name=f"worker-{backend}",
        )
        wait_until(lambda c=camera: len(scores(redis_client, c)) == len(frames), 120, what=backend)
        assert procs.stop(worker) == 0
        assert pending(redis_client, camera) == 0
        want = 1 if threads[backend] else model_threads(torch.get_num_threads())
        assert f"(fp32, {backend} backend, {want} threads)" in procs.log(worker)
    by_seq = {b: {s.seq: s for s in scores(redis_client, c)} for b, c in runs.items()}
    assert sorted(by_seq["eager"]) == list(range(len(frames)))
    for seq, ref in by_seq["eager"].items():
        got = by_seq["fused"][seq]
        assert abs(got.score - ref.score) <= backends.SCORE_RTOL * abs(ref.score), (seq, got.score, ref.score)
        assert got.anomalous == ref.anomalous
    assert sum(s.anomalous for s in by_seq["fused"].values()) == 3  # the defects, and only them


def test_auto_is_onnx_runtime_on_the_cpu_of_a_plain_install() -> None:
    # ONNX Runtime is a dependency (the fastest CPU backend measured), so a worker started with
    # the defaults runs it; the torch flavours are only the fall-backs.
    assert backends.auto_candidates("cpu")[0] == "onnxruntime"
    assert inference.Engine("cpu").backend == "onnxruntime"
