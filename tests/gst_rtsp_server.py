"""A tiny RTSP server on loopback for tests, built on GStreamer's gst-rtsp-server.

Run it with the SYSTEM Python (``/usr/bin/python3``: Debian's ``python3-gi`` and
``gir1.2-gst-rtsp-server-1.0`` live there, not in the project's venv)::

    /usr/bin/python3 tests/gst_rtsp_server.py --port 8554 --rtp-port 5004 --path /cam

It serves ``rtsp://127.0.0.1:PORT/PATH`` (RTP over UDP or interleaved in the RTSP TCP
connection, as the client asks) and prints ``setup <Transport header>`` for every SETUP, so a test
can check which transport its client chose. The video comes from a publisher that sends H.264 in RTP to
``udp://127.0.0.1:RTP_PORT``, e.g. ``ffmpeg ... -c:v libx264 -f rtp rtp://127.0.0.1:RTP_PORT``;
the server re-packetises it for each RTSP client, so one camera feed serves every client.

It prints ``ready`` once listening, exits 0 on SIGTERM/SIGINT, and exits 3 with a message when
GStreamer or the RTSP server bindings are missing, 4 when the port cannot be bound.
"""

import argparse
import signal
import sys

CAPS = "application/x-rtp,media=video,clock-rate=90000,encoding-name=H264,payload=96"


def _watch_setups(_server: object, client: object, gst_rtsp: object) -> None:
    def on_setup(_client: object, ctx: object) -> None:
        field = gst_rtsp.RTSPHeaderField.TRANSPORT  # type: ignore[attr-defined]
        _res, transport = ctx.request.get_header(field, 0)  # type: ignore[attr-defined]
        print(f"setup {transport}", flush=True)

    client.connect("setup-request", on_setup)  # type: ignore[attr-defined]


def main() -> int:
    """Serve one mount until SIGTERM/SIGINT; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="RTSP port on 127.0.0.1")
    parser.add_argument("--rtp-port", type=int, required=True, help="UDP port the publisher sends RTP to")
    parser.add_argument("--path", default="/cam", help="mount path (default /cam)")
    args = parser.parse_args()
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtsp", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GLib, Gst, GstRtsp, GstRtspServer
    except (ImportError, ValueError) as e:
        print(
            f"gst-rtsp-server is not available ({e}): apt-get install python3-gi gir1.2-gst-rtsp-server-1.0",
            file=sys.stderr,
        )
        return 3
    Gst.init(None)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f'( udpsrc address=127.0.0.1 port={args.rtp_port} caps="{CAPS}" '
        "! rtph264depay ! rtph264pay name=pay0 pt=96 config-interval=-1 )"
    )
    factory.set_shared(True)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    server.get_mount_points().add_factory(args.path, factory)
    server.connect("client-connected", _watch_setups, GstRtsp)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 4
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"ready rtsp://127.0.0.1:{args.port}{args.path}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
