"""Rolling dynamic budgets (pure logic)."""

import random

import pytest

from flashcache_sglang.streaming.budget import (
    BudgetSettings,
    MemoryEntry,
    RollingBudget,
    chunk_retention,
    plan_shrink,
)


def test_retention_follows_energy_and_is_clamped():
    settings = BudgetSettings(base_retention=0.3, min_retention=0.05, max_retention=0.9)
    assert chunk_retention(0.2, 0.2, settings) == pytest.approx(0.3)
    assert chunk_retention(0.4, 0.2, settings) == pytest.approx(0.6)
    assert chunk_retention(0.1, 0.2, settings) == pytest.approx(0.15)
    assert chunk_retention(10.0, 0.2, settings) == 0.9
    assert chunk_retention(0.0, 0.2, settings) == 0.05
    fixed = BudgetSettings(energy_exponent=0.0)
    assert chunk_retention(0.9, 0.1, fixed) == pytest.approx(fixed.base_retention)


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"kv_cap_tokens": 0}, "kv_cap_tokens"),
        ({"base_retention": 1.5}, "base_retention"),
        ({"min_retention": 0.0}, "min_retention"),
        ({"shrink_to": 0.0}, "shrink_to"),
        ({"age_decay": 1.2}, "age_decay"),
        ({"min_tokens_per_chunk": -1}, "min_tokens_per_chunk"),
    ],
    ids=["cap0", "retention>1", "min0", "shrink0", "decay>1", "mintokens<0"],
)
def test_bad_settings_name_the_value(fields, name):
    with pytest.raises(ValueError, match=name):
        BudgetSettings(**fields)


def test_from_dict_rejects_unknown_names():
    with pytest.raises(ValueError, match="kv_cap"):
        BudgetSettings.from_dict({"kv_cap": 3})
    assert BudgetSettings.from_dict({"kv_cap_tokens": 7}).kv_cap_tokens == 7


def test_no_shrink_below_cap():
    entries = [MemoryEntry(i, 100, 30, 0.2) for i in range(3)]
    plan = plan_shrink(entries, 30, 0.2, BudgetSettings(kv_cap_tokens=200))
    assert plan.is_empty and plan.incoming_kept == 30 and plan.total_kept == 120


@pytest.mark.parametrize("cap", [63, 97, 500, 4096])
@pytest.mark.parametrize("keep_sink", [True, False], ids=["sink", "nosink"])
def test_shrink_invariants(cap, keep_sink):
    settings = BudgetSettings(kv_cap_tokens=cap, keep_sink=keep_sink, min_tokens_per_chunk=2)
    rng = random.Random(cap)
    budget = RollingBudget(settings)
    sink_kept = None
    for index in range(300):
        energy = rng.uniform(0.0, 0.6)
        logical = rng.choice([34, 50, 110])
        wanted = max(1, round(logical * budget.retention_for(energy)))
        before = {e.index: e.kept_tokens for e in budget.entries}
        plan = budget.admit(index, logical, wanted, energy)
        assert budget.kept_tokens <= cap, f"chunk {index}: kept {budget.kept_tokens} > cap {cap}"
        assert plan.incoming_kept <= wanted
        for idx, new in plan.new_kept.items():
            assert new <= before[idx], "a shrink never grows a chunk"
        if index == 0:
            sink_kept = budget.entries[0].kept_tokens
        if keep_sink and sink_kept is not None and sink_kept < settings.shrink_to * cap:
            assert budget.entries[0].index == 0 and budget.entries[0].kept_tokens == sink_kept
    assert budget.logical_tokens > cap * 3, "the stream ran well past the cap"
    assert len(budget.entries) <= cap // settings.min_tokens_per_chunk + 1


def test_high_energy_chunks_keep_more_when_shrunk():
    settings = BudgetSettings(kv_cap_tokens=100, keep_sink=False, age_decay=1.0, min_tokens_per_chunk=0)
    entries = [MemoryEntry(0, 100, 40, 0.8), MemoryEntry(1, 100, 40, 0.1)]
    plan = plan_shrink(entries, 40, 0.45, settings)
    assert plan.total_kept <= 100
    assert plan.new_kept[1] < plan.new_kept.get(0, 40)


def test_admit_rejects_out_of_order_chunks():
    budget = RollingBudget(BudgetSettings())
    budget.admit(3, 10, 5, 0.1)
    with pytest.raises(ValueError, match="chunk index 3"):
        budget.admit(3, 10, 5, 0.1)
