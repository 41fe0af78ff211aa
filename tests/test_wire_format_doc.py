"""docs/wire-format.md is a contract for code that is not ours: check it the way an outside checker would.

The wire side of these tests uses only redis, msgpack, numpy and cv2: frames are msgpack maps built
by hand as the document describes, and what the worker writes back (scores, alarm events on the
stream and on the pub/sub channel, dead letters) is decoded with plain msgpack and compared with the
keys, types and meanings the document lists. dfm_stream is used only to make the model file the
worker loads. The document's own Python example is run against a real worker too.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
from registry_helpers import tiny_artifact
from support import wait_until

from dfm_stream.artifact import update_calibration

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"
THRESHOLD = 1e-6  # far below any score of the tiny model: every frame is anomalous, so an alarm is raised
SCORE_MIN, SCORE_MAX = 0.0, 1000.0
CAMERA = "camA"
GROUP = "dfm-workers"


# -- what the document says ------------------------------------------------------------------------


def doc_section(title: str) -> str:
    """Return the text of the section of docs/wire-format.md whose heading starts with ``title``."""
    text = DOC.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start : end if end > 0 else len(text)]


def first_table(section: str) -> list[list[str]]:
    """Return the body rows (cells stripped) of the first markdown table in ``section``."""
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[2:]  # header and separator rows dropped


def names(cell: str) -> list[str]:
    """Return the key names written as `code` in a table cell (e.g. "`seq`, `ts`")."""
    return re.findall(r"`([a-z_]+)`", cell)


def documented_keys(title: str) -> set[str]:
    """Return every key named in the first column of the first table of a section."""
    return {k for row in first_table(doc_section(title)) for k in names(row[0])}


def documented_event_keys(event_type: str) -> set[str]:
    """Return the keys the event table says are present for ``event_type``."""
    keys = set()
    for row in first_table(doc_section("## Event message")):
        present_for = row[2]
        if present_for == "all" or f"`{event_type}`" in present_for:
            keys.update(names(row[0]))
    return keys


def python_example() -> str:
    """Return the code of the document's Python example."""
    section = DOC.read_text().split("### Python: push a frame, read its score", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "docs/wire-format.md has no ```python block under its Python example heading"
    return match.group(1)


# -- an outside producer and consumer: redis + msgpack only -----------------------------------------


def frames_key(camera: str) -> str:
    return f"dfm:{{{camera}}}:frames"


def push_msg(client, camera: str, msg: bytes) -> str:
    """XADD one entry with the field ``msg``; return its entry id."""
    entry_id = client.xadd(frames_key(camera), {"msg": msg}, maxlen=1000, approximate=True)
    return entry_id.decode()


def frame(seq: int, enc: str, image: np.ndarray, data: bytes, **keys: object) -> dict:
    """Return a frame map as the document's frame table describes it."""
    h, w = image.shape[:2]
    c = 1 if image.ndim == 2 else image.shape[2]
    body = {"v": 1, "camera": CAMERA, "seq": seq, "session": "outside", "ts": time.time_ns(), "enc": enc}
    return {**body, "w": w, "h": h, "c": c, "data": data, **keys}


def jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def sample_image() -> tuple[np.ndarray, np.ndarray]:
    """A 80x48 BGR image of coloured noise, dark on the left half, bright on the right; and its gray."""
    rng = np.random.default_rng(3)
    bgr = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    bgr[:, :40] //= 6
    bgr[:, 40:] = 200 + bgr[:, 40:] % 56
    return bgr, cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)


def push_documented_frames(client) -> dict[str, tuple[str, dict | bytes]]:
    """Push every frame kind the document allows, plus three it says are dead-lettered.

    Returns ``name -> (entry id, what was sent)``: the map for the good frames, the raw ``msg``
    bytes for the bad ones.
    """
    bgr, gray = sample_image()
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    good = {
        # the first frame raises the alarm; unknown keys of any type must be ignored
        "raw_bgr": frame(0, "raw", bgr, bgr.tobytes(), pix="bgr", lens="wide", rig={"id": 7, "ok": True}),
        "raw_rgb": frame(1, "raw", bgr, rgb.tobytes(), pix="rgb"),
        "raw_rgb_mislabelled": frame(2, "raw", bgr, bgr.tobytes(), pix="rgb"),  # control: must differ
        "raw_gray": frame(3, "raw", gray, gray.tobytes(), pix="gray"),
        "raw_gray_default_pix": frame(4, "raw", gray, gray.tobytes()),
        "raw_gray_as_bgr": frame(5, "raw", bgr, cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR).tobytes()),
        "jpeg_colour": frame(6, "jpeg", bgr, jpeg(bgr)),
        "jpeg_gray": frame(7, "jpeg", gray, jpeg(gray)),
        "jpeg_v_string": frame(8, "jpeg", bgr, jpeg(bgr), v="1.2"),
    }
    del good["jpeg_v_string"]["session"]  # optional: the score then says ""
    bad = {
        "unsupported_version": msgpack.packb(frame(9, "jpeg", bgr, jpeg(bgr), v=2), use_bin_type=True),
        "bad_msgpack": b"\xc1 this is not msgpack",
        "shape_mismatch": msgpack.packb(frame(10, "raw", bgr, bgr.tobytes()[:-1]), use_bin_type=True),
    }
    sent: dict[str, tuple[str, dict | bytes]] = {}
    for name, body in good.items():
        sent[name] = (push_msg(client, CAMERA, msgpack.packb(body, use_bin_type=True)), body)
    for reason, data in bad.items():
        sent[reason] = (push_msg(client, CAMERA, data), data)
    return sent


def read_stream(client, key: str) -> list[tuple[str, dict[bytes, bytes]]]:
    return [(i.decode(), fields) for i, fields in client.xrange(key)]


def decoded(fields: dict[bytes, bytes]) -> dict:
    return msgpack.unpackb(fields[b"msg"], raw=False)


def groups(client) -> list[tuple[str, int]]:
    """Return ``(group name, pending count)`` of every consumer group on the test camera's frames."""
    return [(g["name"].decode(), g["pending"]) for g in client.xinfo_groups(frames_key(CAMERA))]


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- checks of what the worker wrote -----------------------------------------------------------------


def check_score(score: dict, entry_id: str, sent: dict) -> None:
    """Every key the score table lists, with its documented type and meaning."""
    assert set(score) == documented_keys("## Score message")
    assert score["v"] == 1 and is_int(score["v"])
    assert score["camera"] == CAMERA
    assert score["frame_id"] == f"{CAMERA}:{entry_id}"
    assert (score["seq"], score["ts"]) == (sent["seq"], sent["ts"])
    assert score["session"] == sent.get("session", "")
    assert is_int(score["scored_ts"]) and score["scored_ts"] >= score["ts"]
    assert isinstance(score["latency_ms"], float) and score["latency_ms"] >= 0
    assert score["latency_ms"] == pytest.approx((score["scored_ts"] - score["ts"]) / 1e6, abs=1e-3)
    assert score["status"] == "scored"
    assert isinstance(score["score"], float) and math.isfinite(score["score"])
    assert isinstance(score["threshold"], float) and score["threshold"] == pytest.approx(THRESHOLD)
    assert score["score"] > score["threshold"]
    assert score["anomalous"] is True
    expected_norm = min(1.0, max(0.0, (score["score"] - THRESHOLD) / (SCORE_MAX - SCORE_MIN) + 0.5))
    assert isinstance(score["score_norm"], float) and score["score_norm"] == pytest.approx(expected_norm)
    assert re.fullmatch(r"tiny@[0-9a-f]{8}", score["model"]), score["model"]
    assert isinstance(score["worker"], str) and score["worker"]


def check_scores(client, sent: dict) -> dict[str, dict]:
    """Decode the score stream with plain msgpack; return ``frame name -> score``."""
    by_frame_id = {}
    for _, fields in read_stream(client, f"dfm:{{{CAMERA}}}:scores"):
        assert set(fields) == {b"msg"}
        score = decoded(fields)
        assert score["frame_id"] not in by_frame_id, "a frame was scored twice"
        by_frame_id[score["frame_id"]] = score
    scores = {}
    for name, (entry_id, body) in sent.items():
        if isinstance(body, dict):
            scores[name] = by_frame_id.pop(f"{CAMERA}:{entry_id}")
            check_score(scores[name], entry_id, body)
    assert not by_frame_id, f"scores for frames that should have been dead-lettered: {list(by_frame_id)}"
    assert len({s["worker"] for s in scores.values()}) == 1
    assert client.exists(f"dfm:worker:{scores['raw_bgr']['worker']}")  # the documented heartbeat
    s = {name: score["score"] for name, score in scores.items()}
    assert s["raw_rgb"] == pytest.approx(s["raw_bgr"], rel=1e-4)  # pix rgb is honoured...
    assert s["raw_rgb_mislabelled"] != pytest.approx(s["raw_bgr"], rel=1e-3)  # ...and matters
    assert s["raw_gray_default_pix"] == pytest.approx(s["raw_gray"], rel=1e-4)
    assert s["raw_gray_as_bgr"] == pytest.approx(s["raw_gray"], rel=1e-4)
    return scores


def check_raised(client, pubsub, first: dict) -> None:
    """One `raised` event for the first frame, with the documented keys and a JPEG of the frame."""
    events = [(decoded(fields), fields[b"msg"]) for _, fields in read_stream(client, "dfm:alarms")]
    raised = [(e, raw) for e, raw in events if e["type"] == "raised"]
    assert len(raised) == 1, [e["type"] for e, _ in events]
    event, raw = raised[0]
    assert set(event) == documented_event_keys("raised")
    assert event["v"] == 1 and event["camera"] == CAMERA and is_int(event["ts"])
    assert (event["frame_id"], event["seq"], event["model"]) == (first["frame_id"], 0, first["model"])
    assert event["score"] == pytest.approx(first["score"])
    assert event["threshold"] == pytest.approx(THRESHOLD)
    assert isinstance(event["image"], bytes) and len(event["image"]) <= 64 * 1024
    image = cv2.imdecode(np.frombuffer(event["image"], np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (48, 80, 3)  # the raw frame, read as h rows of w pixels
    assert image[:, :40].mean() + 40 < image[:, 40:].mean()  # its dark half is on the left
    message = wait_until(
        lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5), 10, what="pub/sub event"
    )
    assert message["channel"] == b"dfm:alarms"
    assert message["data"] == raw  # the same bytes as the stream entry


def check_dead_letters(client, sent: dict, worker: str) -> None:
    """The refused frames: documented keys and reasons, and the original `msg` bytes as `payload`."""
    entries = read_stream(client, "dfm:deadletter")
    documented_reasons = first_table(doc_section("## Dead-letter entry"))
    reasons_row = next(row for row in documented_reasons if names(row[0]) == ["reason"])
    by_frame_id = {}
    for _, fields in entries:
        assert set(fields) == {b"msg", b"payload"}
        msg = decoded(fields)
        assert set(msg) == documented_keys("## Dead-letter entry")
        by_frame_id[msg["frame_id"]] = (msg, fields[b"payload"])
    assert len(by_frame_id) == len(entries) == 3
    for reason in ("unsupported_version", "bad_msgpack", "shape_mismatch"):
        entry_id, data = sent[reason]
        msg, payload = by_frame_id[f"{CAMERA}:{entry_id}"]
        assert msg["reason"] == reason and f"`{reason}`" in reasons_row[2]
        assert payload == data
        assert (msg["v"], msg["camera"], msg["deliveries"], msg["worker"]) == (1, CAMERA, 1, worker)
        assert isinstance(msg["error"], str) and msg["error"]
        assert is_int(msg["ts"])


# -- the tests ---------------------------------------------------------------------------------------


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A tiny fitted model with a threshold every frame exceeds and a calibration range (score_norm)."""
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(tiny_artifact(threshold=THRESHOLD))
    update_calibration(path, THRESHOLD, SCORE_MIN, SCORE_MAX)
    return path


def work(procs, redis_url: str, model: Path, *extra: str):
    args = ["work", "--redis", redis_url, "--model", str(model), "--device", "cpu", "--metrics-port", "-1"]
    return procs.dfm(*args, "--max-wait-ms", "5", *extra, name="worker")


def test_hand_built_frames_get_the_documented_outputs(redis_client, redis_url, procs, model_file):
    pubsub = redis_client.pubsub()
    pubsub.subscribe("dfm:alarms")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    sent = push_documented_frames(redis_client)  # before the worker starts: its group starts at id 0
    worker = work(procs, redis_url, model_file, "--cameras", CAMERA)
    n_good = sum(isinstance(body, dict) for _, body in sent.values())
    wait_until(
        lambda: (
            worker.poll() is not None
            or (
                redis_client.xlen(f"dfm:{{{CAMERA}}}:scores") >= n_good
                and redis_client.xlen("dfm:deadletter") >= 3
                and redis_client.xlen("dfm:alarms") >= 1
            )
        ),
        50,
        what="scores, dead letters and the alarm",
    )
    assert worker.poll() is None, procs.log(worker)
    scores = check_scores(redis_client, sent)
    check_raised(redis_client, pubsub, scores["raw_bgr"])
    check_dead_letters(redis_client, sent, scores["raw_bgr"]["worker"])
    wait_until(lambda: groups(redis_client) == [(GROUP, 0)], 10, what="every frame acked in dfm-workers")
    pubsub.close()
    assert procs.stop(worker) == 0


def test_the_documented_python_example_prints_a_score(redis_client, redis_url, procs, model_file, tmp_path):
    example = tmp_path / "example.py"
    example.write_text(python_example())
    worker = work(procs, redis_url, model_file)  # no --cameras: it discovers the example's camera
    camera = f"doc-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "REDIS_URL": redis_url, "CAMERA": camera}
    run = subprocess.run(
        [sys.executable, str(example)],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{procs.log(worker)}"
    score = json.loads(run.stdout.strip().splitlines()[-1])
    entry_ids = [i.decode() for i, _ in redis_client.xrange(frames_key(camera))]
    assert [score["frame_id"]] == [f"{camera}:{i}" for i in entry_ids]
    assert (score["status"], score["anomalous"], score["camera"]) == ("scored", True, camera)
    assert set(score) == documented_keys("## Score message")
    assert json.loads(redis_client.hget("dfm:cameras", camera))["camera"] == camera
    assert procs.stop(worker) == 0
