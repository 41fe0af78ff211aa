"""A short soak: Redis, a reader with four synthetic cameras and a worker run for half a minute, and
no process's memory grows after warm-up beyond a small bound; plus controls showing the RSS
measurement would see a process that does grow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from support import wait_until

from dfm_stream.bench.soak import (
    MIB,
    ProcessTrace,
    SoakSettings,
    format_report,
    read_rss,
    run_soak,
    write_report,
)

GROWTH_BOUND_MIB = 8.0
"""Largest RSS growth after warm-up accepted for any process (observed: well under 1 MiB)."""


def test_short_soak_keeps_every_process_within_the_memory_bound(tmp_path: Path) -> None:
    settings = SoakSettings(
        duration_s=30,
        cameras=4,
        rss_interval_s=1.0,
        fps=8.0,
        size=64,
        workdir=tmp_path / "soak",
        max_growth_mib=GROWTH_BOUND_MIB,
    )
    report = run_soak(settings)
    write_report(report, tmp_path / "soak.json")
    text = format_report(report)
    assert report["died"] is None, text + "\n" + json.dumps(report.get("log_tails"), indent=1)
    procs = report["processes"]
    assert set(procs) == {"redis-server", "reader", "worker0"}
    for name, p in procs.items():
        assert p["samples"] >= 20, f"{name}: only {p['samples']} RSS samples in 30 s at 1 s"
        assert p["growth_after_warmup"] is not None
        assert p["growth_after_warmup"] < GROWTH_BOUND_MIB * MIB, text
        assert p["rss_peak"] >= p["rss_end"] > 0
    assert procs["reader"]["exit_code"] == 0 and procs["worker0"]["exit_code"] == 0, text
    assert procs["worker0"]["rss_end"] > 100 * MIB, "the worker holds torch and a model: RSS must show it"
    assert report["ok"], text
    reader, worker = report["metrics"]["reader"], report["metrics"]["worker0"]
    assert reader["dfm_reader_frames_published_total"] >= 4 * 8 * 15
    assert reader["dfm_reader_frames_dropped_total"] == 0
    assert worker["dfm_worker_frames_scored_total"] >= 4 * 8 * 15
    assert worker["dfm_worker_loop_errors_total"] == 0
    assert report["streams"]["deadletter"] == 0
    saved = json.loads((tmp_path / "soak.json").read_text())
    assert saved["processes"]["worker0"]["rss"][0][1] > 0
    assert "result: ok" in text


_GROWER = """
import sys, time
print("ready", flush=True)
sys.stdin.readline()
blob = bytearray(96 * 2**20)  # touched: it counts in RSS
for i in range(0, len(blob), 4096):
    blob[i] = 1
print("grown", flush=True)
sys.stdin.readline()
"""


def test_rss_sampling_sees_a_process_that_grows() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _GROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        trace = ProcessTrace("grower", proc.pid)
        t0 = time.monotonic()
        for _ in range(5):
            assert trace.sample(time.monotonic() - t0)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "grown"
        for _ in range(5):
            assert trace.sample(time.monotonic() - t0 + 10)
        summary = trace.summary(warmup_s=0)
        assert summary["growth_after_warmup"] > 80 * MIB
        assert summary["rss_peak"] == max(rss for _, rss in trace.samples)
    finally:
        proc.kill()
        proc.wait(5)
    wait_until(lambda: read_rss(proc.pid) is None, 10, what="the process to be gone")
    assert not trace.sample(99.0), "a process that exited has no RSS"


def test_growth_is_judged_on_medians_after_warm_up() -> None:
    trace = ProcessTrace("p", 1)
    trace.samples = [(float(t), 100 * MIB + (50 * MIB if t < 10 else 0)) for t in range(30)]
    trace.samples[25] = (25.0, 400 * MIB)  # one noisy sample does not decide
    summary = trace.summary(warmup_s=10)
    assert summary["growth_after_warmup"] == 0
    assert summary["rss_start"] == 150 * MIB and summary["rss_peak"] == 400 * MIB
