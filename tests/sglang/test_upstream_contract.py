"""Contract tests for the SGLang touch points the kept-KV table and the refusals added to upstream.py.

check_upstream() must pass on the installed SGLang and must report each of these if it changed;
the ForwardBatch.init_new hook must see every batch once and be idempotent.
"""

from __future__ import annotations

from types import SimpleNamespace

from flashcache_sglang import upstream


def test_installed_sglang_passes_the_graph_contract():
    assert upstream._check_graph_contract() == []
    assert upstream.check_upstream() == []


def test_a_changed_replay_view_is_reported(monkeypatch):
    from sglang.srt.model_executor.runner import decode_cuda_graph_runner

    def build_replay_fb_view(forward_batch, buffers, bs, raw_bs, **kwargs):
        return SimpleNamespace(batch_size=bs, out_cache_loc=None)

    monkeypatch.setattr(decode_cuda_graph_runner, "build_replay_fb_view", build_replay_fb_view)
    problems = upstream._check_graph_contract()
    assert any("out_cache_loc" in p for p in problems) and any("num_padding" in p for p in problems)


def test_a_changed_init_new_is_reported(monkeypatch):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    monkeypatch.setattr(ForwardBatch, "init_new", classmethod(lambda cls, model_runner, batch: None))
    assert any("ForwardBatch.init_new" in p for p in upstream._check_graph_contract())


def test_forward_batch_hook_sees_each_batch_once_and_installs_once(monkeypatch):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    made = SimpleNamespace(name="forward batch")
    monkeypatch.setattr(ForwardBatch, "init_new", classmethod(lambda cls, batch, model_runner, **kw: made))
    seen = []
    assert upstream.install_forward_batch_hook(lambda fb, batch, runner: seen.append((fb, batch, runner)))
    assert not upstream.install_forward_batch_hook(lambda *args: seen.append("second"))
    schedule_batch, runner = SimpleNamespace(req_pool_indices_cpu="rows"), SimpleNamespace()
    assert ForwardBatch.init_new(schedule_batch, runner, return_hidden_states_before_norm=False) is made
    assert seen == [(made, schedule_batch, runner)]
    assert upstream.batch_rows_cpu(schedule_batch) == "rows"


def test_context_backends_and_facts():
    child = SimpleNamespace()
    hybrid = SimpleNamespace(prefill_backend=child, decode_backend=child)
    ctx = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(attn_backend=hybrid,
                                                                                 sliding_window_size=-1)),
                          model_config=SimpleNamespace(attention_arch="AttentionArch.MLA"), disable_radix_cache=False,
                          enable_hierarchical_cache=True, is_hybrid_swa=False, is_hybrid_ssm=False, is_dsa=False)
    assert upstream.context_attention_backends(ctx) == [child, child]
    facts = upstream.build_context_facts(ctx)
    assert facts["mla"] and facts["enable_hierarchical_cache"] and not facts["sliding_window"]
