"""Runs a benchmark CLI as a user would (``python -m benchmarks.<name>``) for the smoke tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_benchmark():
    """``run_benchmark("serving", ["--quick"], timeout=780)`` -> CompletedProcess (stdout + stderr)."""

    def run(module: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        process = subprocess.Popen([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()  # SIGTERM: the CLI stops its server's process group on the way out
            output, _ = process.communicate(timeout=60)
            pytest.fail(f"benchmarks.{module} did not finish in {timeout:.0f} s:\n{output[-4000:]}")
        return subprocess.CompletedProcess(process.args, process.returncode, output, "")

    return run
