"""Bad input to the message parsers and the frame decoder: property-based tests and a bounded fuzz run.

The rule under test: whatever bytes arrive in a stream entry, parsing and decoding either succeed or
raise :class:`~dfm_stream.errors.WireError` (with a reason the worker puts in the dead-letter
stream) -- never another exception, and never an allocation larger than what the message paid for
(a frame that *claims* a billion pixels is refused before anything of that size is allocated).
The same kind of inputs pushed through a real worker process (bottom of this file) each land in the
dead-letter stream with exactly the reason the codec gives, while the good frames around them are
scored.
"""

from __future__ import annotations

import contextlib
import json
import random
import struct
import subprocess
import sys
from collections import Counter

import cv2
import msgpack
import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Processes
from worker_helpers import Artifact, scores

from dfm_stream import keys
from dfm_stream.errors import WireError
from dfm_stream.frame_codec import decode_frame, encode_frame, jpeg_size
from dfm_stream.wire import DEFAULT_MAX_PIXELS, FIELD, DeadLetterMsg, EventMsg, FrameMsg, ScoreMsg

PARSERS: tuple[type, ...] = (FrameMsg, ScoreMsg, EventMsg, DeadLetterMsg)
FIELDS = sorted(
    {"v", "camera", "seq", "ts", "enc", "w", "h", "c", "data", "session", "pix"}
    | {"frame_id", "scored_ts", "score", "score_norm", "threshold", "anomalous", "model", "latency_ms"}
    | {"status", "worker", "type", "reason", "message", "image", "since_ts", "error", "deliveries"}
)
REASONS = {
    "ok",
    "bad_msgpack",
    "bad_message",
    "unsupported_version",
    "too_large",
    "shape_mismatch",
    "decode_error",
    "oversized",
}
"""``ok`` plus every WireError reason of the frame path (the dead-letter reasons)."""
FUZZ_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (5, 5), 2)


def parse_and_decode(data: object) -> str:
    """Run every parser on ``data`` (and the decoder on a parsed frame); return the outcome.

    ``"ok"`` when the frame parser and the decoder accepted it, else the WireError reason of the
    frame path. Any other exception propagates: that is the failure the tests look for.
    """
    for cls in (ScoreMsg, EventMsg, DeadLetterMsg):
        with contextlib.suppress(WireError):
            cls.from_bytes(data)
    try:
        image = decode_frame(FrameMsg.from_bytes(data))
    except WireError as e:
        assert e.reason, "a WireError must carry a reason (it goes to the dead-letter stream)"
        return e.reason
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    return "ok"


def corpus() -> list[bytes]:
    """Valid messages of every kind: the seeds the fuzzer mutates."""
    img = _image()
    return [
        encode_frame(img, "cam1", 1, "s", jpeg_quality=80).to_bytes(),
        encode_frame(img[:16, :16], "cam1", 2, "s", enc="raw").to_bytes(),
        encode_frame(img[:, :, 0], "cam1", 3, "s").to_bytes(),
        ScoreMsg("cam1", "cam1:1-0", 1, 2, 3, 1.0, 0.5, 1.0, True, "m@1", 1.0).to_bytes(),
        EventMsg("raised", "cam1", 1, frame_id="cam1:1-0", seq=1, score=2.0, image=b"jpg").to_bytes(),
        DeadLetterMsg("cam1", "cam1:1-0", "decode_error", "corrupt", 1).to_bytes(),
    ]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Apply 1-4 random byte-level mutations (flip, overwrite, insert, delete, truncate, splice)."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.choice(
                (0x00, 0xFF, 0x7F, 0x80, 0xC1, 0xDD, 0xDF, rng.randrange(256))
            )
        elif op == 2:
            b[rng.randrange(len(b) + 1) : 0] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and b:
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 16)]
        elif op == 4:
            b = b[: rng.randrange(len(b) + 1)]
        else:
            i, j = sorted(rng.randrange(len(b) + 1) for _ in range(2))
            b[i:i] = b[i:j]
    return bytes(b)


# -- property-based -----------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=16)
    | st.binary(max_size=64)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
)


@FUZZ_SETTINGS
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_wire_error(data: bytes) -> None:
    assert parse_and_decode(data) in REASONS


@FUZZ_SETTINGS
@given(_values)
def test_any_msgpack_value_only_ever_raises_wire_error(value: object) -> None:
    outcome = parse_and_decode(msgpack.packb(value, use_bin_type=True))
    assert outcome in REASONS
    if not isinstance(value, dict):
        assert outcome == "bad_message"


_VALID_FRAME = {
    "v": 1,
    "camera": "c",
    "seq": 0,
    "ts": 1,
    "enc": "raw",
    "w": 2,
    "h": 2,
    "c": 1,
    "data": b"abcd",
}


@FUZZ_SETTINGS
@given(st.dictionaries(st.sampled_from(FIELDS), _values, min_size=1, max_size=6))
def test_a_valid_frame_with_fields_replaced_by_anything_is_parsed_or_refused(changes: dict) -> None:
    body = {**_VALID_FRAME, **changes}
    outcome = parse_and_decode(msgpack.packb(body, use_bin_type=True))
    assert outcome in REASONS
    if outcome == "ok":  # then the fields really had the right types and shape
        msg = FrameMsg.from_bytes(msgpack.packb(body, use_bin_type=True))
        assert isinstance(msg.w, int) and isinstance(msg.data, bytes)
        assert msg.w * msg.h <= DEFAULT_MAX_PIXELS


@FUZZ_SETTINGS
@given(st.one_of(st.text(), st.integers(), st.none(), st.lists(st.integers()), st.floats()))
def test_wrong_python_types_are_wire_errors(value: object) -> None:
    for cls in PARSERS:
        with pytest.raises(WireError) as info:
            cls.from_bytes(value)
        assert info.value.reason == "bad_msgpack"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "key",
    [
        "score",
        "score_norm",
        "threshold",
        "latency_ms",
    ],
)
def test_non_finite_numbers_in_scores_are_refused(key: str, bad: float) -> None:
    obj = msgpack.unpackb(ScoreMsg("c", "c:1-0", 1, 2, 3, 1.0, 0.5, 1.0, True, "m", 1.0).to_bytes())
    obj[key] = bad
    with pytest.raises(WireError, match="finite"):
        ScoreMsg.from_bytes(msgpack.packb(obj))


@pytest.mark.parametrize("key", ["score", "threshold"])
def test_non_finite_numbers_in_events_are_refused(key: str) -> None:
    obj = msgpack.unpackb(EventMsg("raised", "c", 1, score=1.0, threshold=1.0).to_bytes())
    obj[key] = float("nan")
    with pytest.raises(WireError, match="finite"):
        EventMsg.from_bytes(msgpack.packb(obj))


# -- bounded fuzz run -------------------------------------------------------------------------------


def test_fuzz_thousands_of_mutated_messages() -> None:
    rng = random.Random(20240607)
    seeds = corpus()
    outcomes: Counter[str] = Counter()
    for _ in range(6000):
        data = mutate(rng.choice(seeds), rng)
        outcomes[parse_and_decode(data)] += 1
    assert set(outcomes) <= REASONS
    # the run exercised the refusal paths, not only one of them
    assert outcomes["bad_msgpack"] > 100
    assert outcomes["bad_message"] > 10
    assert outcomes["decode_error"] + outcomes["shape_mismatch"] > 0
    assert sum(outcomes.values()) == 6000


def _jpeg_with_size(data: bytes, w: int, h: int) -> bytes:
    """Rewrite the width/height of the first SOF header of a JPEG (the rest stays as it was)."""
    i = 2
    while i + 4 <= len(data):
        marker = data[i + 1]
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in (0xC0, 0xC1, 0xC2):
            return data[: i + 5] + struct.pack(">HH", h, w) + data[i + 9 :]
        i += 2 + length
    raise AssertionError("no SOF marker")


def test_truncated_or_corrupt_jpeg_frames_never_crash_the_decoder() -> None:
    good = encode_frame(_image(), "c", 0, "s")
    rng = random.Random(7)
    outcomes: Counter[str] = Counter()
    for cut in range(0, len(good.data), max(1, len(good.data) // 200)):
        msg = FrameMsg("c", 0, 1, "jpeg", good.w, good.h, 3, good.data[:cut])
        outcomes[_decode_outcome(msg)] += 1
    for _ in range(500):
        msg = FrameMsg("c", 0, 1, "jpeg", good.w, good.h, 3, mutate(good.data, rng))
        outcomes[_decode_outcome(msg)] += 1
    assert outcomes["decode_error"] > 0
    assert set(outcomes) <= {"ok", "decode_error", "shape_mismatch"}
    lying = FrameMsg("c", 0, 1, "jpeg", good.w, good.h, 3, _jpeg_with_size(good.data, 30000, 30000))
    assert _decode_outcome(lying) == "shape_mismatch"
    assert jpeg_size(_jpeg_with_size(good.data, 30000, 30000))[:2] == (30000, 30000)


def _decode_outcome(msg: FrameMsg) -> str:
    try:
        decode_frame(msg)
    except WireError as e:
        return e.reason
    return "ok"


# -- memory: absurd sizes are refused before allocation -----------------------------------------

_MEMORY_PROBE = r"""
import json, resource, struct, sys
import msgpack
from dfm_stream.frame_codec import decode_frame, encode_frame
from dfm_stream.errors import WireError
from dfm_stream.wire import FrameMsg
import numpy as np

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

small = encode_frame(np.zeros((48, 64, 3), np.uint8), "c", 0, "s").data
def sof(data, w, h):
    i = 2
    while True:
        (n,) = struct.unpack(">H", data[i + 2 : i + 4])
        if data[i + 1] == 0xC0:
            return data[: i + 5] + struct.pack(">HH", h, w) + data[i + 9 :]
        i += 2 + n

head = {"v": 1, "camera": "c", "seq": 0, "ts": 1}
side = 31623  # side * side > 1e9 pixels
huge_jpeg = sof(small, side, side)
cases = {
    "raw_claims_1e9_pixels": {**head, "enc": "raw", "w": side, "h": side, "c": 3, "data": b"x" * 64},
    "jpeg_claims_1e9_pixels": {**head, "enc": "jpeg", "w": side, "h": side, "c": 3, "data": huge_jpeg},
    "jpeg_header_lies_1e9": {**head, "enc": "jpeg", "w": 64, "h": 48, "c": 3, "data": huge_jpeg},
    "raw_max_w_h": {**head, "enc": "raw", "w": 2**64 - 1, "h": 2**64 - 1, "c": 3, "data": b""},
}
raw_bombs = {
    "bin_claims_4gib": b"\x81\xa4data\xc6\xff\xff\xff\xf0" + b"x" * 16,
    "array_claims_4g_items": b"\xdd\xff\xff\xff\xff" + b"\xc0" * 16,
    "map_claims_4g_items": b"\xdf\xff\xff\xff\xff" + b"\xc0" * 16,
    "nested_1e5": b"\x91" * 100_000 + b"\xc0",
}
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
limit = status("VmSize") + 256 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, hard))  # a 3 GB allocation fails, loudly
before = status("VmHWM")
out = {}
items = [(k, msgpack.packb(v, use_bin_type=True)) for k, v in cases.items()] + list(raw_bombs.items())
for name, data in items:
    try:
        decode_frame(FrameMsg.from_bytes(data))
        out[name] = "accepted"
    except WireError as e:
        out[name] = e.reason
direct = FrameMsg("c", 0, 1, "jpeg", side, side, 3, sof(small, side, side))
try:
    decode_frame(direct)
    out["decode_frame_direct"] = "accepted"
except WireError as e:
    out["decode_frame_direct"] = e.reason
out["hwm_growth"] = status("VmHWM") - before
print(json.dumps(out))
"""


def test_absurd_sizes_are_refused_before_any_large_allocation() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = result.pop("hwm_growth")
    assert result == {
        "raw_claims_1e9_pixels": "too_large",
        "jpeg_claims_1e9_pixels": "too_large",
        "jpeg_header_lies_1e9": "shape_mismatch",
        "raw_max_w_h": "too_large",
        "bin_claims_4gib": "bad_msgpack",
        "array_claims_4g_items": "bad_msgpack",
        "map_claims_4g_items": "bad_msgpack",
        "nested_1e5": "bad_msgpack",
        "decode_frame_direct": "too_large",
    }
    assert growth < 64 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB while refusing absurd frames"


def test_the_harness_reports_a_crash_that_is_not_a_wire_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: a decoder bug (any other exception) makes the fuzz tests fail, it is not swallowed."""

    def broken_decoder(msg: FrameMsg, max_pixels: int = 0) -> np.ndarray:
        raise KeyError("planted bug")

    monkeypatch.setattr(sys.modules[__name__], "decode_frame", broken_decoder)
    with pytest.raises(KeyError, match="planted"):
        parse_and_decode(corpus()[0])


# -- the same bad input through a real worker: dead-lettered with its reason ----------------------


def _bad_payloads(good: bytes, rng: random.Random) -> list[bytes]:
    """Crafted and mutated frame messages, most of which a worker must refuse."""
    msg = FrameMsg.from_bytes(good)
    head = {"v": 1, "camera": "fz", "seq": 0, "ts": 1}
    crafted = [
        msgpack.packb({**head, "enc": "raw", "w": 31623, "h": 31623, "c": 3, "data": b"x"}),
        msgpack.packb({**head, "enc": "raw", "w": 8, "h": 8, "c": 3, "data": b"short"}),
        msgpack.packb({**head, "v": 2, "enc": "jpeg", "w": msg.w, "h": msg.h, "c": 3, "data": msg.data}),
        msgpack.packb(
            {**head, "ts": float("nan"), "enc": "jpeg", "w": msg.w, "h": msg.h, "c": 3, "data": msg.data}
        ),
        msgpack.packb({**head, "seq": "7", "enc": "jpeg", "w": msg.w, "h": msg.h, "c": 3, "data": msg.data}),
        msgpack.packb([1, 2, 3]),
        b"\xc1not msgpack at all",
        b"",
        FrameMsg("fz", 1, 1, "jpeg", msg.w, msg.h, 3, msg.data[: len(msg.data) // 3]).to_bytes(),
        FrameMsg("fz", 1, 1, "jpeg", msg.w, msg.h, 3, _jpeg_with_size(msg.data, 30000, 30000)).to_bytes(),
        FrameMsg("fz", 1, 1, "jpeg", msg.w, msg.h, 3, b"\xff\xd8" + bytes(200)).to_bytes(),
    ]
    mutated = [mutate(good, rng) for _ in range(25)]
    mutated += [
        FrameMsg("fz", 1, 1, "jpeg", msg.w, msg.h, 3, mutate(msg.data, rng)).to_bytes() for _ in range(15)
    ]
    return crafted + mutated


def test_a_real_worker_dead_letters_each_bad_frame_with_its_reason(
    redis_client: redis.Redis, redis_url: str, artifact: Artifact, procs: Processes
) -> None:
    rng = random.Random(99)
    goods = [encode_frame(img, "fz", i, "s").to_bytes() for i, img in enumerate(artifact.good[:4])]
    entries = [*goods, *_bad_payloads(goods[0], rng)]
    rng.shuffle(entries)
    key = keys.frames_key("fz")
    expected = {}
    for payload in entries:
        entry_id = redis_client.xadd(key, {FIELD: payload}).decode()
        expected[f"fz:{entry_id}"] = (parse_and_decode(payload), payload)
    no_msg = redis_client.xadd(key, {"image": b"\xff\xd8"}).decode()
    expected[f"fz:{no_msg}"] = ("bad_message", b"image=\xff\xd8")
    worker = procs.dfm(
        *("work", "--redis", redis_url, "--model", str(artifact.path), "--cameras", "fz", "--device", "cpu"),
        *("--burst", "--metrics-port", "-1"),
        name="worker",
    )
    assert worker.wait(120) == 0, procs.log(worker)

    scored = Counter(s.frame_id for s in scores(redis_client, "fz"))
    dead = {}
    for _, fields in redis_client.xrange(keys.deadletter_key()):
        letter = DeadLetterMsg.from_bytes(fields[FIELD.encode()])
        assert letter.frame_id not in dead, f"{letter.frame_id} dead-lettered twice"
        dead[letter.frame_id] = (letter.reason, fields[b"payload"])
    refused = {f: e for f, e in expected.items() if e[0] != "ok"}
    assert len(refused) >= 30 and len(expected) - len(refused) >= 4
    assert set(scored) == {f for f, e in expected.items() if e[0] == "ok"}
    assert max(scored.values()) == 1
    assert dead == refused, "each refused frame is dead-lettered once, with the codec's reason and its bytes"
    assert int(redis_client.xpending(key, keys.DEFAULT_GROUP)["pending"]) == 0
