"""Camera sources: USB/V4L, network streams, video files, image folders, and a synthetic conveyor.

This module is the factory: :func:`make_source` turns a source spec (``0``, ``rtsp://...``, a file,
a folder, ``synthetic:...``) into a :class:`Source`; the kinds live in their own modules.
"""

from pathlib import Path
from urllib.parse import urlsplit

from dfm_stream.errors import SourceError
from dfm_stream.redact import safe_url
from dfm_stream.sources.base import (
    NETWORK_SCHEMES,
    Frame,
    Source,
    SourceFinished,
    SourceOptions,
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


def source_kind(spec: str) -> str:
    """Return the kind of source ``spec`` names, without opening anything."""
    spec = spec.strip()
    if not spec:
        raise SourceError("empty camera source: give an index (0), a URL, a file, a folder or synthetic:")
    if spec.isdigit():
        return "usb"
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return "synthetic"
    scheme = urlsplit(spec).scheme.lower()
    if scheme in NETWORK_SCHEMES:
        return "network"
    if len(scheme) > 1 and spec.startswith(f"{scheme}://"):
        raise SourceError(
            f"unsupported source URL scheme {scheme!r} in {safe_url(spec)}: use one of "
            f"{', '.join(NETWORK_SCHEMES)}, a file, a folder, a camera index or synthetic:"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    raise SourceError(
        f"camera source {safe_url(spec)!r}: no such file or folder (a source is a camera index such as 0, an"
        " rtsp:// / http(s):// URL, a video file, a folder of images, or synthetic:)"
    )


def make_source(spec: str, options: SourceOptions | None = None) -> Source:
    """Parse ``spec`` and return the (not yet opened) source it names; raise SourceError if invalid."""
    opts = options or SourceOptions()
    kind = source_kind(spec)
    spec = spec.strip()
    if kind == "synthetic":
        from dfm_stream.sources.synthetic import SyntheticSource

        return SyntheticSource.from_spec(spec, fps=opts.fps)
    if kind == "folder":
        from dfm_stream.sources.folder import FolderSource

        return FolderSource(Path(spec).expanduser(), loop=opts.loop, fps=opts.fps)
    from dfm_stream.sources import opencv

    if kind == "usb":
        return opencv.UsbSource(int(spec), opts.open_timeout, opts.read_timeout)
    if kind == "network":
        return opencv.NetworkSource(spec, opts.open_timeout, opts.read_timeout)
    return opencv.VideoFileSource(Path(spec).expanduser(), loop=opts.loop)


def open_source(spec: str, options: SourceOptions | None = None) -> Source:
    """Parse ``spec``, open the source and return it (the caller closes it)."""
    source = make_source(spec, options)
    source.open()
    return source
