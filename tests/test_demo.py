"""``dfm-stream demo`` end to end: embedded (or external) Redis, readers, a worker, a summary.

The demo runs as a real subprocess with ``--no-view --summary-json``; the summary is what the
assertions read. The synthetic cameras are reproducible from the seed: with ``--seed 0`` and a
defect rate of 0.3, ``line-b`` shows its first defective part after 3 parts (about 3 s at 8 fps),
so a short run always contains some.
"""

import json
import os
import socket
from pathlib import Path
from typing import Any

from dfm_stream import keys
from dfm_stream.embedded_redis import EmbeddedRedis

FAST = [
    "--size",
    "96",
    "--warmup",
    "96",
    "--fps",
    "8",
    "--metrics-port",
    "0",
    "--console-port",
    "0",
    "--no-view",
]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _run_demo(procs: Any, tmp_path: Path, *args: str, timeout: float = 150) -> dict[str, Any]:
    summary_path = tmp_path / "summary.json"
    proc = procs.dfm(
        "demo",
        *FAST,
        "--summary-json",
        str(summary_path),
        "--workdir",
        str(tmp_path / "work"),
        *args,
        name="demo",
    )
    code = proc.wait(timeout)
    assert code == 0, procs.log(proc)
    return json.loads(summary_path.read_text())


def _assert_children_gone(summary: dict[str, Any]) -> None:
    roles = sorted(p["role"] for p in summary["processes"])
    assert roles == ["console", "reader", "reader", "worker"]
    for p in summary["processes"]:
        assert p["exit_code"] == 0, p
        assert not _alive(p["pid"]), p
    assert summary["killed"] == []


def test_demo_raises_alarms_for_the_injected_defects(procs: Any, tmp_path: Path) -> None:
    summary = _run_demo(procs, tmp_path, "--duration", "12", "--defect-rate", "0.3", "--seed", "0")

    good, defective = summary["cameras"]["line-a"], summary["cameras"]["line-b"]
    assert good["frames_scored"] > 0
    assert defective["frames_scored"] > 0
    assert defective["defects_injected"] > 0
    assert defective["alarms_raised"] > 0
    assert defective["defects_detected"] > 0
    assert good["defects_injected"] == 0
    assert good["anomalous_frames"] <= 0.1 * good["frames_scored"]
    assert good["alarms_raised"] <= 1
    assert summary["totals"]["latency_ms"]["p50"] > 0
    assert summary["model"]["pre_trained"] is False
    assert "random backbone weights" in summary["model"]["weights_note"]
    assert summary["failure"] is None
    assert summary["console_url"].startswith("http://127.0.0.1:")
    assert f"console: {summary['console_url']}" in procs.log(procs.procs[0])

    _assert_children_gone(summary)
    redis = summary["redis"]
    assert redis["embedded"] is True
    assert not _alive(redis["pid"])
    assert not _accepts(redis["port"])


def test_demo_runs_against_an_external_redis(
    procs: Any, tmp_path: Path, redis_server: EmbeddedRedis, redis_client: Any
) -> None:
    summary = _run_demo(procs, tmp_path, "--duration", "5", "--redis", redis_server.url)

    for camera in ("line-a", "line-b"):
        assert summary["cameras"][camera]["frames_scored"] > 0
        assert redis_client.xlen(keys.scores_key(camera)) >= summary["cameras"][camera]["frames_scored"]
    assert summary["redis"]["embedded"] is False
    _assert_children_gone(summary)
    assert redis_client.ping()  # the demo leaves a server it did not start running


def test_a_demo_without_workdir_says_its_logs_are_temporary_and_removes_them(
    procs: Any, tmp_path: Path
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = procs.dfm("demo", *FAST, "--duration", "2", name="demo", env={"TMPDIR": str(temp)})
    assert proc.wait(150) == 0, procs.log(proc)
    log = procs.log(proc)
    assert f"logs: {temp / 'dfm-demo-'}" in log
    assert (
        "(a temporary folder, removed when the demo ends: pass --workdir DIR to keep the model and logs)"
        in log
    )
    assert f"removed the temporary work folder {temp / 'dfm-demo-'}" in log
    assert not list(temp.glob("dfm-demo-*")), "the folder it named is gone, as it said"
