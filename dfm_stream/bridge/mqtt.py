"""The MQTT adapter (paho-mqtt 2): events, camera state, part results and job requests.

Topics (``{prefix}`` is ``--mqtt-prefix``, default ``dfm``), payloads in ``docs/schemas/``:

* ``{prefix}/available``: ``online`` / ``offline``, retained; ``offline`` is also the last will;
* ``{prefix}/events``: every alarm and health event as JSON, with ``event_id`` (its ``dfm:alarms``
  entry id), QoS ``--mqtt-qos`` (default 1);
* ``{prefix}/{camera}/state``: retained JSON of the camera's state, when it changes;
* ``{prefix}/{camera}/result``: every part result as JSON; ``{prefix}/{camera}/snapshot``: the
  worst frame's JPEG of an ``ng`` result;
* ``{prefix}/{camera}/inspect/set``: a JSON ``{meas_id, part_id, frames | window_ms}`` starts a job;
* ``{prefix}/{camera}/scores``: per-frame scores, only with ``--mqtt-scores`` (at most
  ``--mqtt-scores-rate`` per second and camera).

An event or result counts as delivered when the broker acknowledged every message it became
(PUBACK for QoS 1, PUBCOMP for QoS 2; QoS 0 when it was written to the socket).
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt

from dfm_stream import keys
from dfm_stream.bridge.core import Adapter, Bridge
from dfm_stream.errors import BridgeError
from dfm_stream.inspection import DEFAULT_TIMEOUT_S, JobRequest
from dfm_stream.wire import SCHEMA_VERSION, EventMsg, ResultMsg, ScoreMsg

log = logging.getLogger(__name__)

PUBACK_TIMEOUT_S = 10.0
PROTOCOLS = {"3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}


@dataclass
class MqttSettings:
    """Where the broker is and how to talk to it."""

    url: str
    prefix: str = "dfm"
    qos: int = 1
    protocol: str = "5"
    client_id: str = field(default_factory=lambda: f"dfm-bridge-{socket.gethostname()}")
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    scores: bool = False
    scores_rate: float = 1.0
    keepalive_s: int = 30

    def endpoint(self) -> tuple[str, int, bool, str | None, str | None]:
        """Return ``(host, port, tls, username, password)`` from the URL and the password file."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise BridgeError(f"--mqtt: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {self.url!r}")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as e:
            raise BridgeError(f"--mqtt: bad port in {self.url!r}") from e
        username = self.username or (unquote(parts.username) if parts.username else None)
        password = unquote(parts.password) if parts.password else None
        if self.password_file:
            try:
                password = Path(self.password_file).read_text().strip()
            except OSError as e:
                raise BridgeError(f"--mqtt-password-file: cannot read {self.password_file}: {e}") from e
        return parts.hostname, port, tls, username, password


class MqttAdapter(Adapter):
    """Publishes to an MQTT broker and takes job requests from it."""

    protocol = "mqtt"

    def __init__(self, settings: MqttSettings) -> None:
        if settings.qos not in (0, 1, 2):
            raise BridgeError(f"--mqtt-qos must be 0, 1 or 2, got {settings.qos}")
        if settings.protocol not in PROTOCOLS:
            raise BridgeError(
                f"--mqtt-protocol must be one of {sorted(PROTOCOLS)}, got {settings.protocol!r}"
            )
        self.settings = settings
        self.host, self.port, tls, username, password = settings.endpoint()
        self.wants_scores = settings.scores
        self.bridge: Bridge | None = None
        self._connected = threading.Event()
        self._requests: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=1000)
        self._last_score: dict[str, float] = {}
        p = settings.prefix
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=PROTOCOLS[settings.protocol],
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(
                ca_certs=settings.ca_file, certfile=settings.cert_file, keyfile=settings.key_file
            )
        self.client.will_set(f"{p}/available", "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(1, 5)
        self.client.max_queued_messages_set(10_000)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, bridge: Bridge) -> None:
        """Connect in the background (paho reconnects by itself) and take job requests."""
        self.bridge = bridge
        threading.Thread(target=self._request_loop, name="mqtt-requests", daemon=True).start()
        log.info("mqtt: connecting to %s:%d (prefix %r)", self.host, self.port, self.settings.prefix)
        self.client.connect_async(self.host, self.port, keepalive=self.settings.keepalive_s)
        self.client.loop_start()

    def stop(self) -> None:
        """Say ``offline`` (retained) and disconnect."""
        self._requests.put(None)
        if self._connected.is_set():
            info = self.client.publish(f"{self.settings.prefix}/available", "offline", qos=1, retain=True)
            _wait(info, 5)
        self.client.disconnect()
        self.client.loop_stop()

    def connected(self) -> bool:
        """Return True while connected to the broker."""
        return self._connected.is_set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt: broker refused the connection: %s", reason)
            return
        p = self.settings.prefix
        client.publish(f"{p}/available", "online", qos=1, retain=True)
        client.subscribe(f"{p}/+/inspect/set", qos=1)
        self._connected.set()
        log.info("mqtt: connected to %s:%d", self.host, self.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._connected.is_set():
            log.warning("mqtt: disconnected (%s); reconnecting", reason)
        self._connected.clear()

    # -- delivery ---------------------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes | str, retain: bool = False) -> bool:
        """Publish and wait for the broker's acknowledgement; False when it did not come."""
        if not self._connected.is_set():
            return False
        info = self.client.publish(topic, payload, qos=self.settings.qos, retain=retain)
        return _wait(info, PUBACK_TIMEOUT_S)

    def deliver_event(self, event_id: str, event: EventMsg) -> bool:
        """Publish to ``{prefix}/events``; True once the broker acknowledged it."""
        body = {"v": SCHEMA_VERSION, "event_id": event_id, **event.to_json_dict()}
        return self._publish(f"{self.settings.prefix}/events", json.dumps(body, sort_keys=True))

    def deliver_result(self, result: ResultMsg) -> bool:
        """Publish to ``{prefix}/{camera}/result`` (and ``snapshot`` when NG); True once acknowledged."""
        if not keys.valid_name(result.camera):
            log.info("mqtt: error result for invalid camera id %r not published", result.camera)
            return True
        base = f"{self.settings.prefix}/{result.camera}"
        if not self._publish(f"{base}/result", json.dumps(result.to_json_dict(), sort_keys=True)):
            return False
        if result.state == "ng" and result.image is not None:
            return self._publish(f"{base}/snapshot", result.image)
        return True

    def camera_state(self, camera: str, state: dict[str, Any]) -> None:
        """Publish the retained ``{prefix}/{camera}/state``."""
        if self._connected.is_set():
            payload = json.dumps({"v": SCHEMA_VERSION, **state}, sort_keys=True)
            self.client.publish(f"{self.settings.prefix}/{camera}/state", payload, qos=1, retain=True)

    def score(self, score: ScoreMsg) -> None:
        """Publish a per-frame score (QoS 0), at most ``scores_rate`` per second and camera."""
        now = time.monotonic()
        rate = self.settings.scores_rate
        if not self._connected.is_set() or (
            rate > 0 and now - self._last_score.get(score.camera, -1e9) < 1 / rate
        ):
            return
        self._last_score[score.camera] = now
        body = {k: v for k, v in score.__dict__.items()}
        self.client.publish(
            f"{self.settings.prefix}/{score.camera}/scores", json.dumps({"v": SCHEMA_VERSION, **body}), qos=0
        )

    # -- job requests -----------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:  # never block the network thread: jobs start on the request thread
            self._requests.put_nowait((message.topic, bytes(message.payload)))
        except queue.Full:
            log.warning("mqtt: too many job requests queued; %s dropped", message.topic)
            if self.bridge is not None:
                self.bridge.count_bad_request(self.protocol, "overloaded")

    def _request_loop(self) -> None:
        while (item := self._requests.get()) is not None:
            topic, payload = item
            try:
                self._handle_request(topic, payload)
            except Exception as e:  # a bad request must never stop the bridge
                log.exception("mqtt: request on %s failed: %s", topic, e)

    def _handle_request(self, topic: str, payload: bytes) -> None:
        assert self.bridge is not None
        camera = topic.split("/")[-3]
        request = parse_request(camera, payload, self.bridge.settings.job_timeout_s)
        started = self.bridge.start_job(request)
        log.info("mqtt: job on %s for part %r: %s", camera, request.part_id, getattr(started, "job_id", ""))


def parse_request(camera: str, payload: bytes, timeout_s: float = DEFAULT_TIMEOUT_S) -> JobRequest:
    """Turn an ``inspect/set`` payload into a job request; a malformed one becomes a bad request.

    A request that is not a JSON object with string (or integer) ids is marked ``invalid``: the
    inspector refuses it with reason ``bad_request``, so the caller still receives an error result.
    """
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return JobRequest(camera, part_id="", source="mqtt", invalid="the request is not valid JSON")
    if not isinstance(body, dict):
        return JobRequest(camera, part_id="", source="mqtt", invalid="the request is not a JSON object")
    ids = {k: body.get(k, "") for k in ("meas_id", "part_id")}
    if not all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in ids.values()):
        invalid = "meas_id and part_id must be strings or integers"
        return JobRequest(camera, part_id="", source="mqtt", invalid=invalid)
    return JobRequest(
        camera,
        part_id=str(ids["part_id"]),
        meas_id=str(ids["meas_id"]),
        frames=body.get("frames"),
        window_ms=body.get("window_ms"),
        timeout_s=body.get("timeout_s", timeout_s),
        source="mqtt",
    )


def _wait(info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        return False
    try:
        info.wait_for_publish(timeout)
    except (ValueError, RuntimeError):  # not queued, or the connection went away
        return False
    return info.is_published()
