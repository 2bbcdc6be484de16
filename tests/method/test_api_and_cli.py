"""The public API and a reduced run of the fidelity CLI (real SmolLM2 weights, one short window)."""

import json

import pytest
import torch

from flashcache_sglang.api import RotarySpec, gather_kept, select_tokens


def test_select_and_gather():
    keys, values = torch.randn(3, 200, 2, 16), torch.randn(3, 200, 2, 16)
    rope = dict(positions=torch.arange(200), rotary=RotarySpec.default_rope(16, 10000.0, 256))
    with pytest.raises(ValueError, match="needs positions and rotary"):
        select_tokens(keys, values, 0.25)
    paper = select_tokens(keys, values, 0.25, policy="flashcache-paper")
    assert int(paper.shared_mask().sum()) == 4 + 64 + round(0.25 * 132)
    keep = select_tokens(keys, values, 0.25, sink_tokens=4, recent_window=16, **rope)
    mask = keep.shared_mask()
    assert int(mask.sum()) == 4 + 16 + round(0.25 * 180)
    kept = gather_kept(keys, values, keep)
    assert len(kept) == 3
    layer_keys, layer_values, index = kept[1]
    assert layer_keys.shape == (2, int(mask.sum()), 16)
    assert torch.equal(layer_keys[0], keys[1, index[0], 0])
    per_layer = select_tokens(keys, values, 0.25, granularity="layer", gamma=0.3, **rope)
    assert [k.shape[1] for k, _, _ in gather_kept(keys, values, per_layer)] == per_layer.num_kept[:, 0].tolist()


@pytest.mark.timeout(600)  # ~2 min on an idle 2-core machine
def test_fidelity_cli_reduced(tmp_path):
    models = pytest.importorskip("flashcache_sglang.testing.models")
    from benchmarks import fidelity

    out = tmp_path / "fidelity.json"
    report = fidelity.main([
        "--model", str(models.smollm2_dir()), "--text", "/usr/share/common-licenses/Apache-2.0",
        "--held-out-text", "pydoc-topics", "--context", "128", "--continuation", "16",
        "--retention", "0.2", "--variant-retention", "0.2", "--windows-per-text", "2",
        "--observation-window", "16", "--recent-window", "16",
        "--json", str(out), "--plot", str(tmp_path / "fidelity.png"),
    ])
    saved = json.loads(out.read_text())
    assert [w["split"] for w in saved["windows"]] == ["tune", "tune", "held_out", "held_out"]
    main = saved["analysis"]["rows"]["main"]
    assert {row["policy"] for row in main} == set(fidelity.MAIN_POLICIES)
    for row in main:
        summary = row["held_out"]["ppl_ratio"]
        assert summary["n"] == 2 and summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1]
    # raw per-window numbers are kept, and --reanalyze recomputes the same statistics from them
    assert all(len(values) == 4 for values in saved["runs"].values())
    again = fidelity.main(["--reanalyze", str(out), "--json", str(tmp_path / "again.json")])
    assert again["analysis"]["comparisons"] == saved["analysis"]["comparisons"]
    labels = {row["label"] for row in saved["analysis"]["rows"]["variants"]}
    assert {"key_space=post_rope", "recency + random content", "granularity=head"} <= labels
    kv_rows = {row["label"]: row for row in saved["analysis"]["rows"]["kv_dtype"]}
    assert {"full cache, bf16 KV", "full cache, fp8_e4m3 KV", "flashcache, fp8_e4m3 KV"} <= set(kv_rows)
    assert abs(kv_rows["full cache, bf16 KV"]["all"]["ppl_ratio"]["mean"] - 1.0) < 0.05
    assert (tmp_path / "fidelity.png").stat().st_size > 0
    assert report["targets"]["split"] == "held_out"
    assert set(report["targets"]["checks"]) >= {"r0.2: significantly below streaming_llm", "r0.2: within 3% of snapkv"}


def test_paired_statistics():
    from benchmarks.fidelity import _paired, _summary

    summary = _summary([1.0, 1.2, 1.4])
    assert summary["mean"] == pytest.approx(1.2) and summary["ci95"][0] < 1.0 < summary["ci95"][1]
    lower = _paired([1.0 + i / 100 for i in range(12)], [1.2 + i / 50 for i in range(12)])
    assert lower["wins"] == 12 and lower["wilcoxon_p"] < 0.01 and lower["significantly_lower"]
    same = _paired([1.1, 1.2, 1.3], [1.1, 1.2, 1.3])
    assert same["wilcoxon_p"] == 1.0 and not same["significantly_lower"]
