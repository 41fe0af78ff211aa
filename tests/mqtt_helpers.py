"""A Debian ``mosquitto`` broker on a free loopback port, and an independent subscriber (paho)."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from support import wait_until
from tools import require_tool

from dfm_stream.embedded_redis import free_port


def mosquitto_binary() -> str:
    """Return Debian's broker (in /usr/sbin, often not on a user's PATH); skip or fail when missing."""
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return require_tool("mosquitto")


class Broker:
    """``mosquitto`` with persistence (sessions survive a restart) on one port; stop/start repeatable."""

    def __init__(self, workdir: Path, users: dict[str, str] | None = None) -> None:
        self.exe = mosquitto_binary()
        self.port = free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            # as root, mosquitto would switch to its own user, which cannot write into pytest's tmp dirs
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
            f"persistence true\n"
            f"persistence_location {self.dir}/\nlog_dest file {self.dir}/mosquitto.log\n"
        )
        if users:  # only these users, with passwords hashed by Debian's mosquitto_passwd
            passwd = self.dir / "passwd"
            tool = require_tool("mosquitto_passwd")
            for i, (user, password) in enumerate(users.items()):
                args = [tool, "-b", *(["-c"] if i == 0 else []), str(passwd), user, password]
                subprocess.run(args, check=True, capture_output=True)
            text = self.conf.read_text().replace("allow_anonymous true", "allow_anonymous false")
            self.conf.write_text(text + f"password_file {passwd}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        wait_until(self._listening, 30, 0.05, what=f"mosquitto on port {self.port}")

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"mosquitto exited: {(self.dir / 'mosquitto.log').read_text(errors='replace')}"
            )
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its sessions
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class Subscriber:
    """An MQTT client outside the project: persistent session, QoS 1, keeps every message it gets."""

    def __init__(
        self,
        port: int,
        topic: str = "#",
        client_id: str = "test-subscriber",
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=False
        )
        if auth:
            self.client.username_pw_set(*auth)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def payloads(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]

    def json(self, topic: str) -> list[dict]:
        return [json.loads(p) for p in self.payloads(topic)]

    def wait(self, topic: str, predicate, timeout: float = 120, what: str = "") -> list[dict]:
        """Wait until ``predicate(json messages of topic)`` is true; return those messages."""
        wait_until(lambda: predicate(self.json(topic)), timeout, 0.05, what=what or topic)
        return self.json(topic)

    def publish(self, topic: str, payload: str | bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(30)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
