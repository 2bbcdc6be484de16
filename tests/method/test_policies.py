"""One matrix over every registered policy: exact budgets, protection, shapes, bad input."""

import pytest
import torch

from flashcache_sglang.kernels.rotary import RotarySpec, apply_rotary_reference
from flashcache_sglang.method.scoring import frequency_scores
from flashcache_sglang.policies import (
    GRANULARITIES,
    FlashCachePolicy,
    KVSpan,
    available_policies,
    engine_policies,
    make_policy,
    text_candidate_mask,
)

POLICIES = available_policies()
SHAPES = [  # (num_layers, num_tokens, num_kv_heads, head_dim, num_heads, window)
    (3, 97, 2, 16, 4, 16),
    (2, 500, 1, 60, 3, 64),
    (4, 63, 3, 8, 3, 8),
]
RETENTIONS = [1.0, 0.5, 0.2, 0.05]


def _span(shape, candidate_mask=None, seed=0, with_frames=False):
    layers, tokens, kv_heads, head_dim, heads, window = shape
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, tokens, kv_heads, head_dim, generator=generator)
    values = torch.randn(layers, tokens, kv_heads, head_dim, generator=generator)
    queries = torch.randn(layers, window, heads, head_dim, generator=generator)
    if candidate_mask is None:
        candidate_mask = text_candidate_mask(tokens, 4, window)
    frames = (torch.arange(tokens) // 7) if with_frames else None
    return KVSpan(keys, values, candidate_mask, queries=queries, frame_index=frames,
                  positions=torch.arange(tokens), rotary=_rope(head_dim))


def _rope(head_dim):
    return RotarySpec.default_rope(head_dim, 10000.0, 1024)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("retention", RETENTIONS, ids=[f"r{r}" for r in RETENTIONS])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"L{s[0]}N{s[1]}H{s[2]}D{s[3]}" for s in SHAPES])
@pytest.mark.parametrize("name", POLICIES)
def test_exact_budget_and_protection(name, shape, retention, granularity):
    span = _span(shape, with_frames=name == "uniform_frames")
    keep_set = make_policy(name, retention=retention, granularity=granularity).select(span)
    layers, tokens, kv_heads = shape[0], shape[1], shape[2]
    assert keep_set.keep.shape == (layers, kv_heads, tokens) and keep_set.keep.dtype == torch.bool
    budget = round(retention * span.num_candidates)
    kept = keep_set.num_kept_candidates
    assert int(kept.sum()) == budget * layers * kv_heads, "total must be exact"
    if not name.startswith("flashcache") or granularity == "shared":
        assert bool((kept == budget).all()), kept
    assert bool((kept == kept[:, :1]).all()), "heads of one layer keep the same count"
    protected = ~span.candidate_mask
    assert bool(keep_set.keep[:, :, protected].all()), "a protected token was dropped"
    if granularity == "shared":
        assert keep_set.shared_mask().shape == (tokens,)


@pytest.mark.parametrize("name", POLICIES)
def test_arbitrary_candidate_mask(name):
    shape = SHAPES[0]
    mask = torch.zeros(shape[1], dtype=torch.bool)
    mask[10:80:3] = True  # e.g. scattered visual tokens between text
    span = _span(shape, candidate_mask=mask, with_frames=True)
    keep_set = make_policy(name, retention=0.3).select(span)
    shared = keep_set.shared_mask()
    assert bool(shared[~mask].all())
    assert int(shared[mask].sum()) == round(0.3 * int(mask.sum()))


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("retention", [0.0, -0.5, 1.5, float("nan")])
def test_bad_retention(name, retention):
    with pytest.raises(ValueError, match=r"retention must be in \(0, 1\], got"):
        make_policy(name, retention=retention)


@pytest.mark.parametrize("name", POLICIES)
def test_bad_granularity_and_empty_candidates(name):
    with pytest.raises(ValueError, match="'per_token'"):
        make_policy(name, granularity="per_token")
    span = _span(SHAPES[0], candidate_mask=torch.zeros(97, dtype=torch.bool))
    with pytest.raises(ValueError, match="candidate set is empty"):
        make_policy(name).select(span)


def test_bad_span_shapes():
    keys = torch.randn(2, 10, 2, 8)
    with pytest.raises(ValueError, match=r"values shape \(2, 9, 2, 8\)"):
        KVSpan(keys, torch.randn(2, 9, 2, 8), torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"candidate_mask must be torch.bool \[num_tokens=10\]"):
        KVSpan(keys, keys, torch.ones(11, dtype=torch.bool))
    with pytest.raises(ValueError, match="keys must be"):
        KVSpan(keys[0], keys[0], torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="queries must be"):
        KVSpan(keys, keys, torch.ones(10, dtype=torch.bool), queries=torch.randn(2, 4, 3, 8))


def test_registry():
    with pytest.raises(ValueError, match="valid policies: .*flashcache"):
        make_policy("h2o_typo")
    assert {"flashcache", "flashcache-paper", "flashcache_no_dba", "streaming_llm", "random", "knorm",
            "snapkv", "tova", "uniform_frames"} <= set(POLICIES)
    assert "snapkv" not in engine_policies() and "flashcache" in engine_policies()
    for name in POLICIES:
        assert make_policy(name).name == name


@pytest.mark.parametrize("name", [n for n in POLICIES if make_policy(n).needs_queries])
def test_attention_policies_need_queries(name):
    span = _span(SHAPES[0])
    span.queries = None
    with pytest.raises(ValueError, match="needs span.queries"):
        make_policy(name).select(span)


@pytest.mark.parametrize("bad", [{"gamma": 0.0}, {"gamma": 1.0}, {"dba_floor": 1.5}, {"dba_cap": 0.5},
                                 {"layer_combine": "sum"}, {"key_space": "rotated"}, {"key_weight": -1.0},
                                 {"content_weight": 0.0}], ids=lambda b: next(iter(b)))
def test_flashcache_bad_options(bad):
    key, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=f"{key} must .*{value!r}"):
        make_policy("flashcache", **bad)


def _planted_span(num_tokens=200, layers=3, kv_heads=2, head_dim=16, outliers=(37, 101, 150)):
    """Smooth (low-frequency) K/V along the token axis plus a few spiky outlier tokens."""
    generator = torch.Generator().manual_seed(1)
    t = torch.arange(num_tokens, dtype=torch.float32)[None, :, None, None]
    frequency = torch.rand(layers, 1, kv_heads, head_dim, generator=generator) * 3
    phase = torch.rand(layers, 1, kv_heads, head_dim, generator=generator) * 6
    keys = torch.cos(torch.pi * frequency * t / num_tokens + phase)
    values = torch.sin(torch.pi * frequency * t / num_tokens + phase) + 0.01 * torch.randn(
        layers, num_tokens, kv_heads, head_dim, generator=generator)
    for token in outliers:
        keys[:, token] += 3 * torch.randn(layers, kv_heads, head_dim, generator=generator)
        values[:, token] += 3 * torch.randn(layers, kv_heads, head_dim, generator=generator)
    # The smooth keys above are pre-RoPE content; the cache holds them rotated.
    positions = torch.arange(num_tokens)
    rope = _rope(head_dim)
    rotated = torch.stack([apply_rotary_reference(layer, positions, rope) for layer in keys])
    span = KVSpan(rotated, values, torch.ones(num_tokens, dtype=torch.bool), positions=positions, rotary=rope)
    return span, outliers


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("options", [dict(name="flashcache", recency=False), dict(name="flashcache-paper"),
                                     dict(name="flashcache_no_dba")], ids=["default-no-recency", "paper", "no-dba"])
def test_flashcache_keeps_planted_outliers(options, granularity):
    span, outliers = _planted_span()
    options = dict(options)
    keep_set = make_policy(options.pop("name"), retention=0.05, granularity=granularity, **options).select(span)
    assert bool(keep_set.keep[:, :, list(outliers)].all())


def test_default_flashcache_is_recency_plus_content_rank():
    """shared score = position / N + content_weight * rank of the mean per-(layer, head) rank of
    (V deviation / its mean + key_weight * K deviation / its mean), K pre-RoPE."""
    span, outliers = _planted_span()
    policy = make_policy("flashcache", retention=0.1)
    scores = frequency_scores(span.keys, span.values, 0.2, positions=span.positions, rotary=span.rotary)
    content = (scores.value_deviation / scores.value_deviation.mean(-1, keepdim=True)
               + 0.25 * scores.key_deviation / scores.key_deviation.mean(-1, keepdim=True))
    rank = lambda x: x.argsort(dim=-1, stable=True).argsort(dim=-1).float() / x.shape[-1]
    expected = torch.arange(200) / 200 + 0.15 * rank(rank(content).mean((0, 1)))
    torch.testing.assert_close(policy.shared_scores(scores), expected, rtol=0, atol=1e-6)
    # The two limits: content decides (outliers kept) or position decides (the newest tokens).
    by_content = make_policy("flashcache", retention=0.05, content_weight=100.0).select(span).shared_mask()
    assert bool(by_content[list(outliers)].all())
    by_position = make_policy("flashcache", retention=0.05, content_weight=1e-4).select(span).shared_mask()
    assert by_position.nonzero().squeeze(-1).tolist() == list(range(190, 200))


def test_shared_scores_one_definition_for_reference_and_engine():
    """select() on gathered K/V and shared_scores() on precomputed (pool-direct) scores agree."""
    span, _ = _planted_span()
    policy = make_policy("flashcache", retention=0.2)
    reference = policy.select(span).shared_mask()
    scores = frequency_scores(span.keys, span.values, 0.2, positions=span.positions, rotary=span.rotary)
    assert scores.key_space == "pre_rope"
    engine_span = KVSpan(span.keys, span.values, span.candidate_mask)
    policy.use_scores(engine_span, scores)
    assert torch.equal(policy.select(engine_span).shared_mask(), reference)
    shared = policy.shared_scores(scores)
    assert shared.shape == (200,) and shared.dtype == torch.float32
    assert torch.equal(policy.shared_score(span), shared)


def test_key_space_mismatch_is_refused():
    span, _ = _planted_span()
    post_rope = frequency_scores(span.keys, span.values, 0.2)
    with pytest.raises(ValueError, match="positions= and rotary="):
        make_policy("flashcache").use_scores(KVSpan(span.keys, span.values, span.candidate_mask), post_rope)
    with pytest.raises(ValueError, match="positions= and rotary="):
        make_policy("flashcache").shared_scores(post_rope)
    make_policy("flashcache-paper").shared_scores(post_rope)  # the paper scores post-RoPE keys
    with pytest.raises(ValueError, match="needs positions and rotary"):
        make_policy("flashcache").select(KVSpan(span.keys, span.values, span.candidate_mask))
    with pytest.raises(ValueError, match="positions and rotary go together"):
        KVSpan(span.keys, span.values, span.candidate_mask, positions=span.positions)


def test_pre_rope_scores_ignore_the_rotation():
    """The same content at other positions: post-RoPE deviation changes, pre-RoPE does not.
    (A constant shift is a fixed rotation of the channels, which no MSE sees; a stretch is not.)"""
    span, _ = _planted_span()
    rope = span.rotary
    shifted = torch.arange(200) * 3 + 7
    pre_rope = torch.stack([apply_rotary_reference(layer, span.positions, rope, inverse=True) for layer in span.keys])
    moved = torch.stack([apply_rotary_reference(layer, shifted, rope) for layer in pre_rope])
    first = frequency_scores(span.keys, span.values, positions=span.positions, rotary=rope)
    second = frequency_scores(moved, span.values, positions=shifted, rotary=rope)
    torch.testing.assert_close(first.key_deviation, second.key_deviation, rtol=1e-4, atol=1e-6)
    post = frequency_scores(moved, span.values).key_deviation
    assert (post - frequency_scores(span.keys, span.values).key_deviation).abs().max() > 1e-2


def test_dba_moves_budget_to_high_frequency_layers():
    span, _ = _planted_span()
    span.keys[2] += torch.randn_like(span.keys[2])  # layer 2 is noisy: most high-frequency energy
    policy = make_policy("flashcache", retention=0.2, granularity="layer")
    budgets = policy.layer_budgets(span, policy.budget(span))
    assert int(budgets.sum()) == 3 * 40 and budgets[2] == budgets.max() and budgets[2] > 40


def test_streaming_llm_keeps_sinks_and_recent():
    span = _span(SHAPES[0], candidate_mask=torch.ones(97, dtype=torch.bool))
    kept = make_policy("streaming_llm", retention=0.2, sink_tokens=4).select(span).shared_mask()
    assert kept.nonzero().squeeze(-1).tolist() == [0, 1, 2, 3] + list(range(97 - 15, 97))


def test_uniform_frames_keeps_whole_evenly_spaced_frames():
    span = _span((1, 70, 1, 4, 1, 1), candidate_mask=torch.ones(70, dtype=torch.bool), with_frames=True)
    kept = make_policy("uniform_frames", retention=0.3).select(span).shared_mask()  # 21 tokens = 3 frames
    frames = sorted(set((kept.nonzero().squeeze(-1) // 7).tolist()))
    assert frames == [0, 4, 9]


def test_random_is_seeded():
    span = _span(SHAPES[0])
    first = make_policy("random", seed=3, granularity="head").select(span).keep
    assert torch.equal(first, make_policy("random", seed=3, granularity="head").select(span).keep)
    assert not torch.equal(first, make_policy("random", seed=4, granularity="head").select(span).keep)


def test_keepset_shared_mask_rejects_per_layer_sets():
    span = _span(SHAPES[0])
    keep_set = make_policy("knorm", retention=0.3, granularity="head").select(span)
    with pytest.raises(ValueError, match="differs across layers/heads"):
        keep_set.shared_mask()
