"""The camera-restart scenario that the HTTP and RTSP network-stream tests share."""

from collections.abc import Callable

import redis
from support import wait_until

from dfm_stream.config import CameraConfig
from dfm_stream.keys import alarms_key, frames_key
from dfm_stream.metrics import ReaderMetrics, new_registry
from dfm_stream.reader import Reader
from dfm_stream.wire import EventMsg, FrameMsg


def events(client: redis.Redis) -> list[EventMsg]:
    """Return every event on the alarm stream, oldest first."""
    return [EventMsg.from_bytes(f[b"msg"]) for _, f in client.xrange(alarms_key())]


def check_reader_survives_server_restart(
    client: redis.Redis,
    camera: str,
    source: str,
    kill_server: Callable[[], None],
    restart_server: Callable[[], None],
    while_up: Callable[[], None] = lambda: None,
) -> list[FrameMsg]:
    """Run a reader on ``source``; kill and restart its server; check events, metrics and frames.

    The reader must ingest 80x60 frames, report ``camera_down`` when the server dies and
    ``camera_up`` when it is back, flip ``dfm_camera_up``, count the reconnect, keep delivering,
    and keep one session with ``seq`` counting on. ``while_up`` runs once the first frames are in.
    Returns the frames written.
    """
    cam = CameraConfig(
        id=camera,
        source=source,
        size=(80, 60),
        read_timeout=2.0,
        open_timeout=5.0,
        backoff_initial=0.1,
        backoff_max=0.5,
    )
    registry = new_registry(process_metrics=False)
    reader = Reader([cam], client, metrics=ReaderMetrics.create(registry))
    reader.start()
    key = frames_key(camera)
    try:
        wait_until(lambda: client.xlen(key) >= 10, 30, what=f"frames from {source}")
        first = FrameMsg.from_bytes(client.xrange(key, count=1)[0][1][b"msg"])
        assert (first.w, first.h, first.camera) == (80, 60, camera)
        # the reader may have tried before the server had video (camera_down, then camera_up)
        start = events(client)
        assert start[-1].type == "camera_up"
        n0 = len(start)
        while_up()

        kill_server()
        wait_until(lambda: [e.type for e in events(client)[n0:]] == ["camera_down"], 20, what="camera_down")
        assert registry.get_sample_value("dfm_camera_up", {"camera": camera}) == 0
        before = client.xlen(key)

        restart_server()
        wait_until(
            lambda: [e.type for e in events(client)[n0:]] == ["camera_down", "camera_up"],
            30,
            what="camera_up after the server came back",
        )
        wait_until(lambda: client.xlen(key) >= before + 10, 30, what="frames after the reconnect")
        up = events(client)[-1]
        assert up.since_ts is not None and up.since_ts <= up.ts
        assert registry.get_sample_value("dfm_camera_up", {"camera": camera}) == 1
        assert registry.get_sample_value("dfm_reader_reconnects_total", {"camera": camera}) >= 1
    finally:
        reader.close()
    msgs = [FrameMsg.from_bytes(f[b"msg"]) for _, f in client.xrange(key)]
    assert [m.seq for m in msgs] == list(range(len(msgs))), "seq keeps counting across the reconnect"
    assert len({m.session for m in msgs}) == 1, "one reader session across the reconnect"
    return msgs
