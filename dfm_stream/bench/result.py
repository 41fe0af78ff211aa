"""The result document of ``dfm-stream bench``: per-repeat records, summaries, ratios and targets.

Schema ``dfm-stream-bench/1`` (JSON): ``settings``, ``machine`` (CPU, cores, RAM, GPUs, the CPU
that other processes used during the run), ``versions``, ``results`` (per measure: median, min,
max, quartiles, every run, details and ``foreign_cpu_cores`` per run), ``ratios`` (taken within
each repeat, then summarised), ``backends`` (score check per backend), ``backends_summary`` and
``targets`` (the issue's goals, each with ``value``, ``target`` and ``met``).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dfm_stream.bench.env import load_average, summarize, versions
from dfm_stream.redact import safe_url

SCHEMA = "dfm-stream-bench/1"
TARGET_PIPELINE_EFFICIENCY = 0.95
TARGET_TRANSPORT_FPS = 3000.0
TARGET_FIT_BYTES = 2 * 1024**3
TARGET_SWAP_P99_S = 1.0
"""#21: a registry command returning -> the first frame scored by the new version, p99."""


@dataclass
class Runs:
    """Per-repeat measurements, filled stage by stage."""

    values: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, list[Any]] = field(default_factory=dict)
    foreign: dict[str, list[float | None]] = field(default_factory=dict)

    def add(self, name: str, value: float, detail: Any = None, foreign: float | None = None) -> None:
        """Record one repeat of ``name`` (``foreign``: cores other processes used meanwhile)."""
        self.values.setdefault(name, []).append(float(value))
        self.foreign.setdefault(name, []).append(foreign)
        if detail is not None:
            self.details.setdefault(name, []).append(detail)

    def last(self, *names: str) -> float | None:
        """Return the latest value of the first of ``names`` measured so far."""
        for name in names:
            if self.values.get(name):
                return self.values[name][-1]
        return None


def _ratio_runs(runs: Runs, top: str, bottom: str, field: str | None = None) -> list[float]:
    if field is None:
        a, b = runs.values.get(top, []), runs.values.get(bottom, [])
    else:
        a = [d.get(field) for d in runs.details.get(top, [])]
        b = [d.get(field) for d in runs.details.get(bottom, [])]
    return [x / y for x, y in zip(a, b, strict=False) if x and y]


def build_document(
    settings: Any,
    runs: Runs,
    stages: Any,
    engine: Any,
    server: str | None,
    started: float,
    machine: dict[str, Any],
) -> dict[str, Any]:
    """Summarise ``runs`` into the result document (see the module docstring for its layout)."""
    results: dict[str, Any] = {}
    for name, values in runs.values.items():
        results[name] = summarize(values)
        results[name]["foreign_cpu_cores"] = runs.foreign.get(name, [])
        if name in runs.details:
            results[name]["details"] = runs.details[name]
    ratios = {
        "pipeline_over_backbone": summarize(_ratio_runs(runs, "pipeline", "backbone")),
        "transport_over_pipeline": summarize(_ratio_runs(runs, "transport", "pipeline")),
        "dfm_over_backbone": summarize(_ratio_runs(runs, "dfm", "backbone")),
        "pipeline_over_dfm": summarize(_ratio_runs(runs, "pipeline", "dfm")),
        "pipeline_over_backbone_median_batch": summarize(
            _ratio_runs(runs, "pipeline", "backbone", "median_rate")
        ),
        "pipeline_over_backbone_best_batch": summarize(
            _ratio_runs(runs, "pipeline", "backbone", "best_rate")
        ),
    }
    machine["load_average_end"] = load_average()
    return {
        "schema": SCHEMA,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": time.time() - started,
        "settings": {
            **dataclasses.asdict(settings),
            "redis_url": safe_url(settings.redis_url) if getattr(settings, "redis_url", None) else None,
            "device_resolved": str(engine.device),
            "precision": engine.precision,
            "worker_backend": stages.backend,
        },
        "machine": machine,
        "versions": versions(server),
        "results": results,
        "ratios": ratios,
        "backends": stages.backend_info,
        "backends_summary": backend_summary(results, stages.backend_info),
        "targets": _targets(settings, results, ratios),
    }


def backend_summary(results: dict[str, Any], info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Return the fastest backend whose scores pass the fp32 check, and every speed-up over eager."""
    rates = {n: results[f"backend:{n}"]["median"] for n in info if f"backend:{n}" in results}
    passing = {n: r for n, r in rates.items() if info[n].get("passes")}
    eager = rates.get("eager")
    return {
        "fastest_passing": max(passing, key=lambda n: passing[n]) if passing else None,
        "speedup_over_eager": {n: r / eager for n, r in rates.items()} if eager else {},
        "failing": sorted(n for n in rates if not info[n].get("passes")),
    }


def _median(results: dict[str, Any], name: str) -> float | None:
    entry = results.get(name)
    return None if entry is None else entry.get("median")


def _targets(settings: Any, results: dict[str, Any], ratios: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    eff = ratios["pipeline_over_backbone"]["median"]
    if eff is not None:
        out["pipeline_efficiency"] = {"value": eff, "target": TARGET_PIPELINE_EFFICIENCY}
    transport = _median(results, "transport")
    if transport is not None:
        out["transport_fps"] = {"value": transport, "target": TARGET_TRANSPORT_FPS}
    p99 = _median(results, "latency80_p99_ms")
    forward_rate = _median(results, "dfm") or _median(results, "backbone")
    if p99 is not None and forward_rate:
        limit = settings.max_wait_ms + 2 * 1000.0 * settings.batch_size / forward_rate
        out["latency_p99_at_80"] = {"value": p99, "target": limit, "lower_is_better": True}
    swap = _median(results, "swap_p99_s")
    if swap is not None:
        out["model_switch_p99_s"] = {"value": swap, "target": TARGET_SWAP_P99_S, "lower_is_better": True}
    fit = results.get("fit_seconds")
    if fit is not None:
        beyond = statistics.median(d["peak_beyond_model_bytes"] for d in fit["details"])
        out["fit_memory_beyond_model"] = {
            "value": beyond,
            "target": TARGET_FIT_BYTES,
            "lower_is_better": True,
        }
    for entry in out.values():
        better_low = entry.get("lower_is_better", False)
        entry["met"] = entry["value"] <= entry["target"] if better_low else entry["value"] >= entry["target"]
    return out


def write_json(document: dict[str, Any], path: str | Path) -> None:
    """Write the result document as indented JSON."""
    Path(path).write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
