"""The OPC UA adapter (asyncua server), modelled on the concepts of OPC 40100 (Machine Vision).

Address space (namespace ``urn:dfm-stream:machine-vision``), mapped to the specification's
concepts in ``docs/opcua.md``::

    Objects/VisionSystem                 object
        SystemState                      String: Preoperational | Operational | Halted | Error
        Cameras/<camera>                 object, one per camera
            AlarmActive, CameraUp, LastResultOk (Boolean), LastScore, Threshold (Double),
            ModelVersion, LastResultId, MeasId, PartId (String), FramesScored (UInt64)
            StartSingleJob(MeasId, PartId) -> JobId
            GetResultById(ResultId) -> State, MeasId, PartId, Score, ResultJson
    ResultReadyEventType                 event (BaseEventType), emitted by the camera object

Security: Basic256Sha256 Sign&Encrypt with a certificate created on first start (or given) and
username/password users (``--opcua-users FILE``, lines ``user:password``); ``--opcua-anonymous``
adds the unencrypted anonymous endpoint, only when asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncua import Server, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography.x509.oid import ExtendedKeyUsageOID

from dfm_stream import keys
from dfm_stream.bridge.core import Adapter, Bridge
from dfm_stream.errors import BridgeError
from dfm_stream.inspection import Job, JobRequest
from dfm_stream.wire import ResultMsg

if TYPE_CHECKING:
    from asyncua.server.internal_server import InternalServer

log = logging.getLogger(__name__)

NAMESPACE = "urn:dfm-stream:machine-vision"
STATES = ("Preoperational", "Operational", "Halted", "Error")
_KEEP_RESULTS = 1000
_REFRESH_S = 1.0
_CAMERA_VARS = {
    "AlarmActive": (False, ua.VariantType.Boolean),
    "CameraUp": (False, ua.VariantType.Boolean),
    "LastResultOk": (False, ua.VariantType.Boolean),
    "LastScore": (0.0, ua.VariantType.Double),
    "Threshold": (0.0, ua.VariantType.Double),
    "ModelVersion": ("", ua.VariantType.String),
    "FramesScored": (0, ua.VariantType.UInt64),
    "LastResultId": ("", ua.VariantType.String),
    "MeasId": ("", ua.VariantType.String),
    "PartId": ("", ua.VariantType.String),
}
_EVENT_FIELDS = [
    ("ResultId", ua.VariantType.String),
    ("JobId", ua.VariantType.String),
    ("CameraId", ua.VariantType.String),
    ("MeasId", ua.VariantType.String),
    ("PartId", ua.VariantType.String),
    ("State", ua.VariantType.String),
    ("ResultOk", ua.VariantType.Boolean),
    ("Score", ua.VariantType.Double),
    ("Threshold", ua.VariantType.Double),
    ("ModelVersion", ua.VariantType.String),
    ("Reason", ua.VariantType.String),
]


@dataclass
class OpcuaSettings:
    """Endpoint and security of the OPC UA server."""

    endpoint: str
    cameras: list[str]
    anonymous: bool = False
    users_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    pki_dir: str = "opcua-pki"


def read_users(path: str) -> dict[str, str]:
    """Return ``{user: password}`` from a file of ``user:password`` lines (``#`` comments)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise BridgeError(f"--opcua-users: cannot read {path}: {e}") from e
    users = {}
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.strip().partition(":")
        if not sep or not user or not password:
            raise BridgeError(f"--opcua-users {path}:{n}: expected user:password")
        users[user] = password
    return users


class _Users(UserManager):
    def __init__(self, users: dict[str, str], anonymous: bool) -> None:
        self.users = users
        self.anonymous = anonymous

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is None:
            return User(role=UserRole.User) if self.anonymous else None
        if self.users.get(username) == password and password is not None:
            return User(role=UserRole.User)
        return None


class OpcuaAdapter(Adapter):
    """An OPC UA server: camera variables, StartSingleJob, GetResultById, ResultReady events."""

    protocol = "opcua"

    def __init__(self, settings: OpcuaSettings) -> None:
        if not settings.cameras:
            raise BridgeError("--opcua needs the cameras: --opcua-cameras or --cameras")
        if not settings.endpoint.startswith("opc.tcp://"):
            raise BridgeError(f"--opcua: expected opc.tcp://HOST:PORT[/PATH], got {settings.endpoint!r}")
        self.users = read_users(settings.users_file) if settings.users_file else {}
        if not self.users and not settings.anonymous:
            raise BridgeError("--opcua needs users (--opcua-users FILE) or --opcua-anonymous")
        self.settings = settings
        self.bridge: Bridge | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Server | None = None
        self.nodes: dict[str, dict[str, Any]] = {}
        self.results: OrderedDict[str, ResultMsg] = OrderedDict()
        self._events: dict[str, Any] = {}
        self._state_node: Any = None
        self._serving = threading.Event()
        self._done: asyncio.Event | None = None
        self._lock = threading.Lock()
        self._states: dict[str, dict[str, Any]] = {}

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, bridge: Bridge) -> None:
        """Serve in a thread of its own (asyncua is asyncio)."""
        self.bridge = bridge
        threading.Thread(target=self._thread, name="opcua", daemon=True).start()

    def _thread(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._serve())
        except Exception as e:
            log.error("opcua: cannot serve on %s: %s", self.settings.endpoint, e)
            self._serving.clear()

    async def _serve(self) -> None:
        self._done = asyncio.Event()
        server = Server(user_manager=_Users(self.users, self.settings.anonymous))
        await server.init()
        server.set_endpoint(self.settings.endpoint)
        server.set_server_name("dfm-stream vision system")
        await self._security(server)
        idx = await server.register_namespace(NAMESPACE)
        await self._build(server, idx)
        self.server = server
        async with server:
            self._serving.set()
            log.info("opcua: serving on %s for %s", self.settings.endpoint, ", ".join(self.settings.cameras))
            while not self._done.is_set():
                await self._refresh()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done.wait(), _REFRESH_S)

    async def _refresh(self) -> None:
        """Write the system state and the camera states that changed since the last refresh."""
        try:
            await self._state_node.write_value(await asyncio.to_thread(self._system_state))
            with self._lock:
                states, self._states = self._states, {}
            for camera, state in states.items():
                await self._write_state(camera, state)
        except Exception as e:  # the next refresh tries again
            log.warning("opcua: state refresh failed: %s", e)

    async def _security(self, server: Server) -> None:
        policies = [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt]
        tokens: list[type] = [ua.UserNameIdentityToken] if self.users else []
        if self.settings.anonymous:
            policies.append(ua.SecurityPolicyType.NoSecurity)
            tokens.append(ua.AnonymousIdentityToken)
        server.set_security_policy(policies)
        server.set_identity_tokens(tokens)
        pki = Path(self.settings.pki_dir)
        cert = Path(self.settings.cert_file) if self.settings.cert_file else pki / "server-cert.der"
        key = Path(self.settings.key_file) if self.settings.key_file else pki / "server-key.pem"
        if not self.settings.cert_file:  # created on first start, reused after
            pki.mkdir(parents=True, exist_ok=True)
            host = socket.gethostname()
            await setup_self_signed_certificate(
                key,
                cert,
                f"urn:{host}:dfm-stream:bridge",
                host,
                [ExtendedKeyUsageOID.SERVER_AUTH],
                {"commonName": "dfm-stream bridge", "organizationName": "dfm-stream"},
            )
            await server.set_application_uri(f"urn:{host}:dfm-stream:bridge")
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))

    async def _build(self, server: Server, idx: int) -> None:
        system = await server.nodes.objects.add_object(idx, "VisionSystem")
        self._state_node = await system.add_variable(
            idx, "SystemState", "Preoperational", ua.VariantType.String
        )
        event_type = await server.create_custom_event_type(
            idx, "ResultReadyEventType", ua.ObjectIds.BaseEventType, _EVENT_FIELDS
        )
        folder = await system.add_folder(idx, "Cameras")
        for camera in self.settings.cameras:
            obj = await folder.add_object(idx, camera)
            self.nodes[camera] = {
                name: await obj.add_variable(idx, name, value, vtype)
                for name, (value, vtype) in _CAMERA_VARS.items()
            }
            await obj.add_method(
                idx,
                "StartSingleJob",
                self._method(camera, self._start_single_job),
                [ua.VariantType.String, ua.VariantType.String],
                [ua.VariantType.String],
            )
            await obj.add_method(
                idx,
                "GetResultById",
                self._method(camera, self._get_result),
                [ua.VariantType.String],
                [ua.VariantType.String] * 3 + [ua.VariantType.Double, ua.VariantType.String],
            )
            self._events[camera] = await server.get_event_generator(event_type, obj.nodeid)

    def stop(self) -> None:
        """Say Halted, stop serving."""
        if self.loop is not None and self._done is not None and self._serving.is_set():
            self._run(self._state_node.write_value("Halted"))
            self.loop.call_soon_threadsafe(self._done.set)
        self._serving.clear()

    def connected(self) -> bool:
        """Return True while serving."""
        return self._serving.is_set()

    # -- methods ----------------------------------------------------------------------------------

    def _method(self, camera: str, handler: Any) -> Any:
        async def call(parent: Any, *args: ua.Variant) -> list[ua.Variant]:
            try:
                return await handler(camera, *(a.Value for a in args))
            except ua.UaStatusCodeError:
                raise
            except Exception as e:  # a bad call must never stop the server
                log.warning("opcua: method on %s failed: %s", camera, e)
                raise ua.UaStatusCodeError(ua.StatusCodes.BadInvalidArgument) from e

        return call

    async def _start_single_job(self, camera: str, meas_id: Any, part_id: Any) -> list[ua.Variant]:
        assert self.bridge is not None
        if not isinstance(meas_id, str) or not isinstance(part_id, str):
            self.bridge.count_bad_request(self.protocol, "bad_request")
            raise ua.UaStatusCodeError(ua.StatusCodes.BadInvalidArgument)
        request = JobRequest(
            camera,
            part_id=part_id,
            meas_id=meas_id,
            source="opcua",
            timeout_s=self.bridge.settings.job_timeout_s,
        )
        started = await asyncio.to_thread(self.bridge.start_job, request)
        job_id = started.job_id if isinstance(started, Job) else started.result_id
        return [ua.Variant(job_id, ua.VariantType.String)]

    async def _get_result(self, camera: str, result_id: Any) -> list[ua.Variant]:
        result = self.results.get(result_id) if isinstance(result_id, str) else None
        if result is None or result.camera != camera:
            raise ua.UaStatusCodeError(ua.StatusCodes.BadNotFound)
        s = ua.VariantType.String
        body = json.dumps(result.to_json_dict(), sort_keys=True)
        return [
            ua.Variant(result.state, s),
            ua.Variant(result.meas_id, s),
            ua.Variant(result.part_id, s),
            ua.Variant(result.score if result.score is not None else float("nan"), ua.VariantType.Double),
            ua.Variant(body, s),
        ]

    # -- from the bridge --------------------------------------------------------------------------

    def _run(self, coro: Any, timeout: float = 10) -> bool:
        if self.loop is None or not self._serving.is_set():
            coro.close()
            return False
        try:
            asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)
        except Exception as e:
            log.warning("opcua: update failed: %s", e)
            return False
        return True

    def deliver_result(self, result: ResultMsg) -> bool:
        """Update the camera's variables and emit ResultReady; True once emitted."""
        if result.camera not in self.nodes:
            return True
        self.results[result.result_id] = result
        while len(self.results) > _KEEP_RESULTS:
            self.results.popitem(last=False)
        return self._run(self._emit(result))

    async def _emit(self, result: ResultMsg) -> None:
        nodes = self.nodes[result.camera]
        await nodes["LastResultOk"].write_value(result.state == "ok")
        await nodes["LastResultId"].write_value(result.result_id)
        await nodes["MeasId"].write_value(result.meas_id)
        await nodes["PartId"].write_value(result.part_id)
        if result.score is not None:
            await nodes["LastScore"].write_value(float(result.score))
        gen = self._events[result.camera]
        values = {
            "ResultId": result.result_id,
            "JobId": result.job_id,
            "CameraId": result.camera,
            "MeasId": result.meas_id,
            "PartId": result.part_id,
            "State": result.state,
            "ResultOk": result.state == "ok",
            "Score": float(result.score) if result.score is not None else float("nan"),
            "Threshold": float(result.threshold) if result.threshold is not None else float("nan"),
            "ModelVersion": result.model or "",
            "Reason": result.reason or "",
        }
        for name, value in values.items():
            setattr(gen.event, name, value)
        gen.event.Message = ua.LocalizedText(f"{result.camera}: {result.state} ({result.part_id})")
        gen.event.Severity = 100 if result.state == "ok" else 700
        await gen.trigger()

    def camera_state(self, camera: str, state: dict[str, Any]) -> None:
        """Keep the camera's state; the server's loop writes it into the variables (once a second)."""
        if camera in self.nodes:
            with self._lock:
                self._states[camera] = state

    async def _write_state(self, camera: str, state: dict[str, Any]) -> None:
        nodes = self.nodes[camera]
        await nodes["AlarmActive"].write_value(bool(state["alarm_active"]))
        await nodes["CameraUp"].write_value(bool(state["camera_up"]))
        await nodes["FramesScored"].write_value(int(state["frames_scored"]), ua.VariantType.UInt64)
        if state["last_score"] is not None:
            await nodes["LastScore"].write_value(float(state["last_score"]))
        if state["threshold"] is not None:
            await nodes["Threshold"].write_value(float(state["threshold"]))
        await nodes["ModelVersion"].write_value(state["model"] or "")

    def _system_state(self) -> str:
        """Error: Redis unreachable; Operational: a worker is alive; else Preoperational."""
        assert self.bridge is not None
        try:
            pattern = keys.worker_heartbeat_key("*", self.bridge.settings.prefix)
            worker = next(iter(self.bridge.client.scan_iter(match=pattern, count=100)), None)
        except Exception:
            return "Error"
        return "Operational" if worker is not None else "Preoperational"
