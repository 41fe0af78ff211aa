"""The frame codec: camera images <-> the bytes carried in a :class:`~dfm_stream.wire.FrameMsg`.

Readers encode (JPEG or raw), workers decode. Decoding never trusts the sender: the JPEG header is
read first, and a frame whose real size disagrees with ``w``/``h``/``c`` or exceeds the pixel cap
is refused before any large allocation.
"""

import struct
import time

import cv2
import numpy as np

from dfm_stream.errors import WireError
from dfm_stream.wire import DEFAULT_MAX_PIXELS, FrameMsg

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def encode_frame(
    image: np.ndarray,
    camera: str,
    seq: int,
    session: str,
    enc: str = "jpeg",
    jpeg_quality: int = 90,
    ts: int | None = None,
) -> FrameMsg:
    """Encode a BGR (HxWx3) or grayscale (HxW) uint8 image as a frame message."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise WireError(f"camera {camera}: frame must be a uint8 HxW or HxWx3 array, got {image.dtype}")
    h, w = image.shape[:2]
    c = 1 if image.ndim == 2 else image.shape[2]
    if ts is None:
        ts = time.time_ns()
    if enc == "jpeg":
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
        if not ok:
            raise WireError(f"camera {camera}: JPEG encoding failed for a {w}x{h}x{c} frame", "encode_error")
        data = buf.tobytes()
    elif enc == "raw":
        data = np.ascontiguousarray(image).tobytes()
    else:
        raise WireError(f"camera {camera}: unknown encoding {enc!r} (use 'jpeg' or 'raw')")
    return FrameMsg(camera, seq, ts, enc, w, h, c, data, session, "gray" if c == 1 else "bgr")


def jpeg_size(data: bytes) -> tuple[int, int, int]:
    """Return ``(width, height, components)`` from a JPEG's frame header without decoding it."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise WireError("JPEG data does not start with the SOI marker (corrupt or not JPEG)", "decode_error")
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise WireError(f"corrupt JPEG: expected a marker at byte {i}", "decode_error")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF_MARKERS:
            if i + 10 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h, data[i + 9]
        if marker == 0xDA:  # start of scan before any frame header
            break
        i += 2 + length
    raise WireError("corrupt JPEG: no frame header found (truncated?)", "decode_error")


_REDUCED_FLAGS = {
    (2, False): cv2.IMREAD_REDUCED_COLOR_2,
    (4, False): cv2.IMREAD_REDUCED_COLOR_4,
    (8, False): cv2.IMREAD_REDUCED_COLOR_8,
    (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
"""OpenCV's reduced-size JPEG reads: libjpeg scales the DCT, so 1/2, 1/4, 1/8 cost far less."""


def jpeg_reduction(width: int, height: int, min_size: tuple[int, int] | None) -> int:
    """Return the largest JPEG reduction (1, 2, 4 or 8) keeping both sides >= ``min_size`` (h, w).

    libjpeg rounds a reduced side up, so ``ceil(side / factor)`` must still cover the model's
    side: the final resize then only ever shrinks, as it does from the full frame.
    """
    if min_size is None:
        return 1
    min_h, min_w = int(min_size[0]), int(min_size[1])
    for factor in (8, 4, 2):
        if -(-width // factor) >= min_w and -(-height // factor) >= min_h:
            return factor
    return 1


def decode_frame(
    msg: FrameMsg, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode a frame message into an RGB uint8 HxWx3 array (grayscale is expanded to 3 channels).

    With ``min_size`` (the model's input, height and width), a JPEG frame larger than that is
    decoded at 1/2, 1/4 or 1/8 scale (:func:`jpeg_reduction`): the result is smaller than the
    frame but keeps its aspect ratio and is still at least ``min_size``, so the model's resize
    sees the same picture at less cost. Raw frames are returned at full size.
    """
    if msg.w * msg.h > max_pixels:
        raise WireError(f"camera {msg.camera}: {msg.w}x{msg.h} frame exceeds the pixel cap", "too_large")
    image: np.ndarray | None
    if msg.enc == "raw":
        image = np.frombuffer(msg.data, dtype=np.uint8)
        if image.size != msg.w * msg.h * msg.c:
            raise WireError(f"camera {msg.camera}: raw frame size mismatch", "shape_mismatch")
        image = image.reshape(msg.h, msg.w, msg.c)
        order = msg.pix
    else:
        w, h, c = jpeg_size(msg.data)
        if (w, h) != (msg.w, msg.h):
            raise WireError(
                f"camera {msg.camera}: JPEG is {w}x{h} but the message says {msg.w}x{msg.h}", "shape_mismatch"
            )
        gray = msg.c == 1
        factor = jpeg_reduction(w, h, min_size)
        if factor > 1:
            flag = _REDUCED_FLAGS[(factor, gray)]
        else:
            flag = cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR
        image = cv2.imdecode(np.frombuffer(msg.data, dtype=np.uint8), flag)
        if image is None:
            raise WireError(f"camera {msg.camera}: JPEG data could not be decoded (corrupt)", "decode_error")
        if image.ndim == 2:
            image = image[:, :, None]
        order = "gray" if c == 1 or msg.c == 1 else "bgr"
    return _to_rgb(image, order)


def _to_rgb(image: np.ndarray, order: str) -> np.ndarray:
    # cv2.cvtColor: ~40x faster than a numpy channel flip + copy, which cost as much as the decode
    if image.shape[2] == 1 or order == "gray":
        return cv2.cvtColor(np.ascontiguousarray(image[:, :, 0]), cv2.COLOR_GRAY2RGB)
    if order == "rgb":
        return np.ascontiguousarray(image)
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2RGB)
