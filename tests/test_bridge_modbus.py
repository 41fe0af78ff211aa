"""``dfm-stream bridge --modbus``: a pymodbus client runs the PLC handshake against the bridge.

trigger -> busy -> result ready -> read OK/NG and score -> acknowledge; a trigger while busy and a
write to a read-only register get clear error answers, are counted, and never stop the bridge.
"""

import urllib.request

import pytest
from inspection_helpers import warm_up, worker_thread
from pymodbus.client import ModbusTcpClient
from support import wait_until
from worker_helpers import push_frame

from dfm_stream import keys
from dfm_stream.bridge.modbus import (
    ACK,
    BLOCK,
    BUSY,
    ERROR_CODE,
    ERROR_CODES,
    FRAMES,
    PART_ID,
    READY,
    RESULT_COUNT,
    RESULT_MEAS_ID,
    RESULT_NG,
    RESULT_OK,
    RESULT_PART_ID,
    RESULT_READY,
    SCORE,
    THRESHOLD,
    TRIGGER,
)
from dfm_stream.embedded_redis import free_port

CAMS = ["cam0", "line1"]  # line1 owns the second block


def block(client: ModbusTcpClient, index: int) -> list[int]:
    reply = client.read_holding_registers(index * BLOCK, count=BLOCK, device_id=1)
    assert not reply.isError(), reply
    return reply.registers


def metric(port: int, line_start: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line_start)]
    return values[0] if values else 0.0


def test_a_plc_runs_trigger_ready_result_acknowledge(redis_client, redis_url, procs, artifact):
    port, metrics_port = free_port(), free_port()
    base = BLOCK  # line1
    with worker_thread(redis_url, artifact.path, ["line1"]):
        warm_up(redis_client, "line1", artifact.good[0])
        args = ["bridge", "--redis", redis_url, "--modbus", f"127.0.0.1:{port}", "--cameras", ",".join(CAMS)]
        bridge = procs.dfm(*args, "--metrics-port", str(metrics_port), "--job-timeout", "120", name="bridge")
        plc = ModbusTcpClient("127.0.0.1", port=port, timeout=10)
        wait_until(plc.connect, 120, 0.2, what="the bridge's Modbus server")
        assert block(plc, 1)[READY] == 1
        assert not plc.write_registers(base + PART_ID, [4711, 12, 1], device_id=1).isError()
        assert not plc.write_register(base + TRIGGER, 1, device_id=1).isError()
        wait_until(lambda: redis_client.exists(keys.job_lock_key("line1")), 120, 0.02, what="the job")
        assert block(plc, 1)[BUSY] == 1
        assert not plc.write_register(base + TRIGGER, 1, device_id=1).isError()  # a second trigger
        busy = wait_until(lambda: block(plc, 1)[ERROR_CODE] == ERROR_CODES["busy"], 60, what="busy")
        refused = plc.write_register(base + RESULT_OK, 1, device_id=1)  # read-only
        outside = plc.read_holding_registers(len(CAMS) * BLOCK, count=1, device_id=1)
        push_frame(redis_client, "line1", artifact.defect[0], 1)
        regs = wait_until(lambda: (r := block(plc, 1))[RESULT_READY] == 1 and r, 120, what="result ready")
        assert not plc.write_register(base + ACK, 1, device_id=1).isError()
        after = wait_until(lambda: (r := block(plc, 1))[RESULT_READY] == 0 and r, 30, what="acknowledged")
        counted = metric(
            metrics_port, 'dfm_bridge_bad_requests_total{protocol="modbus",reason="read_only_register"}'
        )
        assert bridge.poll() is None, procs.log(bridge)
        plc.close()
        assert procs.stop(bridge) == 0
    assert busy and refused.isError() and refused.exception_code == 2 and outside.isError()
    assert (regs[RESULT_OK], regs[RESULT_NG], regs[ERROR_CODE], regs[BUSY], regs[READY]) == (0, 1, 0, 0, 1)
    assert (regs[RESULT_PART_ID], regs[RESULT_MEAS_ID], regs[FRAMES], regs[RESULT_COUNT]) == (4711, 12, 1, 1)
    assert regs[SCORE] > regs[THRESHOLD] == round(artifact.threshold * 1000)
    assert (after[RESULT_NG], after[ACK], after[TRIGGER]) == (0, 0, 0)
    assert counted == 1
    assert [r.part_id for r in _results(redis_client)] == ["4711"]


def _results(client):
    from dfm_stream.wire import FIELD, ResultMsg

    return [ResultMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.results_key("line1"))]


@pytest.mark.parametrize("value", ["localhost", "host:port", ":70000"])
def test_a_bad_modbus_address_is_a_clear_error(value):
    from dfm_stream.bridge.modbus import parse_hostport
    from dfm_stream.errors import BridgeError

    with pytest.raises(BridgeError, match="HOST:PORT"):
        parse_hostport(value)
