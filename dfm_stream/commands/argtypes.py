"""The one set of argparse value types of ``dfm-stream``: numbers in range, ports, stream ids.

Also :func:`check_writable_folder`, which commands call on their output paths before the work
starts, so a typo in ``--out`` is not found after a long fit.

A value out of range is a usage error that argparse reports on one line with exit status 2,
naming the option (``argument --batch-size: must be >= 1, got 0``), before any work starts.
Every command uses these instead of a plain ``type=int`` where a value has a lower bound.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfm_stream.errors import ConfigError

_STREAM_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


def _number(kind: type, text: str) -> Any:
    try:
        value = kind(text)
    except ValueError as e:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from e
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def whole_number(text: str) -> int:
    """Parse a whole number (its range is checked by the setting it feeds)."""
    return int(_number(int, text))


def finite_number(text: str) -> float:
    """Parse a finite number (its range is checked by the setting it feeds)."""
    return float(_number(float, text))


def int_at_least(minimum: int) -> Callable[[str], int]:
    """Return a type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def float_at_least(minimum: float, strict: bool = False) -> Callable[[str], float]:
    """Return a type: a finite number >= ``minimum`` (``> minimum`` when ``strict``)."""

    def parse(text: str) -> float:
        value = _number(float, text)
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


positive_int = int_at_least(1)
"""A whole number >= 1 (batch sizes, counts, camera numbers)."""
non_negative_int = int_at_least(0)
"""A whole number >= 0."""
positive_float = float_at_least(0.0, strict=True)
"""A finite number > 0 (durations, timeouts, rates)."""
non_negative_float = float_at_least(0.0)
"""A finite number >= 0."""


def fraction(text: str) -> float:
    """Parse a number within [0, 1] (rates such as --max-fpr, --defect-rate)."""
    value = _number(float, text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def port(text: str) -> int:
    """Parse a TCP port 0..65535, or -1 (off)."""
    value = _number(int, text)
    if not -1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port 0..65535 (0: a free one) or -1 (off), got {text}")
    return value


def stream_id(text: str) -> str:
    """Parse a stream entry id as printed in the ``id`` of each line (``1700000000000-0``)."""
    if not _STREAM_ID.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a stream entry id: give the 'id' of a printed line, e.g. 1700000000000-0"
        )
    return text.strip()


def point_in_time(text: str) -> int:
    """Parse a moment into Unix milliseconds.

    ISO 8601 (``2026-12-03T16:40:00``, UTC unless it has a zone) or Unix seconds (``1733243200.5``).
    """
    from datetime import UTC, datetime

    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        if not math.isfinite(seconds) or seconds < 0:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a time: Unix seconds must be a finite number >= 0"
            )
        return round(seconds * 1000)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give ISO 8601 (2026-12-03T16:40:00, UTC unless a zone is given)"
            " or Unix seconds"
        ) from e
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def parsed(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """Return a type that calls ``parse`` (which raises ValueError) and reports ``what`` on failure."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{what}: {e}") from e

    convert.__name__ = what
    return convert


def check_writable_folder(folder: Path, flag: str) -> None:
    """Create ``folder`` (with parents) and make sure a file can be written there; else ConfigError.

    ``flag`` names the option in the message (``--out``). Called before a command does its work.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(
            f"{flag}: cannot write into {folder} ({e.strerror or e}): give a path in a writable folder"
        ) from e
