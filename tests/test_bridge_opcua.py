"""``dfm-stream bridge --opcua``: an asyncua client browses the server, calls StartSingleJob on a
camera fed with a defective part and receives ResultReady with its MeasId and NG."""

import asyncio
import json
import math

import pytest
from asyncua import Client, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography.x509.oid import ExtendedKeyUsageOID
from inspection_helpers import warm_up, when_job_started, worker_thread
from support import wait_until
from worker_helpers import push_frame

from dfm_stream.bridge.opcua import NAMESPACE
from dfm_stream.embedded_redis import free_port

CAM = "line1"


class Events:
    """Subscription handler: keeps every ResultReady event's fields."""

    def __init__(self) -> None:
        self.events: list = []

    def event_notification(self, event) -> None:
        self.events.append(event.get_event_props_as_fields_dict())


async def camera_node(client: Client, camera: str):
    idx = await client.get_namespace_index(NAMESPACE)
    return await client.nodes.objects.get_child(
        [f"{idx}:VisionSystem", f"{idx}:Cameras", f"{idx}:{camera}"]
    ), idx


async def run_job(url: str, meas_id: str, part_id: str, security: tuple | None = None) -> dict:
    client = Client(url, timeout=30)
    if security:
        user, password, cert, key = security
        client.set_user(user)
        client.set_password(password)
        await client.set_security_string(f"Basic256Sha256,SignAndEncrypt,{cert},{key}")
    async with client:
        cam, idx = await camera_node(client, CAM)
        browsed = {(await n.read_browse_name()).Name for n in await cam.get_children()}
        handler = Events()
        sub = await client.create_subscription(50, handler)
        event_type = await client.nodes.root.get_child(
            ["0:Types", "0:EventTypes", "0:BaseEventType", f"{idx}:ResultReadyEventType"]
        )
        await sub.subscribe_events(cam, event_type)
        job_id = await cam.call_method(f"{idx}:StartSingleJob", meas_id, part_id)
        for _ in range(2400):
            if any(e.get("JobId") and e["JobId"].Value == job_id for e in handler.events):
                break
            await asyncio.sleep(0.05)
        event = next(e for e in handler.events if e["JobId"].Value == job_id)
        state, meas, part, score, body = await cam.call_method(f"{idx}:GetResultById", job_id)
        with pytest.raises(ua.UaStatusCodeError):
            await cam.call_method(f"{idx}:GetResultById", "no-such-result")
        last = await (await cam.get_child(f"{idx}:LastResultId")).read_value()
        system = await client.nodes.objects.get_child([f"{idx}:VisionSystem", f"{idx}:SystemState"])
        return {
            "job_id": job_id,
            "event": {
                k: v.Value
                for k, v in event.items()
                if k in ("MeasId", "PartId", "State", "Score", "ResultOk")
            },
            "get": (state, meas, part, score, body),
            "browsed": browsed,
            "last": last,
            "system": await system.read_value(),
        }


def start(procs, redis_url, endpoint, *extra):
    args = ["bridge", "--redis", redis_url, "--opcua", endpoint, "--cameras", CAM, "--job-timeout", "120"]
    return procs.dfm(*args, "--metrics-port", "-1", *extra, name="bridge")


def wait_serving(port: int) -> None:
    import socket

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(up, 120, 0.2, what="the OPC UA server")


def test_start_single_job_ends_in_result_ready_with_the_meas_id(
    redis_client, redis_url, procs, artifact, tmp_path
):
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/dfm/"
    with worker_thread(redis_url, artifact.path, [CAM]):
        warm_up(redis_client, CAM, artifact.good[0])
        bridge = start(procs, redis_url, url, "--opcua-anonymous", "--opcua-pki", str(tmp_path / "pki"))
        wait_serving(port)
        pusher = when_job_started(
            redis_client, CAM, lambda: push_frame(redis_client, CAM, artifact.defect[0], 1)
        )
        got = asyncio.run(run_job(url, "M-42", "P-7"))
        pusher.join(10)
        assert bridge.poll() is None, procs.log(bridge)
        assert procs.stop(bridge) == 0
    assert got["event"]["MeasId"] == "M-42" and got["event"]["PartId"] == "P-7"
    assert got["event"]["State"] == "ng" and got["event"]["ResultOk"] is False
    state, meas, part, score, body = got["get"]
    assert (
        (state, meas, part) == ("ng", "M-42", "P-7") and score > artifact.threshold and not math.isnan(score)
    )
    assert json.loads(body)["result_id"] == got["job_id"]
    assert got["last"] == got["job_id"]
    assert {"StartSingleJob", "GetResultById", "AlarmActive", "LastScore", "MeasId", "PartId"} <= got[
        "browsed"
    ]
    assert got["system"] == "Operational"
    assert (tmp_path / "pki" / "server-cert.der").exists()  # created on first start


def test_username_and_encryption_are_required_unless_anonymous_is_asked(
    redis_client, redis_url, procs, tmp_path
):
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/dfm/"
    users = tmp_path / "users"
    users.write_text("plc:s3cret\n")
    push_frame(redis_client, CAM, __import__("numpy").zeros((8, 8, 3), "uint8"), 0)  # the camera exists
    bridge = start(procs, redis_url, url, "--opcua-users", str(users), "--opcua-pki", str(tmp_path / "pki"))
    wait_serving(port)
    cert, key = tmp_path / "client-cert.der", tmp_path / "client-key.pem"
    asyncio.run(
        setup_self_signed_certificate(
            key,
            cert,
            "urn:test:client",
            "localhost",
            [ExtendedKeyUsageOID.CLIENT_AUTH],
            {"commonName": "test"},
        )
    )

    async def anonymous() -> None:
        async with Client(url, timeout=30) as client:
            await client.nodes.objects.get_children()

    with pytest.raises(Exception):  # noqa: B017 - refused one way or another: no such endpoint or token
        asyncio.run(anonymous())
    with pytest.raises(Exception):  # noqa: B017
        asyncio.run(run_job(url, "M", "P", ("plc", "wrong", cert, key)))
    got = asyncio.run(run_job(url, "M-1", "P-1", ("plc", "s3cret", cert, key)))
    assert got["event"]["State"] == "error" and got["get"][0] == "error"  # no worker: no frame, in time
    assert bridge.poll() is None, procs.log(bridge)
    assert procs.stop(bridge) == 0
