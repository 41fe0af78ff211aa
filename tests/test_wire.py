"""The frame, score and event messages: round trips, and clear errors for bad input."""

import cv2
import msgpack
import numpy as np
import pytest

from dfm_stream.errors import UnsupportedVersionError, WireError
from dfm_stream.frame_codec import decode_frame, encode_frame, jpeg_size
from dfm_stream.keys import check_name, frames_key, scores_key
from dfm_stream.wire import EventMsg, FrameMsg, ScoreMsg, make_frame_id, split_frame_id


def _image(h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (5, 5), 2)


def test_frame_round_trip_raw_is_exact() -> None:
    img = _image()
    msg = encode_frame(img, "cam1", 7, "s1", enc="raw")
    back = FrameMsg.from_bytes(msg.to_bytes())
    assert (back.camera, back.seq, back.session, back.w, back.h, back.c) == ("cam1", 7, "s1", 64, 48, 3)
    np.testing.assert_array_equal(decode_frame(back), img[:, :, ::-1])


def test_frame_round_trip_jpeg_within_jpeg_error() -> None:
    img = _image()
    back = FrameMsg.from_bytes(encode_frame(img, "cam1", 0, "s", jpeg_quality=95).to_bytes())
    assert jpeg_size(back.data) == (64, 48, 3)
    err = np.abs(decode_frame(back).astype(int) - img[:, :, ::-1].astype(int)).mean()
    assert err < 4


def test_frame_from_foreign_producer_with_unknown_keys_and_rgb() -> None:
    img = _image(4, 5)
    raw = msgpack.packb(
        {"v": 1, "camera": "c", "seq": 0, "ts": 1, "enc": "raw", "w": 5, "h": 4, "c": 3, "pix": "rgb",
         "data": img.tobytes(), "lens": "wide"},
        use_bin_type=True,
    )  # fmt: skip
    msg = FrameMsg.from_bytes(raw)
    assert msg.extra == {"lens": "wide"}
    np.testing.assert_array_equal(decode_frame(msg), img)


_HEAD = {"v": 1, "camera": "c", "seq": 0, "ts": 1}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"v": 2, "camera": "c"}, "unsupported_version"),
        ({"camera": "c"}, "bad_message"),
        ({"v": 1, "camera": "c", "seq": "x"}, "bad_message"),
        ({**_HEAD, "enc": "raw", "w": 3, "h": 3, "c": 3, "data": b"x"}, "shape_mismatch"),
        ({**_HEAD, "enc": "raw", "w": 10**6, "h": 10**6, "c": 3, "data": b""}, "too_large"),
        ({**_HEAD, "enc": "png", "w": 3, "h": 3, "c": 3, "data": b""}, "bad_message"),
    ],
)
def test_bad_frame_messages_raise_wire_error_with_reason(body: dict, reason: str) -> None:
    with pytest.raises(WireError) as info:
        FrameMsg.from_bytes(msgpack.packb(body, use_bin_type=True))
    assert info.value.reason == reason


def test_newer_major_version_is_rejected_clearly() -> None:
    with pytest.raises(UnsupportedVersionError, match="newer than this build"):
        ScoreMsg.from_bytes(msgpack.packb({"v": 9}))


def test_garbage_is_bad_msgpack() -> None:
    with pytest.raises(WireError) as info:
        FrameMsg.from_bytes(b"\xc1\xff\x00garbage")
    assert info.value.reason in ("bad_msgpack", "bad_message")


def test_corrupt_and_lying_jpeg_are_refused_before_decoding() -> None:
    good = encode_frame(_image(), "c", 0, "s")
    truncated = FrameMsg("c", 0, 1, "jpeg", 64, 48, 3, good.data[:20])
    with pytest.raises(WireError):
        decode_frame(truncated)
    lying = FrameMsg("c", 0, 1, "jpeg", 640, 480, 3, good.data)
    with pytest.raises(WireError) as info:
        decode_frame(lying)
    assert info.value.reason == "shape_mismatch"


def test_score_and_event_round_trip() -> None:
    s = ScoreMsg("c", make_frame_id("c", "1-0"), 3, 10, 20, 1.5, 0.7, 1.0, True, "m@2", 12.5)
    assert ScoreMsg.from_bytes(s.to_bytes()) == s
    e = EventMsg(
        "raised", "c", 5, frame_id="c:1-0", seq=3, score=1.5, threshold=1.0, model="m@2", image=b"jpg"
    )
    assert EventMsg.from_bytes(e.to_bytes()) == e
    assert split_frame_id("cam-1.a:1700-3") == ("cam-1.a", "1700-3")


def test_nan_score_is_rejected() -> None:
    body = ScoreMsg("c", "c:1-0", 3, 10, 20, 1.5, None, 1.0, True, "m@2", 1.0).to_bytes()
    obj = msgpack.unpackb(body)
    obj["score"] = float("nan")
    with pytest.raises(WireError, match="finite"):
        ScoreMsg.from_bytes(msgpack.packb(obj))


def test_keys_of_a_camera_share_its_cluster_hash_tag() -> None:
    assert frames_key("cam1") == "dfm:{cam1}:frames"
    assert scores_key("cam1", "x") == "x:{cam1}:scores"


@pytest.mark.parametrize("bad", ["a{b}", "a:b", "", "a b"])
def test_camera_ids_that_would_break_a_key_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid camera id"):
        check_name(bad)
