"""A loopback RTSP server for tests (GStreamer's gst-rtsp-server through python3-gi).

Runs under the SYSTEM python3 (python3-gi is a Debian package, not in the venv):

    /usr/bin/python3 tests/streaming/rtsp_server.py --port 8554 --path /test [--file video.mp4]

Without --file it serves an endless generated test pattern (videotestsrc, 160x120 at 10 fps,
H.264). Prints "READY rtsp://127.0.0.1:PORT/PATH" once it listens; stop it with SIGTERM.
"""

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/test")
    parser.add_argument("--file", default=None)
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    if args.file:
        launch = (
            f'( filesrc location="{args.file}" ! qtdemux ! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )'
        )
    else:
        launch = (
            "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=160,height=120,framerate=10/1 "
            "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 "
            "! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )"
        )
    factory.set_launch(launch)
    factory.set_shared(True)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1
    loop = GLib.MainLoop()
    signal.signal(signal.SIGTERM, lambda *_: loop.quit())
    print(f"READY rtsp://127.0.0.1:{args.port}{args.path}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
