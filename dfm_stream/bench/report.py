"""Presenting a bench result: a rich table for the terminal and a markdown table for the docs."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

_ROWS: tuple[tuple[str, str, str], ...] = (
    ("backbone", "backbone forward (ceiling)", "img/s"),
    ("dfm", "DFM score (features + PCA)", "img/s"),
    ("pipeline", "full pipeline (Redis -> worker -> scores)", "img/s"),
    ("transport", "transport only (no model)", "frames/s"),
    ("latency50_p99_ms", "p99 latency at 50 % load", "ms"),
    ("latency80_p99_ms", "p99 latency at 80 % load", "ms"),
    ("inspect50_p99_ms", "p99 part job trigger -> result at 50 % load", "ms"),
    ("inspect80_p99_ms", "p99 part job trigger -> result at 80 % load", "ms"),
    ("isolation_throughput_ratio", "honest throughput beside a hostile camera / alone", "x"),
    ("isolation_p99_ratio", "honest p99 latency beside a hostile camera / alone", "x"),
    ("isolation_probe_errors", "Redis errors (BUSY ...) seen by a probe beside a hostile camera", ""),
    ("swap_p99_s", "p99 model switch: push/rollback/assign -> first frame of the new version", "s"),
    ("swap_other_backbone_s", "model switch to a version with other backbone weights (a build)", "s"),
    ("consoles_worker_fps_alone", "worker, 8 cameras x 10 fps, no console", "img/s"),
    ("consoles_worker_fps_with", "worker, 8 cameras x 10 fps, 3 consoles open", "img/s"),
    ("consoles_throughput_ratio", "worker throughput with 3 consoles / without (#18: >= 0.95)", "x"),
    ("consoles_cpu_cores", "CPU of the 3 console processes", "cores"),
    ("consoles_redis_commands_per_s", "Redis commands of the 3 consoles", "1/s"),
    ("fit_seconds", "fit time", "s"),
)


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _spread(entry: dict[str, Any], digits: int = 1) -> str:
    if entry.get("n", 0) < 2:
        return "-"
    return f"{_num(entry['min'], digits)}-{_num(entry['max'], digits)}"


def _foreign(entry: dict[str, Any]) -> str:
    values = [v for v in entry.get("foreign_cpu_cores", []) if v is not None]
    return f"{max(values):.2f}" if values else "-"


def rows(document: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Return ``(what, median, spread, unit, other load)`` rows of the stages, ratios and backends.

    *other load* is the most CPU (in cores) that processes outside the bench used during any
    repeat of that row: figures with other load near a whole core are not trustworthy.
    """
    results = document["results"]
    out: list[tuple[str, str, str, str, str]] = []
    for key, label, unit in _ROWS:
        if key in results:
            entry = results[key]
            digits = {"x": 3, "cores": 2}.get(unit, 1)
            out.append((label, _num(entry["median"], digits), _spread(entry, digits), unit, _foreign(entry)))
    for key, label in (
        ("pipeline_over_backbone", "pipeline / backbone"),
        ("pipeline_over_backbone_median_batch", "pipeline / backbone, median batch time"),
        ("pipeline_over_backbone_best_batch", "pipeline / backbone, fastest batch"),
        ("pipeline_over_dfm", "pipeline / DFM score"),
        ("transport_over_pipeline", "transport / pipeline"),
    ):
        entry = document["ratios"].get(key, {})
        if entry.get("n"):
            out.append((label, _num(entry["median"], 2), _spread(entry, 2), "x", ""))
    for name, info in document["backends"].items():
        entry = results.get(f"backend:{name}")
        if entry is None:
            continue
        check = "ok" if info.get("passes") else "FAILS 1e-3"
        label = f"backend {name} (score diff {info.get('score_max_rel_diff', 0):.1e}, {check})"
        out.append((label, _num(entry["median"]), _spread(entry), "img/s", _foreign(entry)))
    return out


LATENCY_COLUMNS = (
    "load", "offered fps", "p50 ms", "p95 ms", "p99 ms", "job p50 ms", "job p99 ms", "job bound ms",
)  # fmt: skip
"""Latency table: score latency (capture -> published), then part jobs' trigger -> result and #17's
bound for it (a camera's frame interval + the score p99 + 50 ms)."""


def latency_rows(document: dict[str, Any]) -> list[tuple[str, ...]]:
    """Return one row of :data:`LATENCY_COLUMNS` per load level (medians over repeats)."""
    out: list[tuple[str, ...]] = []
    for key in sorted(k for k in document["results"] if k.startswith("latency") and k.endswith("_p99_ms")):
        details = document["results"][key].get("details", [])
        if not details:
            continue

        def med(field: str, details: list[dict[str, Any]] = details) -> float | None:
            values = sorted(d[field] for d in details if d.get(field) is not None)
            return values[len(values) // 2] if values else None

        out.append(
            (f"{round(details[0]['load'] * 100)} %", _num(med("offered_fps")), _num(med("p50_ms"), 0),
             _num(med("p95_ms"), 0), _num(med("p99_ms"), 0), _num(med("inspect_p50_ms"), 0),
             _num(med("inspect_p99_ms"), 0), _num(med("inspect_budget_ms"), 0))
        )  # fmt: skip
    return out


def print_report(document: dict[str, Any], console: Console | None = None) -> None:
    """Print the result as tables (stages, latency, targets)."""
    console = console or Console()
    s = document["settings"]
    title = (
        f"dfm-stream bench: {s['backbone']}/{s['layer']} {s['image_size']} px, batch {s['batch_size']}, "
        f"{s['device_resolved']} ({s['precision']}, {s['worker_backend']}), {s['repeats']} repeat(s)"
    )
    table = Table(title=title)
    for col in ("measure", "median", "min-max", "unit", "other load"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for row in rows(document):
        table.add_row(*row)
    console.print(table)
    lat = latency_rows(document)
    if lat:
        t = Table(title="latency paced in real time: capture -> score published; part job trigger -> result")
        for col in LATENCY_COLUMNS:
            t.add_column(col, justify="right")
        for lat_row in lat:
            t.add_row(*lat_row)
        console.print(t)
    for name, target in document.get("targets", {}).items():
        mark = "[green]met[/green]" if target["met"] else "[red]not met[/red]"
        console.print(f"target {name}: {_num(target['value'], 2)} vs {_num(target['target'], 2)}: {mark}")
    m = document["machine"]
    gpus = ", ".join(g["name"] for g in m["gpus"]) or "no GPU"
    foreign = m.get("foreign_cpu_cores_during_run")
    console.print(
        f"machine: {m['cpu_model']}, {m['logical_cores']} cores, {(m['ram_bytes'] or 0) / 2**30:.0f} GiB, "
        f"{gpus}; other processes used {_num(foreign, 2)} cores on average during the run"
    )


def to_markdown(document: dict[str, Any]) -> str:
    """Return the main table and the latency table as markdown (for README.md / docs/scaling.md)."""
    lines = ["| measure | median | min-max | unit | other load (cores) |", "|---|---:|---:|---|---:|"]
    lines += [f"| {' | '.join(row)} |" for row in rows(document)]
    lat = latency_rows(document)
    if lat:
        lines += ["", f"| {' | '.join(LATENCY_COLUMNS)} |", "|" + "---:|" * len(LATENCY_COLUMNS)]
        lines += [f"| {' | '.join(r)} |" for r in lat]
    return "\n".join(lines) + "\n"
