"""The Modbus TCP adapter (pymodbus server): the trigger/ready/result/acknowledge handshake.

Each camera of ``--modbus-cameras`` (default ``--cameras``), in that order, owns a block of
:data:`BLOCK` holding registers starting at ``index * BLOCK`` (protocol addresses, 0-based; the
register table is in ``docs/modbus.md``). The PLC writes the part id (and meas id, frames), then
``1`` into TRIGGER; the bridge starts a job (BUSY = 1, READY = 0), and when its result arrives sets
RESULT_OK or RESULT_NG, SCORE (x 1000), ERROR_CODE and RESULT_READY = 1. The PLC reads them and
writes ``1`` into ACK, which clears RESULT_READY, OK, NG. Writes to read-only registers or
addresses outside the blocks are refused with Modbus exception 02 (illegal data address) and
counted; they never stop the bridge.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.server import ModbusTcpServer

from dfm_stream.bridge.core import Adapter, Bridge
from dfm_stream.errors import BridgeError
from dfm_stream.inspection import Job, JobRequest, result_error_code
from dfm_stream.wire import ResultMsg

log = logging.getLogger(__name__)

BLOCK = 16
TRIGGER, PART_ID, MEAS_ID, FRAMES = 0, 1, 2, 3
READY, BUSY, RESULT_READY, RESULT_OK, RESULT_NG, SCORE, ERROR_CODE, ACK = 4, 5, 6, 7, 8, 9, 10, 11
RESULT_PART_ID, RESULT_MEAS_ID, THRESHOLD, RESULT_COUNT = 12, 13, 14, 15
WRITABLE = frozenset({TRIGGER, PART_ID, MEAS_ID, FRAMES, ACK})
ERROR_CODES = {
    None: 0,
    "bad_request": 1,
    "unknown_camera": 2,
    "busy": 3,
    "no_frame": 4,
    "redis_error": 5,
}
"""ERROR_CODE register values (0: no error); any other error reason is 9."""
_READ_FC, _WRITE_FC = (3, 4), (6, 16, 23)


def parse_hostport(value: str) -> tuple[str, int]:
    """Return ``(host, port)`` of ``HOST:PORT`` (``:PORT`` binds every interface)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise BridgeError(f"--modbus: expected HOST:PORT, got {value!r}")
    return host or "0.0.0.0", int(port)


class _Registers(ModbusServerContext):
    """The register blocks, answering pymodbus directly (``old_simulator`` path: no datastore copy)."""

    def __init__(self, adapter: ModbusAdapter) -> None:  # no super(): its datastore is not used
        self.adapter = adapter
        self.old_simulator = True
        self.simdevices = []

    def device_ids(self) -> list[int]:
        return [0]

    async def async_getValues(  # noqa: N802 - pymodbus' name
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | ExcCodes:
        if func_code not in _READ_FC + _WRITE_FC:  # a write is answered with what was stored
            return ExcCodes.ILLEGAL_FUNCTION
        return self.adapter.read(address, count)

    async def async_setValues(  # noqa: N802 - pymodbus' name
        self, device_id: int, func_code: int, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        if func_code not in _WRITE_FC:
            return ExcCodes.ILLEGAL_FUNCTION
        return await asyncio.to_thread(self.adapter.write, address, [int(v) for v in values])


class ModbusAdapter(Adapter):
    """A Modbus TCP server whose holding registers run part jobs."""

    protocol = "modbus"

    def __init__(self, hostport: str, cameras: list[str]) -> None:
        if not cameras:
            raise BridgeError("--modbus needs the cameras in a fixed order: --modbus-cameras or --cameras")
        self.host, self.port = parse_hostport(hostport)
        self.cameras = list(cameras)
        self.regs = [0] * (BLOCK * len(cameras))
        self.jobs: dict[str, str] = {}
        self.bridge: Bridge | None = None
        self._lock = threading.Lock()
        self._serving = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ModbusTcpServer | None = None
        for i in range(len(cameras)):
            self.regs[i * BLOCK + READY] = 1

    def start(self, bridge: Bridge) -> None:
        """Serve in a thread of its own (pymodbus is asyncio)."""
        self.bridge = bridge
        threading.Thread(target=self._serve, name="modbus", daemon=True).start()

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()

        async def run() -> None:
            self._server = ModbusTcpServer(_Registers(self), address=(self.host, self.port))
            await self._server.serve_forever(background=True)
            self._serving.set()
            log.info("modbus: serving on %s:%d for %s", self.host, self.port, ", ".join(self.cameras))
            await self._server.serving  # until shutdown()

        try:
            self._loop.run_until_complete(run())
        except Exception as e:
            log.error("modbus: cannot serve on %s:%d: %s", self.host, self.port, e)
            self._serving.clear()

    def stop(self) -> None:
        """Stop serving."""
        if self._loop is not None and self._server is not None and self._serving.is_set():
            future = asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop)
            try:
                future.result(10)
            except Exception as e:  # stopping anyway
                log.warning("modbus: shutdown: %s", e)
        self._serving.clear()

    def connected(self) -> bool:
        """Return True while serving."""
        return self._serving.is_set()

    # -- registers --------------------------------------------------------------------------------

    def read(self, address: int, count: int) -> list[int] | ExcCodes:
        """Return ``count`` registers from ``address`` (exception 02 outside the blocks)."""
        if address < 0 or count < 1 or address + count > len(self.regs):
            return ExcCodes.ILLEGAL_ADDRESS
        with self._lock:
            return self.regs[address : address + count]

    def write(self, address: int, values: list[int]) -> ExcCodes | None:
        """Store a PLC write and act on TRIGGER / ACK; refuse read-only registers."""
        span = range(address, address + len(values))
        if address < 0 or span.stop > len(self.regs) or any(a % BLOCK not in WRITABLE for a in span):
            log.warning("modbus: refused write to %s (read-only or outside the blocks)", list(span))
            if self.bridge is not None:
                self.bridge.count_bad_request(self.protocol, "read_only_register")
            return ExcCodes.ILLEGAL_ADDRESS
        if any(not 0 <= v <= 0xFFFF for v in values):
            return ExcCodes.ILLEGAL_VALUE
        with self._lock:
            self.regs[address : span.stop] = values
        for a, v in zip(span, values, strict=True):
            if a % BLOCK == TRIGGER and v == 1:
                self._trigger(a // BLOCK)
            elif a % BLOCK == ACK and v == 1:
                self._acknowledge(a // BLOCK)
        return None

    def _trigger(self, index: int) -> None:
        base, camera = index * BLOCK, self.cameras[index]
        with self._lock:
            self.regs[base + TRIGGER] = 0
            busy = self.regs[base + BUSY] == 1
            part, meas, frames = (self.regs[base + r] for r in (PART_ID, MEAS_ID, FRAMES))
        if busy:
            self._set(base, {ERROR_CODE: ERROR_CODES["busy"]})
            if self.bridge is not None:
                self.bridge.count_bad_request(self.protocol, "busy")
            return
        self._set(base, {BUSY: 1, READY: 0, RESULT_READY: 0, RESULT_OK: 0, RESULT_NG: 0, ERROR_CODE: 0})
        assert self.bridge is not None
        request = JobRequest(
            camera, part_id=str(part), meas_id=str(meas), frames=frames or None, source="modbus"
        )
        started = self.bridge.start_job(request)
        if isinstance(started, Job):
            with self._lock:
                self.jobs[camera] = started.job_id
        else:  # refused at the start: this trigger's answer
            self._show(base, started)

    def _acknowledge(self, index: int) -> None:
        self._set(index * BLOCK, {ACK: 0, RESULT_READY: 0, RESULT_OK: 0, RESULT_NG: 0})

    def _set(self, base: int, values: dict[int, int]) -> None:
        with self._lock:
            for offset, value in values.items():
                self.regs[base + offset] = value

    def deliver_result(self, result: ResultMsg) -> bool:
        """Show the result of a job this adapter started (others are not the PLC's handshake)."""
        if result.source != "modbus" or result.camera not in self.cameras:
            return True
        with self._lock:
            mine = self.jobs.get(result.camera) == result.job_id
        if mine:
            self._show(self.cameras.index(result.camera) * BLOCK, result)
        return True

    def _show(self, base: int, result: ResultMsg) -> None:
        with self._lock:
            count = self.regs[base + RESULT_COUNT]
        code = result_error_code(result)
        self._set(
            base,
            {
                RESULT_OK: int(result.state == "ok"),
                RESULT_NG: int(result.state == "ng"),
                SCORE: _scaled(result.score),
                THRESHOLD: _scaled(result.threshold),
                ERROR_CODE: ERROR_CODES.get(code, 9),
                RESULT_PART_ID: _u16(result.part_id),
                RESULT_MEAS_ID: _u16(result.meas_id),
                RESULT_COUNT: (count + 1) & 0xFFFF,
                BUSY: 0,
                READY: 1,
                RESULT_READY: 1,
            },
        )


def _scaled(value: float | None) -> int:
    """Return ``value`` x 1000 as an unsigned 16-bit register (0 when None, clipped at 65535)."""
    if value is None:
        return 0
    return max(0, min(0xFFFF, round(value * 1000)))


def _u16(text: str) -> int:
    return int(text) & 0xFFFF if text.isdigit() else 0
