"""The operator console without a browser: reviews, candidates and audit in Redis; users, roles, CSRF.

A real redis-server and real ``dfm-stream console`` processes; HTTP through a small cookie-keeping
client (:class:`console_helpers.Browserless`). The browser tests are in test_console_browser.py.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
from console_helpers import PASSWORDS, SECRET, Browserless, add_users, shadow_msgs, start_console
from registry_helpers import tiny_artifact
from support import wait_until
from worker_helpers import push_frame

from dfm_stream import keys
from dfm_stream.alarms import publish_event
from dfm_stream.console.store import review_alarm
from dfm_stream.promotion import Promotions
from dfm_stream.registry import ModelRef, ModelRegistry
from dfm_stream.shadow import ShadowPublisher
from dfm_stream.wire import FIELD, EventMsg

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"


def doc_table(title: str) -> list[list[str]]:
    """Body rows of the first table after the heading or sentence that starts with ``title``."""
    text = DOC.read_text()
    lines = text[text.index(title) :].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[2:]


def names(cell: str) -> set[str]:
    return set(re.findall(r"`([a-z_]+)`", cell))


def jpeg(value: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((24, 32, 3), value, np.uint8))
    assert ok
    return buf.tobytes()


def raise_alarm(client, camera: str, frame_entry: str, image: bytes | None = b"") -> str:
    """Publish a raised event for ``camera:frame_entry`` as a worker would; return its alarm id."""
    event = EventMsg(
        type="raised",
        camera=camera,
        ts=time.time_ns(),
        frame_id=f"{camera}:{frame_entry}",
        seq=3,
        score=9.5,
        threshold=4.0,
        model="tiny@1a2b3c4d",
        image=jpeg(200) if image == b"" else image,
    )
    return publish_event(client, event)


def events_of(client, *types: str) -> list[dict]:
    out = []
    for _, fields in client.xrange(keys.alarms_key()):
        body = msgpack.unpackb(fields[FIELD.encode()], raw=False)
        if body["type"] in types:
            out.append(body)
    return out


# -- Redis: reviews, candidates, audit ------------------------------------------------------------


def test_a_review_is_stored_and_published_with_the_documented_keys(redis_client) -> None:
    frame_entry = push_frame(redis_client, "camA", np.full((24, 32, 3), 90, np.uint8), 0)
    first = raise_alarm(redis_client, "camA", frame_entry)
    second = raise_alarm(redis_client, "camA", "1-0")  # its frame is no longer in the stream
    review_alarm(redis_client, "dfm", first, "acknowledged", "olga", "real scratch")
    review_alarm(redis_client, "dfm", second, "false_alarm", "olga")

    stored = {k.decode(): json.loads(v) for k, v in redis_client.hgetall(keys.reviews_key()).items()}
    assert stored[f"camA:{frame_entry}"]["decision"] == "acknowledged"
    assert stored[f"camA:{frame_entry}"]["comment"] == "real scratch"
    assert stored["camA:1-0"]["decision"] == "false_alarm"
    assert stored["camA:1-0"]["kept"] == "alarm_image"

    ack, false = events_of(redis_client, "acknowledged", "false_alarm")
    rows = doc_table("## Event message")
    for event in (ack, false):
        documented = set().union(
            *(names(r[0]) for r in rows if r[2] == "all" or f"`{event['type']}`" in r[2])
        )
        assert set(event) <= documented
        assert {"frame_id", "user", "seq", "score", "model"} <= set(event)
    assert (ack["frame_id"], ack["user"], ack["comment"]) == (f"camA:{frame_entry}", "olga", "real scratch")
    assert "comment" not in false


def test_a_false_alarm_keeps_the_frame_jpeg_as_a_candidate(redis_client) -> None:
    frame = np.zeros((24, 32, 3), np.uint8)
    frame[:, 16:] = 255
    frame_entry = push_frame(redis_client, "camB", frame, 0)
    alarm = raise_alarm(redis_client, "camB", frame_entry, image=None)
    review = review_alarm(redis_client, "dfm", alarm, "false_alarm", "olga", "glare")
    assert review["kept"] == "frame"
    ((_, fields),) = redis_client.xrange(keys.candidates_key("camB"))
    body = msgpack.unpackb(fields[FIELD.encode()], raw=False)
    assert set(body) == names(" ".join(r[0] for r in doc_table("`dfm:{CAM}:candidates` is a stream")))
    kept = cv2.imdecode(np.frombuffer(body["image"], np.uint8), cv2.IMREAD_GRAYSCALE)
    assert kept.shape == (24, 32) and kept[:, :16].mean() + 100 < kept[:, 16:].mean()
    assert (body["source"], body["user"], body["frame_id"]) == ("frame", "olga", f"camB:{frame_entry}")


def test_reviewing_something_that_is_not_a_raised_alarm_is_refused(redis_client) -> None:
    from dfm_stream.errors import ConsoleError

    cleared = publish_event(redis_client, EventMsg(type="cleared", camera="c", ts=1, frame_id="c:1-0"))
    for alarm_id in (cleared, "999-0", "not-an-id"):
        with pytest.raises(ConsoleError, match="no raised alarm"):
            review_alarm(redis_client, "dfm", alarm_id, "acknowledged", "olga")
    assert not redis_client.exists(keys.reviews_key())


# -- users file ----------------------------------------------------------------------------------


def test_add_user_stores_an_argon2_hash_readable_only_by_its_owner(procs, tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    add_users(users)
    text = users.read_text()
    data = json.loads(text)["users"]
    assert {n: u["role"] for n, u in data.items()} == {"olga": "operator", "vic": "viewer"}
    assert all(u["hash"].startswith("$argon2id$") for u in data.values())
    assert not any(p in text for p in PASSWORDS.values())
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600


# -- HTTP: read-only mode, login, roles, CSRF, audit ----------------------------------------------


def test_without_a_users_file_the_console_is_read_only_and_says_so(redis_url, redis_client, procs) -> None:
    alarm = raise_alarm(redis_client, "camA", "5-0")
    _, url = start_console(procs, redis_url)
    web = Browserless(url)
    status, html, headers = web.request("/alarms")
    assert status == 200 and "Read-only console" in html
    assert "Acknowledge" not in html
    assert "default-src 'self'" in headers["content-security-policy"]
    status, text, _ = web.request(
        f"/alarms/{alarm}/review", {"csrf_token": web.csrf("/"), "decision": "acknowledged"}
    )
    assert status == 403 and "read only" in text
    assert not redis_client.exists(keys.reviews_key())


def test_the_alarm_queue_is_newest_first_and_filters_by_camera_and_time(
    redis_url, redis_client, procs
) -> None:
    alarm = raise_alarm(redis_client, "camA", "5-0")
    other = raise_alarm(redis_client, "camB", "6-0")
    _, url = start_console(procs, redis_url)
    web = Browserless(url)
    newest_first = web.request("/alarms")[1]
    assert newest_first.index(other) < newest_first.index(alarm)
    only_b = web.request("/alarms?camera=camB")[1]
    assert other in only_b and alarm not in only_b
    assert alarm in web.request("/alarms?since=2000-01-01T00:00")[1]
    assert alarm not in web.request("/alarms?until=2000-01-01T00:00")[1]


def test_roles_csrf_and_the_audit_stream(redis_url, redis_client, procs, tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    add_users(users)
    alarm = raise_alarm(redis_client, "camA", "7-0")
    proc, url = start_console(procs, redis_url, users)

    anonymous = Browserless(url)
    status, _, headers = anonymous.request("/alarms")
    assert status == 303 and headers["location"].startswith("/login")
    status, _, _ = anonymous.request(
        "/login", {"csrf_token": anonymous.csrf(), "username": "olga", "password": "nope"}
    )
    assert status == 401

    viewer = Browserless(url)
    assert viewer.login("vic") == 303
    status, html, _ = viewer.request("/alarms")
    assert (
        status == 200 and alarm in html and "Acknowledge" not in html and "False alarm</button>" not in html
    )
    form = {"csrf_token": viewer.csrf("/alarms"), "decision": "acknowledged"}
    assert viewer.request(f"/alarms/{alarm}/review", form)[0] == 403

    operator = Browserless(url)
    assert operator.login("olga") == 303
    status, html, _ = operator.request("/alarms")
    assert "Acknowledge</button>" in html
    forged = {"decision": "false_alarm", "comment": "forged"}
    assert operator.request(f"/alarms/{alarm}/review", forged)[0] == 403
    assert operator.request(f"/alarms/{alarm}/review", {**forged, "csrf_token": "guess"})[0] == 403
    assert not redis_client.exists(keys.reviews_key())
    ok = {"csrf_token": operator.csrf("/alarms"), "decision": "acknowledged", "comment": "seen <b>it</b>"}
    status, _, headers = operator.request(f"/alarms/{alarm}/review", ok)
    assert status == 303 and headers["location"] == "/alarms"
    assert json.loads(redis_client.hget(keys.reviews_key(), "camA:7-0"))["user"] == "olga"
    queue = operator.request("/alarms")[1]
    assert "Acknowledged by olga: “seen &lt;b&gt;it&lt;/b&gt;”" in queue and "<b>it" not in queue

    audit = [msgpack.unpackb(f[FIELD.encode()], raw=False) for _, f in redis_client.xrange(keys.audit_key())]
    documented = names(" ".join(r[0] for r in doc_table("`dfm:audit` is a stream")))
    assert all(set(a) == documented for a in audit)
    seen = [(a["user"], a["action"], a["ok"]) for a in audit]
    assert ("olga", "login", False) in seen  # the wrong password
    assert ("vic", "review", False) in seen and ("olga", "review", False) in seen  # role, then CSRF
    assert ("olga", "acknowledged", True) in seen
    everything = json.dumps(audit) + procs.log(proc) + operator.request("/")[1] + viewer.request("/health")[1]
    assert not any(secret in everything for secret in (*PASSWORDS.values(), SECRET))


def test_assign_and_rollback_ask_for_confirmation(redis_url, redis_client, procs, tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    add_users(users)
    registry = ModelRegistry(redis_client)
    registry.push("bolts", tiny_artifact())
    registry.push("bolts", tiny_artifact(seed=1))
    _, url = start_console(procs, redis_url, users)
    web = Browserless(url)
    assert web.login("olga") == 303
    status, html, _ = web.request("/models")
    assert status == 200 and "bolts" in html and "current version 2" in html

    form = {"csrf_token": web.csrf("/models"), "camera": "camA", "model": "bolts@1"}
    status, html, _ = web.request("/models/assign", form)
    assert status == 200 and "camera camA: no model -&gt; bolts@1" in html and 'name="confirm"' in html
    assert registry.assignments() == {}
    assert web.request("/models/assign", {**form, "confirm": "yes"})[0] == 303
    assert registry.assignments() == {"camA": ModelRef("bolts", 1)}

    form = {"csrf_token": web.csrf("/models"), "name": "bolts", "version": "1"}
    status, html, _ = web.request("/models/rollback", form)
    assert status == 200 and "current version 2 -&gt; 1" in html
    assert registry.current("bolts") == 2
    assert web.request("/models/rollback", {**form, "confirm": "yes"})[0] == 303
    assert registry.current("bolts") == 1
    assert "current version 1" in web.request("/models")[1]


def test_the_console_section_of_a_config_file_sets_port_and_users(redis_url, procs, tmp_path: Path) -> None:
    from dfm_stream.config import load_config
    from dfm_stream.embedded_redis import free_port
    from dfm_stream.errors import ConfigError

    users = tmp_path / "users.json"
    add_users(users)
    port = free_port()
    config = tmp_path / "dfm.toml"
    config.write_text(f'[redis]\nurl = "{redis_url}"\n[console]\nport = {port}\nusers = "{users}"\n')
    assert load_config(config, env={}).console.port == port
    bad = tmp_path / "bad.toml"
    bad.write_text("[console]\nport = 70000\n")
    with pytest.raises(ConfigError, match="port=70000"):
        load_config(bad, env={})
    proc = procs.dfm("console", "--config", str(config), name="console-config")
    web = Browserless(f"http://127.0.0.1:{port}")

    def up() -> bool:
        try:
            return proc.poll() is not None or web.request("/healthz")[0] == 200
        except OSError:
            return False

    wait_until(up, 60, interval=0.3, what="the console on the config's port")
    assert proc.poll() is None, procs.log(proc)
    status, _, headers = web.request("/")
    assert status == 303 and headers["location"].startswith("/login")  # the users file is in force
    assert f"users from {users}" in procs.log(proc)


def test_a_camera_is_up_only_while_its_frames_keep_coming(redis_client) -> None:
    from dfm_stream.console.queries import camera_state

    up = {"state": "up"}
    assert camera_state(redis_client, "dfm", "camA", up)["up"] is False  # no frame at all
    redis_client.xadd(keys.frames_key("camA"), {"msg": b"x"}, id="1000-0")  # a frame from 1970
    old = camera_state(redis_client, "dfm", "camA", up)
    assert (old["up"], old["state"]) == (False, "stale")  # a reader that died without saying so
    push_frame(redis_client, "camA", np.zeros((8, 8, 3), np.uint8), 1)
    assert camera_state(redis_client, "dfm", "camA", up)["up"] is True
    assert camera_state(redis_client, "dfm", "camA", {"state": "down"})["up"] is False
    assert camera_state(redis_client, "dfm", "camA", {})["state"] == "frames flowing"


def audit_entries(client) -> list[dict]:
    return [msgpack.unpackb(f[FIELD.encode()], raw=False) for _, f in client.xrange(keys.audit_key())]


def test_the_camera_page_compares_the_shadow_candidate_and_operators_promote_and_roll_back(
    redis_url, redis_client, procs, tmp_path: Path
) -> None:
    users = tmp_path / "users.json"
    add_users(users)
    registry = ModelRegistry(redis_client)
    registry.push("bolts", tiny_artifact())
    registry.push("bolts", tiny_artifact(seed=1))
    registry.assign("camA", ModelRef("bolts", 1))
    promotions = Promotions(registry)
    promotions.shadow("camA", ModelRef("bolts", 2))
    ShadowPublisher(redis_client, keys.DEFAULT_PREFIX).write(shadow_msgs("camA", "bolts@1", "bolts@2"))
    _, url = start_console(procs, redis_url, users)

    viewer = Browserless(url)
    assert viewer.login("vic") == 303
    status, html, _ = viewer.request("/camera/camA")
    assert status == 200 and "Shadow candidate" in html
    assert "Candidate <strong>bolts@2</strong> vs live <strong>bolts@1</strong>" in html
    assert "<dt>Frames compared</dt><dd>4</dd>" in html and "50.00 %" in html
    assert "<code>camA:4-0</code> flagged by the candidate only" in html
    assert "<code>camA:3-0</code> flagged by the live model only" in html
    assert "Promote candidate" not in html and "Roll back camera" not in html
    refused = {"csrf_token": viewer.csrf("/camera/camA"), "confirm": "yes"}
    assert viewer.request("/camera/camA/promote", refused)[0] == 403
    assert viewer.request("/camera/camA/rollback", refused)[0] == 403

    operator = Browserless(url)
    assert operator.login("olga") == 303
    html = operator.request("/camera/camA")[1]
    assert "Promote candidate</button>" in html and "Roll back camera</button>" in html
    assert operator.request("/camera/camA/promote", {"confirm": "yes"})[0] == 403  # no CSRF token
    assert registry.assignments() == {"camA": ModelRef("bolts", 1)}
    form = {"csrf_token": operator.csrf("/camera/camA")}
    status, html, _ = operator.request("/camera/camA/promote", form)
    assert status == 200 and "camera camA: bolts@1 -&gt; bolts@2" in html and 'name="confirm"' in html
    assert 'name="candidate" value="bolts@2"' in html and promotions.shadow_of("camA") == ModelRef("bolts", 2)
    stale = {**form, "candidate": "bolts@1", "confirm": "yes"}  # the candidate changed since the confirmation
    assert operator.request("/camera/camA/promote", stale)[0] == 303
    assert registry.assignments() == {"camA": ModelRef("bolts", 1)}
    assert "not the bolts@1 you confirmed" in operator.request("/camera/camA")[1]
    confirmed = {**form, "candidate": "bolts@2", "confirm": "yes"}
    status, _, headers = operator.request("/camera/camA/promote", confirmed)
    assert status == 303 and headers["location"] == "/camera/camA"
    # exactly what `model promote --camera camA` does: pinned candidate live, shadowing stopped,
    # the earlier assignment recorded for `model rollback --camera`
    assert registry.assignments() == {"camA": ModelRef("bolts", 2)}
    assert promotions.shadows() == {}
    assert registry.previous_assignment("camA") == ModelRef("bolts", 1)
    html = operator.request("/camera/camA")[1]
    assert "Camera camA now runs bolts@2 (was bolts@1)." in html and "Shadow candidate" not in html

    status, _, _ = operator.request("/camera/camA/promote", {**form, "confirm": "yes"})
    assert status == 303 and registry.assignments() == {"camA": ModelRef("bolts", 2)}
    assert (
        "Not promoted: camera &#39;camA&#39; has no shadow candidate" in operator.request("/camera/camA")[1]
    )

    status, _, _ = operator.request("/camera/camB/rollback", {**form, "confirm": "yes"})
    assert (
        status == 303
        and "Not rolled back: camera &#39;camB&#39; has no recorded earlier"
        in (operator.request("/camera/camB")[1])
    )
    status, html, _ = operator.request("/camera/camA/rollback", form)
    assert status == 200 and "camera camA: bolts@2 -&gt; bolts@1" in html
    assert operator.request("/camera/camA/rollback", {**form, "confirm": "yes"})[0] == 303
    assert registry.assignments() == {"camA": ModelRef("bolts", 1)}

    seen = [(a["user"], a["action"], a["target"], a["ok"]) for a in audit_entries(redis_client)]
    assert ("vic", "promote", "", False) in seen and ("vic", "rollback_camera", "", False) in seen
    assert ("olga", "promote", "camA", True) in seen and ("olga", "promote", "camA", False) in seen
    assert ("olga", "rollback_camera", "camB", False) in seen
    assert ("olga", "rollback_camera", "camA", True) in seen
    done = [a["detail"] for a in audit_entries(redis_client) if a["ok"] and a["action"] != "login"]
    assert done == ["model bolts@2 (was bolts@1)", "model bolts@1 (was bolts@2)"]
