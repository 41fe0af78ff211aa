"""Camera sources: USB/V4L, network streams, video files, image folders, and a synthetic conveyor."""

from dfm_stream.sources.base import (
    Frame,
    Source,
    SourceFinished,
    SourceOptions,
    make_source,
    open_source,
    safe_url,
    source_kind,
)

__all__ = [
    "Frame",
    "Source",
    "SourceFinished",
    "SourceOptions",
    "make_source",
    "open_source",
    "safe_url",
    "source_kind",
]
