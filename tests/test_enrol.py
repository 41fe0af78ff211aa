"""``dfm-stream enrol`` against a real Redis: real frames in the wire format, scores from a real worker.

A camera's frames (good synthetic parts and a few defective ones) are scored by an in-process
burst worker; then ``enrol`` collects, fits, calibrates, compares and pushes a candidate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from worker_helpers import Artifact, push_frames, run_worker, scores

from dfm_stream import keys
from dfm_stream.artifact import load_artifact
from dfm_stream.cli import main
from dfm_stream.console.store import keep_candidate
from dfm_stream.drift import reference_of
from dfm_stream.registry import ModelRef, ModelRegistry
from dfm_stream.synthetic_parts import render_part
from dfm_stream.wire import EventMsg

CAM = "cam1"


def _good(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [render_part(rng, 64)[0] for _ in range(n)]


@pytest.fixture
def line(redis_url: str, redis_client: redis.Redis, artifact: Artifact) -> ModelRegistry:
    """Model ``parts`` v1 assigned to cam1; 40 good frames and the defective ones, all scored by a worker."""
    registry = ModelRegistry(redis_client)
    registry.push("parts", artifact.path.read_bytes())
    registry.assign(CAM, ModelRef("parts"))
    push_frames(redis_client, CAM, [*_good(40, 11), *artifact.defect])
    run_worker(redis_url, artifact.path, cameras=[CAM])
    return registry


SMALL = ("--image-size", "32")
"""Fit at 32 px (512 features instead of 2,048): the D x D eigen-decomposition stays cheap on a busy CI."""


def _enrol(redis_url: str, out: Path, *extra: str) -> int:
    return main(
        ["enrol", "--redis", redis_url, "--camera", CAM, "--model", "parts", "--out", str(out), *extra]
    )


def test_enrol_pushes_an_unassigned_candidate_fitted_on_frames_not_in_alarm(
    line: ModelRegistry,
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    anomalous = {s.frame_id for s in scores(redis_client, CAM) if s.anomalous}
    assert anomalous, "the defective frames should have been flagged"
    code = _enrol(
        redis_url,
        tmp_path / "set",
        "--frames",
        "30",
        "--holdout",
        "0.4",
        "--max-fpr",
        "0.1",
        "--fit",
        "moments",
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "(moments, k=" in out
    assert "candidate parts@2 pushed" in out and "model shadow --camera cam1 --model parts@2" in out
    assert "asked 30, found 30" in out and "peak memory" in out
    assert line.current("parts") == 1
    assert line.resolve(CAM) == ModelRef("parts", 1)
    info = line.version_info("parts", 2)
    assert info.status == "candidate"
    assert info.enrolment is not None
    assert info.enrolment["camera"] == CAM and info.enrolment["found"] == 30
    assert info.enrolment["sources"]["stream"]["left_out"].get("anomalous", 0) >= 1
    assert set(info.enrolment["evaluation"]) == {"current", "candidate"}
    assert info.threshold is not None
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    kept = {f["frame_id"] for f in manifest["frames"]}
    assert len(kept) == 30 and not kept & anomalous
    assert sum(f["split"] == "holdout" for f in manifest["frames"]) == 12
    assert all((tmp_path / "set" / f["file"]).is_file() for f in manifest["frames"])
    assert manifest["candidate"] == "parts@2"
    assert main(["model", "list", "--redis", redis_url, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["candidates"] == [2] and row["current"] == 1


def test_enrol_reads_without_the_consumer_group(
    line: ModelRegistry, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    before = redis_client.xinfo_groups(keys.frames_key(CAM))
    assert _enrol(redis_url, tmp_path / "set", "--frames", "20", "--max-fpr", "0.2", *SMALL) == 0
    assert redis_client.xinfo_groups(keys.frames_key(CAM)) == before


def test_a_vouched_window_takes_every_frame_in_it_and_says_fewer_than_asked(
    line: ModelRegistry,
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = [i.decode() for i, _ in redis_client.xrange(keys.frames_key(CAM))]
    since = int(ids[0].split("-")[0]) / 1000
    assert (
        _enrol(redis_url, tmp_path / "set", "--since", str(since), "--frames", "500", "--force", *SMALL) == 0
    )
    out = capsys.readouterr().out
    assert f"asked 500, found {len(ids)}" in out and "fewer than asked" in out
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert len(manifest["frames"]) == len(ids)  # anomalous frames too: the operator vouched for the window
    assert "operator-vouched" in manifest["rule"]
    # the drift reference workers compare with: image statistics of the (>= 20) training frames
    reference = reference_of(load_artifact(line.get_bytes("parts", 2)).info.drift)
    assert reference is not None and set(reference.image) == {"brightness", "contrast", "sharpness"}


def test_enrol_from_false_alarms_uses_the_frames_operators_marked(
    line: ModelRegistry, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    marked = push_frames(redis_client, CAM, _good(12, 23), start_seq=100)
    for entry_id in marked:
        event = EventMsg(type="raised", camera=CAM, ts=time.time_ns(), frame_id=f"{CAM}:{entry_id}", seq=0)
        keep_candidate(redis_client, keys.DEFAULT_PREFIX, event, "olga")
    overlay = EventMsg(type="raised", camera=CAM, ts=1, frame_id=f"{CAM}:1-0", seq=0, image=b"\xff\xd8")
    keep_candidate(redis_client, keys.DEFAULT_PREFIX, overlay, "olga")  # only the alarm picture: left out
    code = _enrol(
        redis_url,
        tmp_path / "set",
        "--frames",
        "0",
        "--from-false-alarms",
        "--holdout",
        "0.25",
        "--force",
        *SMALL,
    )
    assert code == 0
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert {f["frame_id"] for f in manifest["frames"]} == {f"{CAM}:{i}" for i in marked}
    assert {f["reviewer"] for f in manifest["frames"]} == {"olga"}
    assert manifest["sources"]["false_alarms"]["left_out"] == {"only the alarm picture was kept": 1}
    assert line.version_info("parts", 2).status == "candidate"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--camera", "nosuch", "--model", "parts"), "no camera 'nosuch'"),
        (("--camera", CAM, "--model", "nosuch"), "unknown model 'nosuch'"),
        (
            ("--camera", CAM, "--model", "parts", "--since", "2001-01-01", "--until", "2001-01-02"),
            "no frames found",
        ),
        (("--camera", CAM, "--model", "parts", "--frames", "2"), "too few frames for a holdout"),
        (
            ("--camera", CAM, "--model", "parts", "--frames", "30", "--holdout", "0.1", *SMALL),
            "cannot resolve",
        ),
        (("--camera", CAM, "--model", "parts@1"), "give the model NAME"),
    ],
)
def test_a_mistake_is_one_line_and_exit_2(
    line: ModelRegistry,
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    needle: str,
) -> None:
    code = main(["enrol", "--redis", redis_url, "--out", str(tmp_path / "set"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert [v.version for v in line.versions("parts")] == [1]
