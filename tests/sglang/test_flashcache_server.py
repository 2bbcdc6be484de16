"""FlashCache inside a real SGLang server on CPU, SmolLM2-135M with real weights.

What is checked, end to end through HTTP:
- retention 1.0 is token-identical to vanilla SGLang;
- retention 0.2 frees ~80% of the candidate span's KV slots (our counters and the allocator);
- teacher-forced NLL over a compressed prefix equals the reference path (transformers) given
  the same kept tokens, and would NOT match if positions after the prefix were shifted;
- a compressed prefix is reused across turns and by different requests sharing it;
- after a randomized workload with aborts every slot is accounted for and returns on flush.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import requests
import torch

pytestmark = [pytest.mark.server, pytest.mark.timeout(1200)]

RETENTION = 0.2
SETTINGS = {"retention": RETENTION, "candidates": "text", "sink_tokens": 4, "recent_tokens": 32}
POOL_TOKENS = 12000


def license_ids(tokenizer, name: str, count: int) -> list[int]:
    ids = tokenizer(open(f"/usr/share/common-licenses/{name}").read())["input_ids"]
    assert len(ids) >= count, (name, len(ids))
    return ids[:count]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def flashcache_server(server_factory, smollm2_dir):
    return server_factory(smollm2_dir, flashcache=SETTINGS, max_total_tokens=POOL_TOKENS,
                          extra_args=["--enable-metrics"])


@pytest.fixture(scope="module")
def reference_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def full_retention(**fields) -> dict:
    return {"sampling_params": {"custom_params": {"flashcache": {"retention": 1.0}}}, **fields}


def test_retention_one_is_token_identical_to_vanilla(server_factory, smollm2_dir, flashcache_server, tokenizer):
    prompts = [license_ids(tokenizer, "GPL-3", 40), license_ids(tokenizer, "Apache-2.0", 420)]
    flash = [flashcache_server.generate(input_ids=ids, max_new_tokens=20, **full_retention())["output_ids"]
             for ids in prompts]
    vanilla_server = server_factory(smollm2_dir, max_total_tokens=POOL_TOKENS)
    vanilla = [vanilla_server.generate(input_ids=ids, max_new_tokens=20)["output_ids"] for ids in prompts]
    vanilla_server.stop()
    assert flash == vanilla


def test_compression_frees_most_of_the_candidate_span(flashcache_server, tokenizer):
    flashcache_server.flush_cache()
    ids = license_ids(tokenizer, "MPL-2.0", 700)
    out = flashcache_server.generate(input_ids=ids, max_new_tokens=4)
    report = out["meta_info"]["flashcache"][0]
    candidates = 700 - SETTINGS["sink_tokens"] - SETTINGS["recent_tokens"]
    assert report["candidate_tokens"] == candidates
    assert report["kept_tokens"] == round(RETENTION * candidates)
    assert report["prompt_kv_slots"] == 700 - candidates + report["kept_tokens"]
    stats = flashcache_server.stats()
    held = stats["tree_evictable"] + stats["tree_protected"]
    # The finished request's prompt (compressed) and output are cached; nothing else is held.
    assert held == report["prompt_kv_slots"] + out["meta_info"]["completion_tokens"] - 1
    assert stats["allocator_available"] + held == stats["allocator_size"]
    assert stats["tree_dropped_entries"] == candidates - report["kept_tokens"]
    metrics = requests.get(f"{flashcache_server.url}/metrics", timeout=30).text
    saved = [line for line in metrics.splitlines() if line.startswith("flashcache_kv_slots_saved_total")]
    assert saved and float(saved[0].split()[-1]) >= candidates - report["kept_tokens"], saved


def _engine_continuation_nll(server, context, continuation, **fields):
    out = server.generate(input_ids=context + continuation, max_new_tokens=1, return_logprob=True,
                          logprob_start_len=len(context), **fields)
    logprobs = out["meta_info"]["input_token_logprobs"]
    assert len(logprobs) == len(continuation)
    # Entry 0 is scored at the last context position, which the cache hit does not recompute.
    return -torch.tensor([entry[0] for entry in logprobs[1:]]), out["meta_info"]


def test_engine_matches_reference_path_and_positions_stay_logical(
        flashcache_server, tokenizer, reference_model, monkeypatch):
    from flashcache_sglang import reference
    from flashcache_sglang.policies import KeepSet

    ids = license_ids(tokenizer, "Apache-2.0", 460)
    context, continuation = ids[:400], ids[400:]
    first = flashcache_server.generate(input_ids=context, max_new_tokens=1)
    dropped = flashcache_server.kept_positions(first["meta_info"]["id"])["dropped_positions"]
    assert len(dropped) == (400 - 36) - round(RETENTION * (400 - 36))

    engine_nll, meta = _engine_continuation_nll(flashcache_server, context, continuation)
    assert meta["cached_tokens"] == len(context)  # the compressed prefix was reused, not recomputed

    config = reference_model.config
    keep = torch.ones(len(context), dtype=torch.bool)
    keep[dropped] = False
    keep_set = KeepSet(keep=keep.expand(config.num_hidden_layers, config.num_key_value_heads, -1).clone(),
                       candidate_mask=torch.ones(len(context), dtype=torch.bool))
    input_ids = torch.tensor([context + continuation])
    reference_nll = reference.continuation_nll(reference_model, input_ids, len(context), keep_set)[1:]
    error = (engine_nll - reference_nll).abs().max().item()
    assert error < 2e-3, f"engine vs reference NLL max abs diff {error:.2e}"

    # Positions: had the engine numbered the continuation after the *kept* tokens (the bug that
    # compacting the tree's values would cause), its NLL would be this one instead.
    real_positions = reference._position_ids

    def shifted(model, start, length, device):
        return real_positions(model, start - len(dropped), length, device)

    monkeypatch.setattr(reference, "_position_ids", shifted)
    shifted_nll = reference.continuation_nll(reference_model, input_ids, len(context), keep_set)[1:]
    assert (engine_nll - shifted_nll).abs().max().item() > 50 * max(error, 1e-4)

    full_nll, _ = _engine_continuation_nll(flashcache_server, context, continuation, **full_retention())
    ratio = torch.exp(engine_nll.mean() - full_nll.mean()).item()
    print(f"\nperplexity ratio at retention {RETENTION}: {ratio:.3f}")
    assert ratio < 2.0


def test_multi_turn_and_shared_prefix_reuse(flashcache_server, tokenizer):
    context = license_ids(tokenizer, "GPL-2", 600)
    question = tokenizer("\nQuestion: what is this text?\nAnswer:")["input_ids"]
    turn1 = flashcache_server.generate(input_ids=context + question, max_new_tokens=8)
    turn1_tokens = context + question + turn1["output_ids"]
    follow_up = tokenizer("\nQuestion: who publishes it?\nAnswer:")["input_ids"]
    turn2 = flashcache_server.generate(input_ids=turn1_tokens + follow_up, max_new_tokens=8)
    # Turn 2 re-uses everything turn 1 cached (its compressed prompt and its answer).
    assert turn2["meta_info"]["cached_tokens"] >= len(turn1_tokens) - 1
    report = turn2["meta_info"]["flashcache"][0]
    assert report["prompt_kv_slots"] < 0.5 * report["prompt_tokens"]

    branches = [flashcache_server.generate(input_ids=context + tokenizer(q)["input_ids"], max_new_tokens=4)
                for q in ("\nSummary:", "\nTitle:")]
    for branch in branches:
        assert branch["meta_info"]["cached_tokens"] >= len(context)


def test_randomized_workload_leaks_nothing(flashcache_server, tokenizer):
    rng = random.Random(1234)
    corpus = license_ids(tokenizer, "GPL-3", 3000)
    prefixes = [corpus[i * 700:(i * 700) + rng.randint(200, 600)] for i in range(3)]
    errors: list[BaseException] = []

    def one_request(index: int) -> None:
        prefix = rng.choice(prefixes)
        suffix = corpus[rng.randint(0, 2500):][: rng.randint(1, 120)]
        retention = rng.choice([0.1, 0.2, 0.5, 1.0])
        body = {"input_ids": prefix + suffix,
                "sampling_params": {"max_new_tokens": rng.randint(1, 24), "temperature": 0.0,
                                    "custom_params": {"flashcache": {"retention": retention}}}}
        try:
            if index % 5 == 4:  # abort: the client gives up mid-generation
                body["stream"] = True
                body["sampling_params"]["max_new_tokens"] = 200
                with requests.post(f"{flashcache_server.url}/generate", json=body, stream=True, timeout=600) as r:
                    for _ in zip(range(2), r.iter_lines()):
                        pass
            else:
                requests.post(f"{flashcache_server.url}/generate", json=body, timeout=600).raise_for_status()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    for wave in range(3):
        threads = [threading.Thread(target=one_request, args=(wave * 8 + i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    assert flashcache_server.alive(), flashcache_server.log_tail()

    # Let aborted requests drain, then flush: the tree must give back every slot it held.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        flashcache_server.flush_cache()
        flush = flashcache_server.stats()["last_flush"]
        if flush and flush["tree_protected"] == 0:
            break
        time.sleep(1)
    assert flush["available_after_evict"] == flush["allocator_size"], flush
    assert flashcache_server.alive()
    assert "leak" not in flashcache_server.log_path.read_text().lower()


def test_openai_api_and_frontend_language_work_unchanged(flashcache_server):
    context = open("/usr/share/common-licenses/BSD").read()
    chat = requests.post(f"{flashcache_server.url}/v1/chat/completions", timeout=600, json={
        "model": "default", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": context + "\nWhich license is this?"}]}).json()
    assert chat["choices"][0]["message"]["content"]
    assert chat["usage"]["prompt_tokens"] > 200

    import sglang as sgl

    @sgl.function
    def qa(s, text, question):
        s += text + "\nQuestion: " + question + "\nAnswer:"
        s += sgl.gen("answer", max_tokens=8, temperature=0)

    backend = sgl.RuntimeEndpoint(flashcache_server.url)
    states = []
    for question in ("Who wrote it?", "Can I copy it?"):
        states.append(qa.run(text=context, question=question, backend=backend))
        assert states[-1]["answer"]  # waits: run() executes in a background thread
    second = states[1].get_meta_info("answer")
    assert second["cached_tokens"] > 200  # the compressed context was shared between the two
