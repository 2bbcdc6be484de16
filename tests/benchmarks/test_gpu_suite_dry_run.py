"""The GPU pack (benchmarks/run_gpu_suite.sh) dry-runs on CPU, so it cannot rot between GPU loans.

The dry run takes the same path as the device command: the offline install, the kernel tests'
collection, both benchmarks through the project's public kernels API with tiny shapes under
TRITON_INTERPRET (the paged decode kernel is checked against its float32 reference on the way),
the summary JSON and the file set a device call brings back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(400)
def test_gpu_suite_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "FLASHCACHE_GPU_SUITE_RESULTS": str(tmp_path),
           "OUT": str(tmp_path / "out")}
    (tmp_path / "out").mkdir()
    out = subprocess.run(["bash", "benchmarks/run_gpu_suite.sh", "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=380)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    slug = "cpu-dry-run"
    summary = json.loads((tmp_path / f"gpu_suite_{slug}.json").read_text())
    assert summary["dry_run"] and summary["gpu"] == slug
    for stage in ("install", "tests", "compress", "decode"):
        assert summary["stages"][stage]["status"] == "ok", summary["stages"]
    assert summary["stages"]["engine"]["status"].startswith("skipped: sglang 0.5.23 is a cp311-only wheel")
    assert "cpu_model" in summary["machine"]
    kernels = json.loads((tmp_path / f"kernels_{slug}_paper.json").read_text())
    assert [row["num_tokens"] for row in kernels["results"]] == [63]
    assert {"engine", "stream", "triton_stages", "floor"} <= set(kernels["results"][0])
    decode = json.loads((tmp_path / f"decode_attention_{slug}.json").read_text())
    (case,) = decode["cases"]
    assert case["kept_tokens"] < case["full_tokens"]
    assert set(case["speedup"]) == {"triton_paged", "sdpa_dense", "gather_sdpa"}
    assert case["full"]["max_abs_error"] < 2e-4 and case["kept"]["max_abs_error"] < 2e-4
    brought_back = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert brought_back == sorted([f"gpu_suite_{slug}.json", f"gpu_suite_{slug}.log", f"kernel_tests_{slug}.xml",
                                   f"kernels_{slug}_paper.json", f"decode_attention_{slug}.json"])
    assert len(brought_back) <= 8  # what a device call brings back from $OUT
