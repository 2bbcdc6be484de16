"""The re-basing fidelity benchmark runs end to end on SmolLM2 (real weights) at a tiny size."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_rebase_fidelity_runs_both_arms_on_a_tiny_window(tmp_path):
    output = tmp_path / "rebase.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.rebase_fidelity", "--windows", "1", "--context", "256",
                             "--continuation", "32", "--chunk", "64", "--cap", "48", "--output", str(output)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    summary = report["summary"]
    for arm in ("ppl_ratio_logical", "ppl_ratio_rebased"):
        assert summary[arm]["n"] == 1 and summary[arm]["mean"] > 0.9  # compressed: no better than the full cache by much
    assert summary["rebased_over_logical"]["mean"] > 0
