"""``dfm-stream bridge --mqtt``: a real mosquitto broker, an independent subscriber, real processes.

Events reach ``{prefix}/events`` at least once and are acknowledged in Redis only after the broker's
PUBACK: with the broker away they stay pending, and a restarted bridge continues where it stopped.
Part jobs asked for on ``{prefix}/{camera}/inspect/set`` end in a result (and an NG snapshot);
bad requests get error results, are counted, and never stop the bridge.
"""

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
from inspection_helpers import warm_up, worker_thread
from mqtt_helpers import Broker, Subscriber
from support import REPO, wait_until
from tools import require_tool
from worker_helpers import push_frame

from dfm_stream import keys
from dfm_stream.alarms import publish_event
from dfm_stream.embedded_redis import free_port
from dfm_stream.wire import EventMsg

SCHEMAS = REPO / "docs" / "schemas"
CAM = "line1"


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


@pytest.fixture
def broker(tmp_path: Path):
    b = Broker(tmp_path / "mosquitto")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def subscriber(broker):
    s = Subscriber(broker.port)
    yield s
    s.close()


def start_bridge(procs, redis_url: str, broker: Broker, metrics_port: int, *extra: str):
    args = ["bridge", "--redis", redis_url, "--mqtt", broker.url, "--metrics-port", str(metrics_port)]
    return procs.dfm(*args, "--name", "b1", *extra, name="bridge")


def health_event(i: int) -> EventMsg:
    return EventMsg("camera_down", "cam1", time.time_ns(), reason="open_failed", message=f"test {i}")


def pending(client) -> int:
    return int(client.xpending(keys.alarms_key(), "dfm-bridge")["pending"])


def event_ids(sub: Subscriber) -> set[str]:
    return {e["event_id"] for e in sub.json("dfm/events")}


def ready(port: int) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code
    except urllib.error.URLError:  # not listening yet
        return 0


def metric(port: int, line_start: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line_start)]
    return values[0] if values else 0.0


def test_events_reach_mqtt_once_acknowledged_across_broker_and_bridge_restarts(
    redis_client, redis_url, procs, broker, subscriber
):
    port = free_port()
    bridge = start_bridge(procs, redis_url, broker, port)
    wait_until(lambda: b"online" in subscriber.payloads("dfm/available"), 120, what="available: online")
    wait_until(lambda: ready(port) == 200, 60, what="/readyz 200 once the broker is connected")
    first = [publish_event(redis_client, health_event(i)) for i in range(3)]
    wait_until(lambda: set(first) <= event_ids(subscriber), 120, what="the first events on MQTT")
    wait_until(lambda: pending(redis_client) == 0, 60, what="the first events acknowledged")

    broker.stop()
    wait_until(lambda: ready(port) == 503, 60, what="/readyz 503 while the broker is away")
    second = [publish_event(redis_client, health_event(i)) for i in range(3, 6)]
    wait_until(lambda: pending(redis_client) >= 1, 120, what="an event read by the bridge")
    assert not set(second) & event_ids(subscriber)
    held = redis_client.xpending_range(keys.alarms_key(), "dfm-bridge", "-", "+", 10)
    assert held[0]["message_id"].decode() == second[0]  # read, no PUBACK, so no XACK
    broker.start()
    wait_until(
        lambda: set(second) <= event_ids(subscriber), 120, what="the events held while the broker was away"
    )
    wait_until(lambda: pending(redis_client) == 0, 60, what="acknowledged after PUBACK")

    assert procs.stop(bridge, signal.SIGKILL) != 0
    third = [publish_event(redis_client, health_event(i)) for i in range(6, 8)]
    bridge = start_bridge(procs, redis_url, broker, port)
    wait_until(lambda: set(third) <= event_ids(subscriber), 120, what="events after the bridge restarted")
    assert bridge.poll() is None, procs.log(bridge)
    for event in subscriber.json("dfm/events"):
        jsonschema.validate(event, schema("event"))
    by_id = {e["event_id"]: e for e in subscriber.json("dfm/events")}
    assert by_id[first[0]]["message"] == "test 0" and by_id[first[0]]["type"] == "camera_down"
    assert metric(port, 'dfm_bridge_delivered_total{kind="event",protocol="mqtt"}') == len(third)
    assert procs.stop(bridge) == 0
    assert subscriber.payloads("dfm/available")[-1] == b"offline"


def test_jobs_over_mqtt_end_in_results_and_bad_requests_in_error_results(
    redis_client, redis_url, procs, broker, subscriber, artifact
):
    port = free_port()
    with worker_thread(redis_url, artifact.path, [CAM]):
        warm_up(redis_client, CAM, artifact.good[0])
        bridge = start_bridge(procs, redis_url, broker, port, "--cameras", CAM, "--job-timeout", "120")
        wait_until(lambda: b"online" in subscriber.payloads("dfm/available"), 120, what="bridge online")
        subscriber.wait(f"dfm/{CAM}/state", lambda m: m, what="the first state")  # frames counted from now
        subscriber.publish(f"dfm/{CAM}/inspect/set", json.dumps({"meas_id": "M-1", "part_id": "P-1"}))
        wait_until(lambda: redis_client.exists(keys.job_lock_key(CAM)), 120, 0.02, what="the job")
        subscriber.publish(f"dfm/{CAM}/inspect/set", json.dumps({"meas_id": "M-2", "part_id": "P-2"}))
        subscriber.publish(f"dfm/{CAM}/inspect/set", b"{not json")
        subscriber.publish("dfm/nowhere/inspect/set", json.dumps({"part_id": "P-3", "frames": 1}))
        errors = subscriber.wait(f"dfm/{CAM}/result", lambda m: len(m) >= 2, what="busy + malformed")
        push_frame(redis_client, CAM, artifact.defect[0], 1)
        results = subscriber.wait(f"dfm/{CAM}/result", lambda m: len(m) >= 3, what="the NG result")
        unknown = subscriber.wait("dfm/nowhere/result", lambda m: len(m) >= 1)
        snapshot = wait_until(lambda: subscriber.payloads(f"dfm/{CAM}/snapshot"), 60, what="the snapshot")
        state = subscriber.wait(f"dfm/{CAM}/state", lambda m: any(s["frames_scored"] >= 1 for s in m))
        assert bridge.poll() is None, procs.log(bridge)
        bad = metric(port, 'dfm_bridge_bad_requests_total{protocol="mqtt",reason="bad_request"}')
        busy = metric(port, 'dfm_bridge_bad_requests_total{protocol="mqtt",reason="busy"}')
        assert procs.stop(bridge) == 0
    for r in results + unknown:
        jsonschema.validate(r, schema("result"))
    for s in state:
        jsonschema.validate(s, schema("state"))
    by_meas = {r["meas_id"]: r for r in results}
    assert (by_meas["M-1"]["state"], by_meas["M-1"]["part_id"], by_meas["M-1"]["source"]) == (
        "ng",
        "P-1",
        "mqtt",
    )
    assert by_meas["M-2"]["state"] == "error" and by_meas["M-2"]["reason"].startswith("busy")
    assert by_meas[""]["reason"].startswith("bad_request") and errors
    assert unknown[0]["reason"].startswith("unknown_camera") and unknown[0]["part_id"] == "P-3"
    image = cv2.imdecode(np.frombuffer(snapshot[0], np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and len(snapshot[0]) == by_meas["M-1"]["image_bytes"]
    assert state[-1]["model"].startswith("tiny@") and state[-1]["threshold"] == pytest.approx(
        artifact.threshold
    )
    assert (bad, busy) == (1, 1)


def test_mosquitto_sub_reads_the_retained_availability(redis_url, procs, broker):
    exe = require_tool("mosquitto_sub")
    bridge = start_bridge(procs, redis_url, broker, -1)
    read = [exe, "-h", "127.0.0.1", "-p", str(broker.port), "-t", "dfm/available", "-C", "1", "-W", "120"]

    def online() -> bool:
        out = subprocess.run(read, capture_output=True, text=True, timeout=150, check=False)
        return out.stdout.strip() == "online"

    wait_until(online, 150, 0.5, what="a retained 'online'")
    assert procs.stop(bridge) == 0
    out = subprocess.run(read, capture_output=True, text=True, timeout=150, check=False)
    assert out.stdout.strip() == "offline"


def test_two_bridges_in_one_group_deliver_each_event_once(redis_client, redis_url, procs, broker, subscriber):
    bridges = [
        procs.dfm(
            "bridge", "--redis", redis_url, "--mqtt", broker.url, "--metrics-port", "-1", "--name", n, name=n
        )
        for n in ("b1", "b2")
    ]
    wait_until(lambda: len(subscriber.payloads("dfm/available")) >= 2, 120, what="both bridges online")
    wait_until(lambda: redis_client.exists(keys.alarms_key()), 60, what="the bridges' group")
    sent = [publish_event(redis_client, health_event(i)) for i in range(20)]
    wait_until(lambda: set(sent) <= event_ids(subscriber), 120, what="every event")
    wait_until(lambda: pending(redis_client) == 0, 60, what="every event acknowledged")
    ids = [e["event_id"] for e in subscriber.json("dfm/events")]
    assert sorted(ids) == sorted(sent)  # none twice
    for bridge in bridges:
        assert bridge.poll() is None, procs.log(bridge)
        assert procs.stop(bridge) == 0


def test_a_broker_with_users_takes_the_password_from_a_file(redis_client, redis_url, procs, tmp_path):
    broker = Broker(tmp_path / "secured", users={"dfm": "s3cret", "reader": "r3ad"})
    broker.start()
    subscriber = Subscriber(broker.port, auth=("reader", "r3ad"))
    try:
        wrong, right = tmp_path / "wrong", tmp_path / "right"
        wrong.write_text("nope\n")
        right.write_text("s3cret\n")
        url = f"mqtt://dfm@127.0.0.1:{broker.port}"
        port = free_port()
        refused = procs.dfm(
            "bridge", "--redis", redis_url, "--mqtt", url, "--mqtt-password-file", str(wrong),
            "--metrics-port", str(port), "--name", "b1", name="refused",
        )  # fmt: skip
        wait_until(lambda: ready(port) == 503, 120, what="/readyz 503: the broker refused the login")
        event_id = publish_event(redis_client, health_event(0))
        wait_until(lambda: pending(redis_client) == 1, 120, what="the event held, not acknowledged")
        assert refused.poll() is None, procs.log(refused)
        assert procs.stop(refused) == 0
        bridge = procs.dfm(
            "bridge", "--redis", redis_url, "--mqtt", url, "--mqtt-password-file", str(right),
            "--metrics-port", "-1", "--name", "b1", name="bridge",
        )  # fmt: skip
        wait_until(lambda: event_id in event_ids(subscriber), 120, what="the held event, once logged in")
        assert procs.stop(bridge) == 0
    finally:
        subscriber.close()
        broker.stop()
