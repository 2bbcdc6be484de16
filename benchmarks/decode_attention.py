"""Decode attention over kept KV vs full KV: what compression saves at every decode step.

One decode step of one attention layer with Qwen2.5-VL-7B's shapes (28 query heads, 4 KV heads,
head_dim 128, bf16), for requests whose prompt holds ``--visual-tokens`` video tokens and
``--text-tokens`` text tokens, batch 1 and 32. "full" reads every token's KV; "kept" reads the
text plus ``retention`` of the visual tokens (what FlashCache leaves in the pool). The per-token
work is the same, so the ratio is the speedup of the attention read itself; other per-step work
(projections, MLP) is not in it.

Variants (each checked against a float32 torch reference on the same data before it is timed):

  triton_paged   paged split-KV decode (flash-decoding), the access pattern of SGLang's Triton
                 decode kernel: each request's slots come from a kv_indices list (scattered
                 pool slots, page_size 1), read once; a small kernel in this file, not the
                 product's (SGLang brings its own on a real server)
  sdpa_dense     torch scaled_dot_product_attention on K/V already contiguous per request (a
                 lower bound: no index gather)
  gather_sdpa    index_select of each request's slots from the pool, then sdpa_dense (what an
                 engine without paged kernels would do)

Usage:
  python benchmarks/decode_attention.py                      # GPU: 32K visual tokens, batch 1 and 32
  python benchmarks/decode_attention.py --dry-run            # CPU: tiny shapes, interpreted Triton
Writes JSON (machine, shapes, median / p10 / p90 per variant, speedups, achieved bandwidth).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: the repository root is the package root
    sys.path.append(str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_LAYERS = 28, 4, 128, 28
TARGET_SPEEDUP = 3.0  # issue 14: decode attention at 32K, retention 0.2, >= 3x faster than full KV


# ------------------------------------------------------------------ the paged kernel
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _split_kv_stage(q_ptr, k_ptr, v_ptr, indptr_ptr, indices_ptr, partial_out_ptr, partial_lse_ptr,
                        scale, stride_slot, num_splits,
                        GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_N: tl.constexpr, NUM_KV_HEADS: tl.constexpr):
        request = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        start = tl.load(indptr_ptr + request)
        length = tl.load(indptr_ptr + request + 1) - start
        per_split = tl.cdiv(length, num_splits)
        begin = split * per_split
        end = tl.minimum(begin + per_split, length)
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, HEAD_DIM)
        head_mask = heads < GROUP
        q_head = kv_head * GROUP + heads
        q = tl.load(q_ptr + (request * NUM_KV_HEADS * GROUP + q_head)[:, None] * HEAD_DIM + dims[None, :],
                    mask=head_mask[:, None], other=0.0)
        maximum = tl.full([BLOCK_H], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
        for offset in range(begin, end, BLOCK_N):
            tokens = offset + tl.arange(0, BLOCK_N)
            token_mask = tokens < end
            slots = tl.load(indices_ptr + start + tokens, mask=token_mask, other=0).to(tl.int64)
            kv_offsets = slots[:, None] * stride_slot + kv_head * HEAD_DIM + dims[None, :]
            k = tl.load(k_ptr + kv_offsets, mask=token_mask[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            scores = tl.where(head_mask[:, None] & token_mask[None, :], scores, float("-inf"))
            new_maximum = tl.maximum(maximum, tl.max(scores, 1))
            safe = tl.where(new_maximum == float("-inf"), 0.0, new_maximum)
            p = tl.exp(scores - safe[:, None])
            correction = tl.exp(maximum - safe)
            v = tl.load(v_ptr + kv_offsets, mask=token_mask[:, None], other=0.0)
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            total = total * correction + tl.sum(p, 1)
            maximum = new_maximum
        out_row = (request * NUM_KV_HEADS * GROUP + q_head) * num_splits + split
        tl.store(partial_out_ptr + out_row[:, None] * HEAD_DIM + dims[None, :],
                 acc / tl.where(total == 0.0, 1.0, total)[:, None], mask=head_mask[:, None])
        lse = tl.where(total == 0.0, float("-inf"), maximum + tl.log(tl.where(total == 0.0, 1.0, total)))
        tl.store(partial_lse_ptr + out_row, lse, mask=head_mask)

    @triton.jit
    def _merge_stage(partial_out_ptr, partial_lse_ptr, out_ptr, num_splits,
                     HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
        row = tl.program_id(0)  # request * num_q_heads + head
        splits = tl.arange(0, BLOCK_S)
        dims = tl.arange(0, HEAD_DIM)
        split_mask = splits < num_splits
        lse = tl.load(partial_lse_ptr + row * num_splits + splits, mask=split_mask, other=float("-inf"))
        weights = tl.exp(lse - tl.max(lse, 0))
        weights = tl.where(split_mask & (lse > float("-inf")), weights, 0.0)
        partial = tl.load(partial_out_ptr + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
                          mask=split_mask[:, None], other=0.0)
        out = tl.sum(partial * weights[:, None], 0) / tl.sum(weights, 0)
        tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))

    return _split_kv_stage, _merge_stage


_KERNELS = None


def paged_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, kv_indptr: torch.Tensor,
                 kv_indices: torch.Tensor, num_splits: int, block_n: int = 64) -> torch.Tensor:
    """Decode attention over paged KV (page_size 1).

    Args:
        q: ``[batch_size, num_q_heads, head_dim]`` bf16/fp16/fp32.
        k_buffer, v_buffer: ``[num_slots, num_kv_heads, head_dim]``, the dtype of ``q``.
        kv_indptr: ``[batch_size + 1]`` int32, each request's range of ``kv_indices``.
        kv_indices: ``[total_tokens]`` int32 slots, position order per request.
        num_splits: key splits per request (flash-decoding); >= 1.
    Returns:
        ``[batch_size, num_q_heads, head_dim]``, the dtype of ``q``.
    """
    global _KERNELS
    import triton

    if _KERNELS is None:
        _KERNELS = _kernels()
    split_stage, merge_stage = _KERNELS
    batch_size, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    partial_out = torch.empty(batch_size * num_q_heads * num_splits, head_dim, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(batch_size * num_q_heads * num_splits, dtype=torch.float32, device=q.device)
    split_stage[(batch_size, num_kv_heads, num_splits)](
        q.contiguous(), k_buffer, v_buffer, kv_indptr, kv_indices, partial_out, partial_lse,
        1.0 / math.sqrt(head_dim), k_buffer.stride(0), num_splits,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_N=block_n,
        NUM_KV_HEADS=num_kv_heads)
    out = torch.empty_like(q)
    merge_stage[(batch_size * num_q_heads,)](partial_out, partial_lse, out, num_splits, HEAD_DIM=head_dim,
                                             BLOCK_S=max(2, triton.next_power_of_2(num_splits)))
    return out


def reference_decode(q, k_buffer, v_buffer, rows: list[torch.Tensor]) -> torch.Tensor:
    """float32 torch reference: each request attends to its rows' slots."""
    outputs = []
    group = q.shape[1] // k_buffer.shape[1]
    for b, slots in enumerate(rows):
        k = k_buffer[slots].float().repeat_interleave(group, dim=1)  # [n, H, D]
        v = v_buffer[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) / math.sqrt(q.shape[-1])
        outputs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(outputs)


# ------------------------------------------------------------------ the problem
def make_problem(batch_size: int, visual_tokens: int, text_tokens: int, retention: float, dtype, device, seed=0):
    """A pool of full rows at scattered slots; kept rows are each full row minus dropped visual tokens."""
    generator = torch.Generator().manual_seed(seed)
    on_device = torch.Generator(device=device).manual_seed(seed)  # GBs of KV: drawn where they live
    row_len = visual_tokens + text_tokens
    num_slots = batch_size * row_len + 1
    k_buffer = torch.randn(num_slots, NUM_KV_HEADS, HEAD_DIM, generator=on_device, device=device, dtype=dtype)
    v_buffer = torch.randn(num_slots, NUM_KV_HEADS, HEAD_DIM, generator=on_device, device=device, dtype=dtype)
    slots = (torch.randperm(num_slots - 1, generator=generator) + 1).view(batch_size, row_len)
    num_kept_visual = round(retention * visual_tokens)
    full_rows, kept_rows = [], []
    for b in range(batch_size):
        row = slots[b]
        # Text before and after the video, as in a video QA prompt; the video in between.
        before = text_tokens // 2
        visual = torch.arange(before, before + visual_tokens)
        kept_visual = visual[torch.randperm(visual_tokens, generator=generator)[:num_kept_visual].sort().values]
        keep = torch.cat([torch.arange(before), kept_visual, torch.arange(before + visual_tokens, row_len)])
        full_rows.append(row.to(device))
        kept_rows.append(row[keep].to(device))
    q = torch.randn(batch_size, NUM_Q_HEADS, HEAD_DIM, generator=generator).to(dtype).to(device)
    return q, k_buffer, v_buffer, full_rows, kept_rows


def csr(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], device=rows[0].device)
    indptr = torch.zeros(len(rows) + 1, dtype=torch.int32, device=rows[0].device)
    indptr[1:] = lengths.cumsum(0)
    return indptr, torch.cat(rows).to(torch.int32)


def num_splits_for(length: int, batch_size: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (132 SMs on an H200) without splits of under 256 tokens."""
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = max(1, (2 * sms) // (batch_size * NUM_KV_HEADS))
    return max(1, min(wanted, length // 256, 64))


def timings_ms(fn, device: torch.device, repeats: int) -> list[float]:
    """Per-call times in ms (do_bench on CUDA); ``repeats`` 0 (a dry run): one call, no warm-up."""
    if repeats == 0:
        started = time.perf_counter()
        fn()
        return [(time.perf_counter() - started) * 1e3]
    fn()
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all"))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median_ms": statistics.median(ordered), "p10_ms": pick(0.1), "p90_ms": pick(0.9), "count": len(ordered)}


def run_case(batch_size, visual_tokens, text_tokens, retention, dtype, device, repeats) -> dict:
    q, k_buffer, v_buffer, full_rows, kept_rows = make_problem(batch_size, visual_tokens, text_tokens, retention,
                                                               dtype, device)
    case = {"batch_size": batch_size, "visual_tokens": visual_tokens, "text_tokens": text_tokens,
            "retention": retention, "full_tokens": len(full_rows[0]), "kept_tokens": len(kept_rows[0])}
    tolerance = 2e-2 if dtype != torch.float32 else 2e-4
    for name, rows in (("full", full_rows), ("kept", kept_rows)):
        indptr, indices = csr(rows)
        splits = num_splits_for(len(rows[0]), batch_size, device)
        expected = reference_decode(q, k_buffer, v_buffer, rows)
        out = paged_decode(q, k_buffer, v_buffer, indptr, indices, splits)
        error = float((out.float() - expected).abs().max())
        if not error <= tolerance:
            raise AssertionError(f"triton_paged ({name}, batch {batch_size}) differs from the reference: "
                                 f"max abs error {error:.3g} > {tolerance}")
        dense_k = torch.stack([k_buffer[r] for r in rows]).transpose(1, 2).contiguous()  # [B, Hkv, n, D]
        dense_v = torch.stack([v_buffer[r] for r in rows]).transpose(1, 2).contiguous()
        query = q.unsqueeze(2)  # [B, H, 1, D]

        def sdpa(k=dense_k, v=dense_v):
            return torch.nn.functional.scaled_dot_product_attention(query, k, v, enable_gqa=True)

        def gather_sdpa(stacked=torch.stack(rows)):
            k = k_buffer[stacked].transpose(1, 2)
            v = v_buffer[stacked].transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(query, k, v, enable_gqa=True)

        sdpa_error = float((sdpa().squeeze(2).float() - expected).abs().max())
        if not sdpa_error <= tolerance:
            raise AssertionError(f"sdpa_dense ({name}) differs from the reference by {sdpa_error:.3g}")
        bytes_read = 2 * len(rows[0]) * batch_size * NUM_KV_HEADS * HEAD_DIM * k_buffer.element_size()
        case[name] = {
            "num_splits": splits, "max_abs_error": error, "kv_bytes_per_layer": bytes_read,
            "triton_paged": summary(timings_ms(lambda: paged_decode(q, k_buffer, v_buffer, indptr, indices, splits),
                                               device, repeats)),
            "sdpa_dense": summary(timings_ms(sdpa, device, repeats)),
            "gather_sdpa": summary(timings_ms(gather_sdpa, device, repeats)),
        }
        case[name]["triton_paged"]["kv_read_gbps"] = bytes_read / (case[name]["triton_paged"]["median_ms"] * 1e-3) / 1e9
    case["speedup"] = {variant: case["full"][variant]["median_ms"] / case["kept"][variant]["median_ms"]
                       for variant in ("triton_paged", "sdpa_dense", "gather_sdpa")}
    case["all_layers_ms"] = {name: NUM_LAYERS * case[name]["triton_paged"]["median_ms"] for name in ("full", "kept")}
    return case


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visual-tokens", type=int, default=32768)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--retention", type=float, default=0.2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, interpreted Triton: proves the script runs (no timing value)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype, repeats = torch.device("cpu"), torch.float32, 0
        args.visual_tokens, args.text_tokens, args.batch_sizes = 96, 8, [2]
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: use --dry-run on CPU")
        device, dtype, repeats = torch.device("cuda"), torch.bfloat16, 100
    from benchmarks.serving import machine_info

    result = {"benchmark": "decode_attention", "machine": machine_info(), "dry_run": args.dry_run,
              "shapes": {"num_q_heads": NUM_Q_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                         "dtype": str(dtype), "page_size": 1, "model": "Qwen2.5-VL-7B attention"},
              "target_speedup": TARGET_SPEEDUP, "cases": []}
    output = args.output or RESULTS / "decode_attention.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    for batch_size in args.batch_sizes:
        case = run_case(batch_size, args.visual_tokens, args.text_tokens, args.retention, dtype, device, repeats)
        result["cases"].append(case)
        output.write_text(json.dumps(result, indent=2))  # partial results survive a time-out
        print(f"batch {batch_size}: full {case['full_tokens']} tokens "
              f"{case['full']['triton_paged']['median_ms']:.4f} ms, kept {case['kept_tokens']} tokens "
              f"{case['kept']['triton_paged']['median_ms']:.4f} ms per layer: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in case["speedup"].items()), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["meets_target"] = (None if args.dry_run else
                              all(c["speedup"]["triton_paged"] >= TARGET_SPEEDUP for c in result["cases"]))
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
