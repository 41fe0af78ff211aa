"""Command-line options built from the config sections, so that each setting is defined once.

A setting is a field of a section class in :mod:`dfm_stream.config`: its default, its description,
its value kind, its flag (``--batch-size`` for ``batch_size`` unless the field names another) and
its choices. :func:`add_section_flags` turns the fields a command exposes into options whose
default is "not given"; :func:`overlay` lays the options that were given over the section read from
the file and the environment (:func:`dfm_stream.config.settings_config`). That is the documented
precedence, flag > environment > file > default, with validation in one place: the section's own
checks, whose message then names the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dfm_stream.commands.argtypes import finite_number, parsed, whole_number
from dfm_stream.config import field_kind, parse_roi, parse_size
from dfm_stream.errors import ConfigError

S = TypeVar("S")

_TYPES: dict[str, Callable[[str], Any]] = {"int": whole_number, "float": finite_number, "str": str}
_PARSERS: dict[str, Callable[[str], Any]] = {"size": parse_size, "roi": parse_roi}


def flag_of(f: dataclasses.Field) -> str:
    """Return the command-line option of a config field (``--batch-size`` for ``batch_size``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _dest(f: dataclasses.Field) -> str:
    return flag_of(f)[2:].replace("-", "_")


def _fields(section: type, names: Sequence[str]) -> list[dataclasses.Field]:
    by_name = {f.name: f for f in dataclasses.fields(section)}
    unknown = [n for n in names if n not in by_name]
    if unknown:  # a bug of ours: a command names a setting its section does not have
        raise AssertionError(f"{section.__name__} has no field {', '.join(unknown)}")
    return [by_name[n] for n in names]


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value in ("", None):
        return "empty"
    if isinstance(value, tuple):
        return ("x" if len(value) == 2 else ",").join(str(v) for v in value)
    return str(value)


def add_section_flags(
    group: argparse._ArgumentGroup | argparse.ArgumentParser, section: type, names: Sequence[str]
) -> None:
    """Add one option per field of ``section`` named in ``names``; each defaults to "not given"."""
    key = section.__doc__.split(":", 1)[0].strip("`") if section.__doc__ else section.__name__
    for f in _fields(section, names):
        text = f"{f.metadata.get('help', '')} (default {_shown(f.default)}; {key} {f.name})"
        text = text.replace("%", "%%")
        kind = field_kind(f)
        if kind == "bool":
            group.add_argument(
                flag_of(f), dest=_dest(f), action=argparse.BooleanOptionalAction, default=None, help=text
            )
            continue
        group.add_argument(
            flag_of(f),
            dest=_dest(f),
            type=parsed(_PARSERS[kind], flag_of(f)) if kind in _PARSERS else _TYPES[kind],
            choices=f.metadata.get("choices") or None,
            default=None,
            metavar=f.name.upper() if not f.metadata.get("choices") else None,
            help=text,
        )


def overlay(section: S, args: argparse.Namespace, names: Sequence[str]) -> S:
    """Return ``section`` with the options of ``names`` that were given on the command line applied.

    The section's own checks run on the result; a value they refuse is a ConfigError that names
    the option (``--batch-size 0: batch_size=0 must be >= 1``).
    """
    given = {}
    for f in _fields(type(section), names):
        value = getattr(args, _dest(f), None)
        if value is not None:
            given[f.name] = (flag_of(f), value)
    try:
        return dataclasses.replace(section, **{name: value for name, (_, value) in given.items()})  # type: ignore[type-var]
    except ConfigError as e:
        named = [
            f"{flag} {_shown(value)}"
            for name, (flag, value) in given.items()
            if re.search(rf"\b{name}\b", str(e))
        ]
        if not named:
            raise
        raise ConfigError(f"{', '.join(named)}: {e}") from e
