"""Tensor parallelism: every rank keeps the same tokens (scores reduced over the TP group).

Two real processes with a gloo group, each holding SGLang's real MHATokenToKVPool with its half of
the KV heads (as TP ranks do), score the same candidates through CompressionController with the
group's sum; both must keep exactly the token set one process holding every head keeps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from flashcache_sglang.compressor import CompressionController
from flashcache_sglang.config import FlashCacheConfig

NUM_LAYERS, NUM_HEADS, HEAD_DIM, NUM_TOKENS, POOL = 3, 4, 16, 97, 160

RANK_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch, torch.distributed as dist
    from flashcache_sglang import cpu_compat
    cpu_compat.activate()
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from flashcache_sglang.compressor import CompressionController
    from flashcache_sglang.config import FlashCacheConfig
    rank, world, policies = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    L, H, D, N, P = {L}, {H}, {D}, {N}, {P}
    generator = torch.Generator().manual_seed(7)
    keys = torch.randn(L, N, H, D, generator=generator) * torch.linspace(0.5, 2.0, N)[None, :, None, None]
    values = torch.randn(L, N, H, D, generator=generator)
    local = slice(rank * H // world, (rank + 1) * H // world)
    pool = MHATokenToKVPool(P, 1, torch.float32, H // world, D, L, "cpu", False)
    slots = torch.arange(1, N + 1)
    for layer in range(L):
        pool.k_buffer[layer][slots] = keys[layer][:, local]
        pool.v_buffer[layer][slots] = values[layer][:, local]
    def total(tensor):
        dist.all_reduce(tensor)
        return tensor
    controller = CompressionController(pool, lambda s: None, reduce=total)
    kept = {policy: controller.keep_mask(slots, 29, FlashCacheConfig(retention=0.3, policy=policy)).tolist()
            for policy in policies}
    print(json.dumps(kept))
''').replace("{L}", str(NUM_LAYERS)).replace("{H}", str(NUM_HEADS)).replace("{D}", str(HEAD_DIM)) \
    .replace("{N}", str(NUM_TOKENS)).replace("{P}", str(POOL))


def single_process_keep(policy: str) -> list[bool]:
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    generator = torch.Generator().manual_seed(7)
    keys = torch.randn(NUM_LAYERS, NUM_TOKENS, NUM_HEADS, HEAD_DIM, generator=generator) \
        * torch.linspace(0.5, 2.0, NUM_TOKENS)[None, :, None, None]
    values = torch.randn(NUM_LAYERS, NUM_TOKENS, NUM_HEADS, HEAD_DIM, generator=generator)
    pool = MHATokenToKVPool(POOL, 1, torch.float32, NUM_HEADS, HEAD_DIM, NUM_LAYERS, "cpu", False)
    slots = torch.arange(1, NUM_TOKENS + 1)
    for layer in range(NUM_LAYERS):
        pool.k_buffer[layer][slots] = keys[layer]
        pool.v_buffer[layer][slots] = values[layer]
    controller = CompressionController(pool, lambda s: None)
    return controller.keep_mask(slots, 29, FlashCacheConfig(retention=0.3, policy=policy)).tolist()


POLICIES = ("flashcache", "flashcache-paper", "knorm")


@pytest.mark.timeout(300)
def test_two_ranks_keep_what_one_process_keeps(tmp_path):
    from flashcache_sglang import cpu_compat
    from flashcache_sglang.testing.server import free_port

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = cpu_compat.environment()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), "2", ",".join(POLICIES)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for rank in range(2)]
    outputs = [rank.communicate(timeout=240) for rank in ranks]
    for rank, (out, err) in zip(ranks, outputs):
        assert rank.returncode == 0, err[-2000:]
    kept = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert kept[0] == kept[1], "ranks kept different tokens"
    for policy in POLICIES:
        assert sum(kept[0][policy]) == 29
        assert kept[0][policy] == single_process_keep(policy), \
            f"{policy}: the reduced ranking differs from one process holding every head"


def test_one_rank_with_its_own_heads_alone_would_differ():
    """Why the reduction matters: scoring only half the heads picks another set (so the test
    above could fail)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    generator = torch.Generator().manual_seed(7)
    keys = torch.randn(NUM_LAYERS, NUM_TOKENS, NUM_HEADS, HEAD_DIM, generator=generator) \
        * torch.linspace(0.5, 2.0, NUM_TOKENS)[None, :, None, None]
    values = torch.randn(NUM_LAYERS, NUM_TOKENS, NUM_HEADS, HEAD_DIM, generator=generator)
    pool = MHATokenToKVPool(POOL, 1, torch.float32, NUM_HEADS // 2, HEAD_DIM, NUM_LAYERS, "cpu", False)
    slots = torch.arange(1, NUM_TOKENS + 1)
    for layer in range(NUM_LAYERS):
        pool.k_buffer[layer][slots] = keys[layer][:, :NUM_HEADS // 2]
        pool.v_buffer[layer][slots] = values[layer][:, :NUM_HEADS // 2]
    config = FlashCacheConfig(retention=0.3, policy="flashcache-paper")
    half = CompressionController(pool, lambda s: None).keep_mask(slots, 29, config).tolist()
    assert half != single_process_keep("flashcache-paper")
