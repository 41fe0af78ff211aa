"""The README and docs state what the code does: outbox delivery time, drop reasons, commands."""

from __future__ import annotations

import re
from pathlib import Path

from dfm_stream.cli import build_parser
from dfm_stream.metrics import READER_DROP_REASONS, WORKER_DROP_REASONS
from dfm_stream.publisher import EVENT_RETRY_S, OUTBOX_DELIVER_AFTER_S
from dfm_stream.worker import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {
    name: (ROOT / "docs" / name).read_text(encoding="utf-8") for name in ("wire-format.md", "guarantees.md")
}


def _seconds(value: float) -> str:
    return f"{value:g}"


def test_every_doc_gives_the_same_outbox_delivery_time() -> None:
    earliest = OUTBOX_DELIVER_AFTER_S
    latest = OUTBOX_DELIVER_AFTER_S + WorkerSettings().outbox_interval_s
    phrase = f"{_seconds(earliest)} to {_seconds(latest)} s later"
    for name, text in {"README.md": README, **DOCS}.items():
        flat = " ".join(text.split())
        assert phrase in flat, f"{name} does not say '{phrase}'"
        assert not re.search(r"(about|within about) \d+ s (later|,)", flat), (
            f"{name} still gives another time"
        )


def test_the_guarantees_give_the_worker_event_retry_time() -> None:
    flat = " ".join(DOCS["guarantees.md"].split())
    assert f"longer than its retries ({_seconds(EVENT_RETRY_S)} s" in flat
    assert EVENT_RETRY_S < OUTBOX_DELIVER_AFTER_S  # else a live worker and the outbox would both send


def _metric_row(metric: str) -> str:
    (row,) = [line for line in README.splitlines() if line.startswith(f"| `{metric}` |")]
    return row


def test_readme_lists_every_drop_reason() -> None:
    for metric, reasons in (
        ("dfm_reader_frames_dropped_total", READER_DROP_REASONS),
        ("dfm_worker_frames_dropped_total", WORKER_DROP_REASONS),
    ):
        row = _metric_row(metric)
        missing = [r for r in reasons if f"`{r}`" not in row]
        assert not missing, f"README's {metric} row lacks {missing}"


def test_readme_command_table_lists_every_command() -> None:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    table = [line for line in README.splitlines() if re.match(r"^\| `[a-z-]+` \| ", line)]
    listed = {re.match(r"^\| `([a-z-]+)`", line).group(1) for line in table}
    missing = sorted(set(sub.choices) - listed)
    assert not missing, f"README's command table lacks {missing}"
