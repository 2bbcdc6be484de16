"""A real SGLang HTTP server in its own process group, for tests, examples and benchmarks.

SGLang SIGKILLs its whole process tree when one of its children dies, so an engine must never
live inside the test process: :class:`SGLangServer` starts ``launch_server`` as a separate
session, waits for ``/health_generate``, and stops it by process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import requests

from .. import cpu_compat
from ..stats import STATS_FILE_ENV, read_stats

CPU_ARGS = ("--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
            "--sampling-backend", "pytorch", "--grammar-backend", "none", "--dtype", "float32")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerDied(RuntimeError):
    pass


class SGLangServer:
    """``with SGLangServer(model_dir, flashcache={"retention": 0.2}) as server: server.generate(...)``.

    Args:
        model_path: HF model directory.
        flashcache: None for vanilla SGLang; else ``--flashcache-*`` settings by name
            (``{"retention": 0.2, "candidates": "text"}``).
        extra_args: more SGLang flags.
        max_total_tokens: KV pool size in tokens (equal pools make vanilla/flashcache comparable).
        env: extra environment variables for the server processes.
    """

    def __init__(self, model_path: str | os.PathLike, *, flashcache: Optional[dict] = None,
                 extra_args: Sequence[str] = (), max_total_tokens: int = 16384,
                 env: Optional[dict] = None, startup_timeout: float = 300.0,
                 log_dir: Optional[str | os.PathLike] = None) -> None:
        self.model_path = str(model_path)
        self.flashcache = flashcache
        self.extra_args = list(extra_args)
        self.max_total_tokens = max_total_tokens
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="flashcache-server-", dir=log_dir))
        self.log_path = self.workdir / "server.log"
        self.stats_path = self.workdir / "stats.json"
        self.dump_dir = self.workdir / "kept"
        self.process: Optional[subprocess.Popen] = None

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        args = ["--model-path", self.model_path, "--host", "127.0.0.1", "--port", str(self.port),
                "--max-total-tokens", str(self.max_total_tokens), "--log-level", "info",
                "--skip-server-warmup"]
        if cpu_compat.needed():
            args += [a for a in CPU_ARGS]
        args += self.extra_args
        if self.flashcache is None:
            return [sys.executable, "-m", "sglang.launch_server", *args]
        for name, value in self.flashcache.items():
            args += [f"--flashcache-{name.replace('_', '-')}", str(value)]
        return [sys.executable, "-m", "flashcache_sglang.launch_server", *args]

    def start(self) -> "SGLangServer":
        env = cpu_compat.environment()
        env.update({STATS_FILE_ENV: str(self.stats_path), "FLASHCACHE_DUMP_DIR": str(self.dump_dir),
                    "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerDied(f"SGLang server exited with {self.process.returncode} during start-up:\n"
                                 + self.log_tail())
            try:
                if requests.get(f"{self.url}/health_generate", timeout=30).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"SGLang server not healthy after {self.startup_timeout:.0f} s:\n" + self.log_tail())

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)

    def __enter__(self) -> "SGLangServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ requests
    def generate(self, text: Optional[str] = None, *, input_ids: Optional[list[int]] = None,
                 max_new_tokens: int = 16, timeout: float = 600.0, **fields: Any) -> dict:
        """POST /generate with greedy sampling unless ``sampling_params`` says otherwise."""
        sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
        sampling.update(fields.pop("sampling_params", {}))
        body: dict[str, Any] = {"sampling_params": sampling, **fields}
        if input_ids is not None:
            body["input_ids"] = input_ids
        else:
            body["text"] = text
        response = requests.post(f"{self.url}/generate", json=body, timeout=timeout)
        if response.status_code != 200:
            if not self.alive():
                raise ServerDied("SGLang server died:\n" + self.log_tail())
            raise RuntimeError(f"/generate returned {response.status_code}: {response.text[:2000]}")
        return response.json()

    def flush_cache(self) -> None:
        response = requests.post(f"{self.url}/flush_cache", timeout=60)
        response.raise_for_status()

    def stats(self) -> dict:
        """FlashCache counters and pool state written by the scheduler process."""
        return read_stats(self.stats_path)

    def kept_positions(self, rid: str) -> dict:
        import json

        return json.loads((self.dump_dir / f"{rid}.json").read_text())
