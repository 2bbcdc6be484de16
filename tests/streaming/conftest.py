"""Fixtures for the streaming tests: generated videos, a real Redis, a real RTSP server.

Redis: FLASHCACHE_TEST_REDIS_URL (CI starts redis-server), else a redis-server started here on
a free loopback port, else the Redis tests skip with the reason. RTSP: GStreamer's server
under the system python3 (tests/streaming/rtsp_server.py), else the RTSP tests skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flashcache_sglang.testing.server import free_port

HERE = Path(__file__).resolve().parent
SYSTEM_PYTHON = "/usr/bin/python3"


def make_video(path: Path, seconds: float, size: str = "320x240", rate: int = 10, pattern: str = "testsrc") -> Path:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (apt-get install ffmpeg)")
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"{pattern}=size={size}:rate={rate}",
         "-t", str(seconds), "-pix_fmt", "yuv420p", "-c:v", "libx264", str(path)],
        check=True, timeout=60,
    )
    return path


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    short = make_video(folder / "short.mp4", 6)
    long = make_video(folder / "long.mp4", 20, size="160x120")
    corrupt = folder / "corrupt.mp4"
    corrupt.write_bytes(short.read_bytes()[:4000])
    garbage = folder / "garbage.mp4"
    garbage.write_bytes(os.urandom(20000))
    return {"short": short, "long": long, "corrupt": corrupt, "garbage": garbage}


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    url = os.environ.get("FLASHCACHE_TEST_REDIS_URL")
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no FLASHCACHE_TEST_REDIS_URL and no redis-server binary (apt-get install redis-server)")
    port = free_port()
    pidfile = tmp_path_factory.mktemp("redis") / "redis.pid"
    subprocess.run(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "yes", "--pidfile", str(pidfile)],
        check=True, timeout=30,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    try:
        os.kill(int(pidfile.read_text().strip()), 15)
    except (OSError, ValueError):
        pass


@pytest.fixture
def namespace() -> str:
    """A fresh Redis namespace per test (tests share one Redis)."""
    return "test-" + uuid.uuid4().hex[:12]


class RtspServer:
    """A GStreamer RTSP server subprocess on a fixed loopback port that can be restarted."""

    def __init__(self, port: int, file: Path | None = None):
        self.port = port
        self.file = file
        self.url = f"rtsp://127.0.0.1:{port}/test"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [SYSTEM_PYTHON, str(HERE / "rtsp_server.py"), "--port", str(self.port)]
        if self.file is not None:
            command += ["--file", str(self.file)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"RTSP server did not start: {line!r} {self.process.stderr.read()[:500]!r}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # a crash, not a clean shutdown
            self.process.wait(10)
        self.process = None


def _gst_available() -> str | None:
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} not found"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"],
        capture_output=True, text=True, timeout=30,
    )
    if probe.returncode != 0:
        return "GStreamer RTSP server unavailable (apt-get install gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gi ...)"
    return None


@pytest.fixture
def rtsp_server():
    reason = _gst_available()
    if reason:
        pytest.skip(reason)
    server = RtspServer(free_port())
    server.start()
    yield server
    server.stop()


def venv_python() -> str:
    return sys.executable
