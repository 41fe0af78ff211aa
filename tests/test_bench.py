"""The benchmark harness and the backbone backends: runs end to end, valid JSON; no timed assertions."""

import importlib.util
import json
from pathlib import Path

import pytest
import redis
import torch

from dfm_stream import backends
from dfm_stream.bench.env import percentile, summarize
from dfm_stream.bench.harness import STAGES, BenchSettings
from dfm_stream.bench.model_stages import score_feature_map
from dfm_stream.bench.stream_stages import batch_rates, throughput_from_scores
from dfm_stream.cli import build_parser, main
from dfm_stream.commands.bench import settings_from_args
from dfm_stream.errors import BackendError, ConfigError
from dfm_stream.model.dfm import DFMModel


def test_quick_bench_runs_every_stage_and_writes_json_with_ratios(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    code = main(
        ["bench", "--quick", "--stages", ",".join(STAGES), "--duration", "0.3", "--redis", redis_url,
         "--backends", "eager,channels_last,onnxruntime",
         "--workdir", str(tmp_path / "work"), "--out", str(out), "--markdown", str(md)]
    )  # fmt: skip
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "dfm-stream-bench/1"
    results = doc["results"]
    for stage in ("backbone", "dfm", "pipeline", "transport", "latency50_p99_ms", "latency80_p99_ms"):
        assert results[stage]["n"] == 1, stage
        assert results[stage]["median"] > 0, stage
    assert results["pipeline"]["details"][0]["not_scored"] == 0
    isolation = results["isolation_probe_errors"]["details"][0]
    assert results["isolation_probe_errors"]["median"] == 0, isolation["hostile"]["probe_error_examples"]
    assert isolation["hostile"]["hostile_entries"] > 0 and isolation["hostile"]["probes"] > 0
    assert isolation["clean"]["frames"] > 0 and isolation["hostile"]["frames"] > 0
    consoles = results["consoles_throughput_ratio"]["details"][0]
    alone, shared = consoles["alone"], consoles["with_consoles"]
    assert consoles["cameras"] == 8 and consoles["consoles"] == 3
    assert alone["sent"] == shared["sent"] == 8 * 10 * 0.3  # 8 cameras x 10 fps for --duration
    assert alone["sse_messages"] == alone["frames_fetched"] == alone["consoles_cpu_cores"] == 0
    assert shared["sse_messages"] >= 3, "every console's page received its first snapshot"
    assert shared["frames_fetched"] >= 3 * 8, "every tile of every console showed a frame"
    assert shared["consoles_cpu_cores"] >= 0 and consoles["throughput_ratio"] is not None
    assert all(v is None or v >= 0 for v in results["pipeline"]["foreign_cpu_cores"])
    assert len(results["backbone"]["foreign_cpu_cores"]) == 1
    assert results["transport"]["details"][0]["frames"] == 200
    for level in (results["latency50_p99_ms"], results["latency80_p99_ms"]):
        d = level["details"][0]
        assert d["frames"] > 0
        assert 0 < d["p50_ms"] <= d["p95_ms"] <= d["p99_ms"] <= d["max_ms"]
        assert d["inspect_jobs"] + d["inspect_errors"] > 0, "part jobs ran beside the paced frames"
        assert d["inspect_jobs"] == 0 or d["inspect_p50_ms"] <= d["inspect_p99_ms"]
    for ratio in ("pipeline_over_backbone", "transport_over_pipeline", "dfm_over_backbone"):
        assert doc["ratios"][ratio]["n"] == 1 and doc["ratios"][ratio]["median"] > 0, ratio
    assert doc["ratios"]["pipeline_over_backbone_median_batch"]["n"] == 1
    assert results["backbone"]["details"][0]["best_rate"] >= results["backbone"]["details"][0]["median_rate"]
    ratio = doc["ratios"]["pipeline_over_backbone"]["median"]
    assert ratio == pytest.approx(results["pipeline"]["median"] / results["backbone"]["median"])
    swap = results["swap_p99_s"]["details"][0]
    assert [s["action"] for s in swap["samples"]] == ["push", "rollback", "assign", "assign"]
    assert all(s["seconds"] > 0 for s in swap["samples"]) and swap["other_backbone_s"] > 0
    assert doc["targets"]["model_switch_p99_s"]["target"] == 1.0
    fit = results["fit_seconds"]["details"][0]
    assert fit["images"] == 16 and fit["peak_rss_bytes"] >= fit["rss_after_model_bytes"] > 0
    assert doc["targets"]["fit_memory_beyond_model"]["met"] in (True, False)
    assert set(doc["targets"]) >= {"pipeline_efficiency", "transport_fps", "latency_p99_at_80"}
    assert doc["settings"]["backbone"] == "resnet18" and doc["settings"]["batch_size"] == 4
    assert doc["versions"]["torch"] and doc["versions"]["redis-server"] and doc["versions"]["python"]
    assert doc["machine"]["logical_cores"] >= 1 and doc["machine"]["cpu_model"]
    assert doc["backends"]["eager"]["passes"] and doc["backends"]["channels_last"]["passes"]
    assert results["backend:channels_last"]["median"] > 0
    installed = importlib.util.find_spec("onnxruntime") is not None
    assert doc["backends"]["onnxruntime"]["available"] is installed
    # the in-process stages and the worker process ran the same backend and precision
    assert doc["settings"]["worker_backend"] == backends.auto_candidates("cpu")[0]
    assert doc["settings"]["precision"] == "fp32"
    worker_logs = "".join(p.read_text() for p in (tmp_path / "work").rglob("*.log"))
    assert f"fp32, {doc['settings']['worker_backend']} backend" in worker_logs
    assert "| full pipeline (Redis -> worker -> scores) |" in md.read_text()
    assert not redis.Redis.from_url(redis_url).keys("dfm-bench-*"), "the bench left keys in Redis"


def test_unknown_stage_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--stages", "backbone,warp"]) == 2
    assert "warp" in capsys.readouterr().err


def test_reduced_precision_on_the_cpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--device", "cpu", "--precision", "fp16", "--stages", "dfm"]) == 2
    assert "--precision fp16 needs a CUDA device" in capsys.readouterr().err


def test_explicit_options_win_over_quick() -> None:
    args = build_parser().parse_args(["bench", "--quick", "--batch-size", "2", "--stages", "dfm"])
    settings = settings_from_args(args)
    assert (settings.batch_size, settings.stages, settings.backbone) == (2, ("dfm",), "resnet18")
    assert settings_from_args(build_parser().parse_args(["bench"])).backbone == "resnet50"


def test_settings_reject_loads_outside_capacity_range() -> None:
    with pytest.raises(ConfigError, match="loads"):
        BenchSettings(loads=(0.5, 2.0)).check()


def test_throughput_counts_scores_published_after_the_warmup_batches() -> None:
    # batches of 4 published every 100 ms: 10 batches -> after the first two, 32 frames in 0.8 s
    ts = [b * 100_000_000 for b in range(10) for _ in range(4)]
    assert throughput_from_scores(ts, skip=8) == pytest.approx(32 / 0.8)


def test_batch_rates_use_intervals_between_full_batches() -> None:
    # batches of 4 every 100 ms, one slow batch (300 ms): median 100 ms, fastest 100 ms
    ends = [0, 100, 200, 500, 600, 700]
    ts = [e * 1_000_000 - j for e in ends for j in range(4)]
    rates = batch_rates(ts, batch_size=4, skip=0)
    assert rates["median_rate"] == pytest.approx(40.0)
    assert rates["best_rate"] == pytest.approx(40.0)
    assert batch_rates(ts[:4], batch_size=4, skip=0)["median_rate"] is None


def test_summary_and_percentiles() -> None:
    s = summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert s["q1"] == 1.5 and s["q3"] == 2.5
    assert percentile(list(range(101)), 99) == 99
    assert percentile([], 50) is None


@pytest.fixture(scope="module")
def small_model() -> tuple[DFMModel, torch.Tensor]:
    torch.manual_seed(0)
    model = DFMModel("resnet18", "layer2", pre_trained=False, n_comps=0.97).eval()
    train = torch.randn(12, 3, 64, 64)
    model.fit(model.get_features(train)[0])
    return model, torch.randn(3, 3, 64, 64) * 1.5


@pytest.mark.parametrize("backend", ["channels_last", "fused", "mkldnn", "onnxruntime", "openvino"])
def test_backend_scores_match_fp32_eager(backend: str, small_model: tuple[DFMModel, torch.Tensor]) -> None:
    if not backends.is_available(backend):
        pytest.skip(f"{backend} is not installed (optional extra)")
    model, batch = small_model
    reference = score_feature_map(model, model.feature_extractor(batch))
    runner = backends.build_backbone_runner(model.feature_extractor, backend, batch)
    scores = score_feature_map(model, runner(batch[:2]))  # another batch size than the example
    assert backends.max_relative_difference(reference[:2], scores) <= backends.SCORE_RTOL
    assert next(model.feature_extractor.parameters()).is_contiguous(), "the model's weights were changed"


def test_unknown_or_misplaced_backend_is_refused() -> None:
    with pytest.raises(BackendError, match="unknown backend"):
        backends.resolve_backend("tensorrt")
    with pytest.raises(BackendError, match="CPU only"):
        backends.resolve_backend("onnxruntime", "cuda")
    assert backends.resolve_backend("auto") == backends.auto_candidates("cpu")[0]
    assert backends.auto_candidates("cpu")[-1] == "channels_last"
    assert {"eager", "channels_last"} <= set(backends.available_backends("cpu"))


def test_auto_backend_builds_the_first_candidate_and_matches_eager(
    small_model: tuple[DFMModel, torch.Tensor],
) -> None:
    model, batch = small_model
    runner = backends.build_backbone_runner(model.feature_extractor, "auto", batch)
    assert runner.backend == backends.auto_candidates("cpu")[0]
    reference = score_feature_map(model, model.feature_extractor(batch))
    scores = score_feature_map(model, runner(batch))
    assert backends.max_relative_difference(reference, scores) <= backends.SCORE_RTOL
