"""The public API and a reduced run of the fidelity CLI (real SmolLM2 weights, one short window)."""

import json

import pytest
import torch

from flashcache_sglang.api import gather_kept, select_tokens


def test_select_and_gather():
    keys, values = torch.randn(3, 200, 2, 16), torch.randn(3, 200, 2, 16)
    keep = select_tokens(keys, values, 0.25, sink_tokens=4, recent_window=16)
    mask = keep.shared_mask()
    assert int(mask.sum()) == 4 + 16 + round(0.25 * 180)
    kept = gather_kept(keys, values, keep)
    assert len(kept) == 3
    layer_keys, layer_values, index = kept[1]
    assert layer_keys.shape == (2, int(mask.sum()), 16)
    assert torch.equal(layer_keys[0], keys[1, index[0], 0])
    per_layer = select_tokens(keys, values, 0.25, granularity="layer", gamma=0.3)
    assert [k.shape[1] for k, _, _ in gather_kept(keys, values, per_layer)] == per_layer.num_kept[:, 0].tolist()


@pytest.mark.timeout(300)  # < 60 s on an idle 2-core machine
def test_fidelity_cli_reduced(tmp_path):
    models = pytest.importorskip("flashcache_sglang.testing.models")
    from benchmarks import fidelity

    out = tmp_path / "fidelity.json"
    report = fidelity.main([
        "--model", str(models.smollm2_dir()), "--text", "/usr/share/common-licenses/Apache-2.0",
        "--context", "128", "--continuation", "16", "--retention", "0.2", "--windows-per-text", "1",
        "--observation-window", "16", "--recent-window", "16", "--no-ablations",
        "--json", str(out), "--plot", str(tmp_path / "fidelity.png"),
    ])
    saved = json.loads(out.read_text())
    assert {row["policy"] for row in saved["main"]} >= {"flashcache", "snapkv", "streaming_llm"}
    assert all(row["ppl_ratio"]["mean"] > 0 for row in saved["main"])
    assert len(saved["energy"]["0.2"]["values"]) == 30
    assert (tmp_path / "fidelity.png").stat().st_size > 0
    assert set(report["targets"]["checks"]) >= {"below_streaming_llm", "within_3pct_of_snapkv"}
