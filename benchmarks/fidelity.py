"""Fidelity of KV-selection policies on a real LM: continuation perplexity and attention error.

    python -m benchmarks.fidelity --text SRC [--text SRC ...] --held-out-text SRC [...] \\
        --context 1024 --continuation 128 --retention 0.5 0.2 0.1 --windows-per-text 3 \\
        --json OUT.json --plot OUT.png
    python -m benchmarks.fidelity --reanalyze OUT.json [--plot OUT.png]   # stats from saved runs

A text source is a file path, ``man:NAME`` (the man page rendered by ``man`` at 80 columns,
no hyphenation or justification) or ``pydoc-topics`` (the running Python's
``pydoc_data.topics``: the language reference, all topics in key order). ``--text`` sources are
the tuning set (scoring variants were chosen on them); ``--held-out-text`` sources are never
tuned on and decide the acceptance checks.

Per window of ``context + continuation`` tokens (non-overlapping windows spread over a text):
prefill the context once, then for every setting (policy, retention, options) select a keep set
over the context, teacher-force the continuation through the compressed cache (reference path,
:mod:`flashcache_sglang.reference`) and record

- the perplexity ratio ``exp(mean NLL_compressed - mean NLL_full)`` over the continuation;
- the attention-output relative error of the continuation's queries, per layer, with the
  uncompressed model's queries (so errors do not compound), averaged over layers.

Text prompts have no visual span, so the candidate set is "all but the first ``--sink-tokens``
and the last ``--recent-window`` context tokens". The main table uses one token set shared by
all layers and heads (what the engine holds). Statistics: mean with a 95% t-interval over
windows; paired comparisons on the same windows use the Wilcoxon signed-rank test (two-sided)
on the per-window log perplexity ratios, plus the mean paired difference of the ratios with a
95% t-interval. Besides the main table: scoring variants of the default FlashCache, per-layer /
per-head granularity, FP8 (and bf16) KV against the float32 cache, an energy analysis, and with
``--kvpress-python`` a cross-check against kvpress's own presses in their own venv.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MAIN_POLICIES = (
    "flashcache",
    "flashcache-paper",
    "flashcache_no_dba",
    "snapkv",
    "tova",
    "knorm",
    "streaming_llm",
    "random",
    "uniform_frames",
)
ATTENTION_BASED = ("snapkv", "tova")
# The acceptance: FlashCache below each of these (paired, significant) and within 3% of
# SnapKV, on held-out text, at these retentions.
ACCEPTANCE_BASELINES = ("random", "knorm", "streaming_llm", "uniform_frames")
ACCEPTANCE_RETENTIONS = (0.2, 0.1)
KVPRESS_PRESSES = {  # our policy name -> kvpress class name
    "streaming_llm": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "tova": "TOVAPress",
    "knorm": "KnormPress",
    "random": "RandomPress",
}
KV_DTYPES = ("bf16", "fp8_e4m3")
RECENCY_RANDOM = "recency+random"  # control: the default's position prior, random content


@dataclass(frozen=True)
class Setting:
    """One compression configuration: policy + options + protected window + KV dtype."""

    group: str
    label: str
    policy: str
    retention: float
    options: tuple = ()
    sink_tokens: int = 4
    recent_window: int = 64
    all_candidates: bool = False  # the kvpress comparison: no protected tokens at all
    kv_dtype: str = "fp32"

    @property
    def key(self) -> str:
        return f"{self.group}|{self.label}|{self.retention}"

    def build(self):
        from flashcache_sglang.policies import make_policy

        if self.policy == RECENCY_RANDOM:
            return _recency_random_class()(retention=self.retention, **dict(self.options))
        return make_policy(self.policy, retention=self.retention, **dict(self.options))


def _recency_random_class():
    """The control for the default's position prior: the same prior, random content ranks.
    Built lazily (importing the policies needs torch); not registered with make_policy."""
    from dataclasses import dataclass as _dataclass

    import torch

    from flashcache_sglang.policies import Policy
    from flashcache_sglang.policies.flashcache import _row_rank

    @_dataclass
    class RecencyRandom(Policy):
        content_weight: float = 0.15
        seed: int = 0
        name = RECENCY_RANDOM

        def shared_score(self, span):
            index = span.candidate_mask.nonzero().squeeze(-1)
            generator = torch.Generator().manual_seed(self.seed)
            content = torch.rand(index.numel(), generator=generator)
            position = torch.arange(index.numel(), dtype=torch.float32) / index.numel()
            out = torch.zeros(span.num_tokens)
            out[index] = position + self.content_weight * _row_rank(content)
            return out

    return RecencyRandom


def _variant_settings(args) -> list[Setting]:
    """Variants of the default FlashCache (one change each) and controls, at the variant
    retentions: what was tried to find the default (tuned on --text only)."""
    out = []
    variants = [
        ("key_space=post_rope", "flashcache", (("key_space", "post_rope"),)),
        ("key_weight=0 (V only)", "flashcache", (("key_weight", 0.0),)),
        ("key_weight=0.5", "flashcache", (("key_weight", 0.5),)),
        ("key_weight=1", "flashcache", (("key_weight", 1.0),)),
        ("normalise_kv=False", "flashcache", (("normalise_kv", False),)),
        ("layer_combine=energy (DBA)", "flashcache", (("layer_combine", "energy"),)),
        ("layer_combine=mean", "flashcache", (("layer_combine", "mean"),)),
        ("layer_combine=max", "flashcache", (("layer_combine", "max"),)),
        ("gamma=0.1", "flashcache", (("gamma", 0.1),)),
        ("gamma=0.3", "flashcache", (("gamma", 0.3),)),
        ("content_weight=0.1", "flashcache", (("content_weight", 0.1),)),
        ("content_weight=0.25", "flashcache", (("content_weight", 0.25),)),
        ("recency=False (content only)", "flashcache", (("recency", False),)),
        ("recency=False, post_rope", "flashcache", (("recency", False), ("key_space", "post_rope"))),
        ("paper score + recency", "flashcache-paper", (("recency", True),)),
        ("recency + random content", RECENCY_RANDOM, ()),
        ("granularity=layer", "flashcache", (("granularity", "layer"),)),
        ("granularity=head", "flashcache", (("granularity", "head"),)),
        ("paper, granularity=layer", "flashcache-paper", (("granularity", "layer"),)),
        ("paper, granularity=head", "flashcache-paper", (("granularity", "head"),)),
    ]
    for retention in args.variant_retention:
        for label, policy, options in variants:
            out.append(Setting("variant", label, policy, retention, options, args.sink_tokens, args.recent_window))
    return out


def _settings(args) -> list[Setting]:
    policies = list(MAIN_POLICIES) if args.policies == ["all"] else args.policies
    out = []
    for retention in args.retention:
        for policy in policies:
            out.append(Setting("main", policy, policy, retention, (("granularity", "shared"),),
                               args.sink_tokens, args.recent_window))
    if args.ablations:
        out += _variant_settings(args)
    if args.kv_dtypes:
        for kv_dtype in KV_DTYPES:
            out.append(Setting("kv_dtype", f"full cache, {kv_dtype} KV", "full", 1.0, kv_dtype=kv_dtype))
            for retention in args.retention:
                out.append(Setting("kv_dtype", f"flashcache, {kv_dtype} KV", "flashcache", retention, (),
                                   args.sink_tokens, args.recent_window, kv_dtype=kv_dtype))
    return out


def _kvpress_settings(args) -> list[Setting]:
    """Our policies configured as kvpress runs them: no protected tokens, one set per KV head."""
    return [Setting("kvpress_ours", policy, policy, args.kvpress_retention, (("granularity", "head"),), 0, 0,
                    all_candidates=True) for policy in KVPRESS_PRESSES]


# ------------------------------------------------------------------------------------ texts
def read_text(source: str) -> str:
    """The text of a source: a file path, ``man:NAME`` or ``pydoc-topics`` (module docstring)."""
    if source.startswith("man:"):
        environment = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="")
        done = subprocess.run(["man", "--no-hyphenation", "--no-justification", "-P", "cat", source[4:]],
                              env=environment, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not done.stdout.strip():
            raise SystemExit(f"cannot render {source}: {done.stderr.strip() or 'empty output'}")
        return done.stdout
    if source == "pydoc-topics":
        import pydoc_data.topics as topics

        return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    return Path(source).read_text(errors="replace")


def _windows(tokenizer, sources: list[tuple[str, str]], size: int, per_text: int) -> list[dict]:
    """Non-overlapping windows, evenly spread over each text (at most ``per_text``)."""
    windows = []
    for split, source in sources:
        ids = tokenizer(read_text(source), add_special_tokens=False)["input_ids"]
        if len(ids) < size:
            print(f"skip {source}: {len(ids)} tokens < window {size}", file=sys.stderr)
            continue
        count = max(1, min(per_text, len(ids) // size))
        starts = [round(i * (len(ids) - size) / max(1, count - 1)) for i in range(count)] if count > 1 else [0]
        for start in starts:
            windows.append({"text": source if ":" in source or "/" not in source else os.path.basename(source),
                            "source": source, "split": split, "start": start, "ids": ids[start : start + size]})
    if not windows:
        raise SystemExit("no text is long enough for one window; lower --context/--continuation")
    return windows


# ------------------------------------------------------------------------------------ machine
def _machine(extra: dict | None = None) -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    info.update(extra or {})
    return info


def _energy(prefilled, candidate_mask, gammas) -> dict:
    from flashcache_sglang.method.scoring import low_frequency_share, unrotate_span_keys

    index = candidate_mask.nonzero().squeeze(-1)
    keys = prefilled.keys[:, index]
    pre_rope = unrotate_span_keys(prefilled.keys, prefilled.positions, prefilled.rotary)[:, index]
    values = prefilled.values[:, index]
    return {
        str(gamma): {
            "keys_post_rope": low_frequency_share(keys, gamma).tolist(),
            "keys_pre_rope": low_frequency_share(pre_rope, gamma).tolist(),
            "values": low_frequency_share(values, gamma).tolist(),
        }
        for gamma in gammas
    }


# ------------------------------------------------------------------------------------ one window
def _quantized(prefilled, kv_dtype: str):
    """(prefill with K/V quantised-dequantised, the KVQuantization to keep applying)."""
    import dataclasses

    from flashcache_sglang.reference import KVQuantization

    quantization = KVQuantization.for_prefill(prefilled, kv_dtype)
    keys, values = quantization.apply_to_span(prefilled.keys, prefilled.values)
    return dataclasses.replace(prefilled, keys=keys, values=values), quantization


def _run_window(model, window: dict, args, settings: list[Setting]) -> tuple[dict, dict, float]:
    """Returns ({setting key: (ppl_ratio, attn_error, kept_indices or None)}, energy, mean full NLL)."""
    import torch

    from flashcache_sglang.policies import text_candidate_mask
    from flashcache_sglang.reference import (
        _Recording,
        attention_output_error,
        continue_from_prefill,
        kv_quantization,
        prefill,
    )

    ids = torch.tensor([window["ids"]])
    context, continuation = ids[:, : args.context], ids[:, args.context :]
    prefilled = prefill(model, context, observation_window=args.observation_window)
    recording = _Recording()
    full_nll = continue_from_prefill(model, prefilled, continuation, None, recording)
    num_layers = prefilled.keys.shape[0]
    queries = torch.stack([recording.queries[i] for i in range(num_layers)]).float()
    keys = torch.stack([recording.keys[i] for i in range(num_layers)]).float()
    values = torch.stack([recording.values[i] for i in range(num_layers)]).float()
    results, done = {}, {}  # identical configurations reached from several groups run once
    quantized = {}
    for setting in settings:
        if setting.all_candidates:
            mask = torch.ones(args.context, dtype=torch.bool)
        else:
            mask = text_candidate_mask(args.context, setting.sink_tokens, setting.recent_window)
        source = prefilled
        quantization = None
        if setting.kv_dtype != "fp32":
            if setting.kv_dtype not in quantized:
                quantized[setting.kv_dtype] = _quantized(prefilled, setting.kv_dtype)
            source, quantization = quantized[setting.kv_dtype]
        keep = None
        identity = ("full", setting.kv_dtype)
        if setting.policy != "full":
            policy = setting.build()
            if setting.all_candidates and setting.policy in KVPRESS_PRESSES:
                # kvpress keeps int(N * (1 - compression_ratio)), at least 1; match it exactly.
                policy.retention = max(1, int(args.context * setting.retention)) / args.context
            identity = (repr(policy), setting.sink_tokens, setting.recent_window, setting.all_candidates,
                        setting.kv_dtype)
        if identity in done:
            results[setting.key] = done[identity]
            continue
        if setting.policy != "full":
            keep = policy.select(source.span(mask))
        with kv_quantization(quantization):
            nll = continue_from_prefill(model, source, continuation, keep)
        ratio = math.exp(float(nll.mean() - full_nll.mean()))
        error = float("nan")
        if keep is not None:
            error = float(attention_output_error(queries, keys, values, keep).mean())
        kept_sets = None
        if setting.all_candidates:
            kept_sets = [keep.indices(layer).tolist() for layer in range(num_layers)]
        results[setting.key] = done[identity] = (ratio, error, kept_sets)
    energy = _energy(prefilled, text_candidate_mask(args.context, args.sink_tokens, args.recent_window),
                     (0.1, 0.2, 0.3, 0.5))
    return results, energy, float(full_nll.mean())


# ------------------------------------------------------------------------------------ kvpress
def _kvpress_worker(argv: list[str]) -> None:
    """Runs inside kvpress's own venv: compress with kvpress presses, report NLL and kept sets."""
    parser = argparse.ArgumentParser(prog="fidelity kvpress-worker")
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import kvpress
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(1)
    job = json.loads(Path(args.windows).read_text())
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    context = job["context"]
    import importlib.metadata

    out = {"kvpress": importlib.metadata.version("kvpress"), "machine": _machine(), "runs": []}
    for window_index, ids in enumerate(job["windows"]):
        ids = torch.tensor([ids])
        with torch.no_grad():
            full_cache = DynamicCache(config=model.config)
            model(ids[:, :context], past_key_values=full_cache, use_cache=True)
        full_keys = [full_cache.layers[i].keys[0] for i in range(len(full_cache.layers))]
        for retention in job["retention"]:
            for ours, class_name in KVPRESS_PRESSES.items():
                kwargs = {"compression_ratio": 1 - retention}
                if class_name == "RandomPress":
                    kwargs["seed"] = 0
                press = getattr(kvpress, class_name)(**kwargs)
                with torch.no_grad():
                    cache = DynamicCache(config=model.config)
                    with press(model):
                        prefill = model(ids[:, :context], past_key_values=cache, use_cache=True)
                    n = ids.shape[1] - context
                    positions = torch.arange(context, context + n - 1)[None]
                    logits = model(ids[:, context:-1], past_key_values=cache, position_ids=positions,
                                   use_cache=True).logits[0]
                first = -torch.log_softmax(prefill.logits[0, -1].float(), -1)[ids[0, context]]
                nll = torch.cat([first[None], F.cross_entropy(logits.float(), ids[0, context + 1 :], reduction="none")])
                kept = []
                for layer, layer_keys in enumerate(full_keys):
                    compressed = cache.layers[layer].keys[0][:, : cache.layers[layer].keys.shape[2] - (n - 1)]
                    match = (compressed[:, :, None, :] == layer_keys[:, None, :, :]).all(-1)  # [H, K, N]
                    kept.append(match.float().argmax(-1).sort(dim=-1).values.tolist())
                out["runs"].append({"window": window_index, "policy": ours, "retention": retention,
                                    "nll": nll.tolist(), "kept": kept})
        print(f"kvpress window {window_index + 1}/{len(job['windows'])} done", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(out))


def _run_kvpress(args, windows: list[dict], model_dir: str) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        out = Path(tmp) / "out.json"
        job.write_text(json.dumps({"context": args.context, "retention": [args.kvpress_retention],
                                   "windows": [w["ids"] for w in windows]}))
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        command = [args.kvpress_python, "-m", "benchmarks.fidelity", "kvpress-worker",
                   "--model", model_dir, "--windows", str(job), "--out", str(out)]
        done = subprocess.run(command, env=env, cwd=str(Path(__file__).resolve().parents[1]))
        if done.returncode != 0:
            print(f"kvpress worker failed with exit code {done.returncode}", file=sys.stderr)
            return None
        return json.loads(out.read_text())


def _compare_kvpress(kvpress_out: dict, ours: dict, full_nll_means: list[float], retention: float) -> list[dict]:
    rows = []
    for policy in KVPRESS_PRESSES:
        theirs = [r for r in kvpress_out["runs"] if r["policy"] == policy and r["retention"] == retention]
        mine = ours[policy]
        ratios_theirs, ratios_ours, jaccards = [], [], []
        for run in theirs:
            window = run["window"]
            ratio_theirs = math.exp(sum(run["nll"]) / len(run["nll"]) - full_nll_means[window])
            ratio_ours, kept_ours = mine[window]
            ratios_theirs.append(ratio_theirs)
            ratios_ours.append(ratio_ours)
            per_unit = []
            for layer_theirs, layer_ours in zip(run["kept"], kept_ours):
                for head_theirs, head_ours in zip(layer_theirs, layer_ours):
                    a, b = set(head_theirs), set(head_ours)
                    per_unit.append(len(a & b) / max(1, len(a | b)))
            jaccards.append(sum(per_unit) / len(per_unit))
        rows.append({
            "policy": policy, "retention": retention, "windows": len(theirs),
            "ppl_ratio_kvpress": _summary(ratios_theirs), "ppl_ratio_ours": _summary(ratios_ours),
            "keep_set_jaccard": _summary(jaccards),
        })
    return rows


# ------------------------------------------------------------------------------------ statistics
def _summary(values: list[float]) -> dict:
    """mean, 95% t-interval of the mean, std, geometric mean, min, max over windows."""
    from scipy import stats

    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"n": 0}
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else float("nan")
    positive = all(v > 0 for v in values)
    return {
        "n": n, "mean": mean, "ci95": [mean - half, mean + half], "std": std,
        "geo_mean": math.exp(statistics.fmean(math.log(v) for v in values)) if positive else None,
        "min": min(values), "max": max(values),
    }


def _paired(ours: list[float], theirs: list[float]) -> dict:
    """Paired comparison of perplexity ratios on the same windows (ours - theirs): Wilcoxon
    signed-rank test (two-sided) on log ratios, mean difference with a 95% t-interval, wins."""
    from scipy import stats

    differences = [a - b for a, b in zip(ours, theirs)]
    log_differences = [math.log(a) - math.log(b) for a, b in zip(ours, theirs)]
    n = len(differences)
    mean = statistics.fmean(differences)
    std = statistics.stdev(differences) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else float("nan")
    if n == 0 or all(d == 0 for d in log_differences):
        p_value = 1.0
    else:
        p_value = float(stats.wilcoxon(log_differences, zero_method="wilcox", alternative="two-sided").pvalue)
    return {
        "n": n, "mean_difference": mean, "ci95": [mean - half, mean + half],
        "mean_log_ratio": statistics.fmean(log_differences) if n else float("nan"),
        "wins": sum(d < 0 for d in differences), "losses": sum(d > 0 for d in differences),
        "wilcoxon_p": p_value,
        "significantly_lower": p_value < 0.05 and mean < 0 and statistics.fmean(log_differences) < 0,
    }


def _analyse(report: dict) -> dict:
    """Everything derived from the raw per-window runs (``report["runs"]``)."""
    windows = report["windows"]
    splits = {"tune": [i for i, w in enumerate(windows) if w["split"] == "tune"],
              "held_out": [i for i, w in enumerate(windows) if w["split"] == "held_out"]}
    splits["all"] = list(range(len(windows)))
    settings = {s["key"]: s for s in report["settings"]}
    runs = report["runs"]

    def values(key: str, index: list[int], field: int = 0) -> list[float]:
        return [runs[key][i][field] for i in index]

    rows = {name: [] for name in ("main", "variants", "kv_dtype", "granularity")}
    for key, setting in settings.items():
        if setting["group"] == "kvpress_ours":
            continue
        row = {**{k: setting[k] for k in ("group", "label", "policy", "retention", "options", "kv_dtype")}}
        for split, index in splits.items():
            if index:
                row[split] = {"ppl_ratio": _summary(values(key, index)),
                              "attn_error": _summary(values(key, index, 1))}
        # compatibility with benchmarks/make_report.py: top-level numbers are over all windows
        row["ppl_ratio"], row["attn_error"] = row["all"]["ppl_ratio"], row["all"]["attn_error"]
        group = {"main": "main", "variant": "variants", "kv_dtype": "kv_dtype"}[setting["group"]]
        rows[group].append(row)

    def key_of(group: str, label: str, retention: float) -> str | None:
        key = f"{group}|{label}|{retention}"
        return key if key in runs else None

    comparisons = []
    retentions = sorted({s["retention"] for s in settings.values() if s["group"] == "main"}, reverse=True)
    for retention in retentions:
        ours = key_of("main", "flashcache", retention)
        if ours is None:
            continue
        for other in MAIN_POLICIES:
            theirs = key_of("main", other, retention)
            if theirs is None or other == "flashcache":
                continue
            for split, index in splits.items():
                if index:
                    comparisons.append({"retention": retention, "split": split, "against": other,
                                        **_paired(values(ours, index), values(theirs, index))})
    variant_comparisons = []
    for key, setting in settings.items():
        if setting["group"] != "variant":
            continue
        default = key_of("main", "flashcache", setting["retention"])
        if default is None:
            continue
        for split, index in splits.items():
            if index:
                variant_comparisons.append({"variant": setting["label"], "retention": setting["retention"],
                                            "split": split, **_paired(values(key, index), values(default, index))})
    return {"rows": rows, "comparisons": comparisons, "variant_comparisons": variant_comparisons,
            "targets": _targets(rows["main"], comparisons)}


def _targets(main_rows: list[dict], comparisons: list[dict]) -> dict:
    """The issue's acceptance on held-out text (all windows when there is no held-out set)."""
    split = "held_out" if any("held_out" in r for r in main_rows) else "all"
    checks, numbers = {}, {}
    means = {(r["policy"], r["retention"]): r[split]["ppl_ratio"]["mean"] for r in main_rows if split in r}
    for retention in ACCEPTANCE_RETENTIONS:
        if ("flashcache", retention) not in means:
            continue
        ours = means[("flashcache", retention)]
        numbers[str(retention)] = {"flashcache": ours}
        for baseline in ACCEPTANCE_BASELINES:
            found = [c for c in comparisons if c["retention"] == retention and c["split"] == split
                     and c["against"] == baseline]
            if found:
                checks[f"r{retention}: significantly below {baseline}"] = bool(found[0]["significantly_lower"])
                numbers[str(retention)][baseline] = means[(baseline, retention)]
        if ("snapkv", retention) in means:
            snapkv = means[("snapkv", retention)]
            checks[f"r{retention}: within 3% of snapkv"] = ours <= 1.03 * snapkv
            numbers[str(retention)]["snapkv"] = snapkv
    return {"split": split, "checks": checks, "means": numbers, "met": bool(checks) and all(checks.values())}


# ------------------------------------------------------------------------------------ plot
def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analysis = report["analysis"]
    main = analysis["rows"]["main"]
    split = analysis["targets"]["split"]
    figure, axes = plt.subplots(1, 3, figsize=(18, 5))
    policies = list(dict.fromkeys(row["policy"] for row in main))
    for offset, policy in enumerate(policies):
        rows = sorted((r for r in main if r["policy"] == policy and split in r), key=lambda r: r["retention"])
        if not rows:
            continue
        x = [r["retention"] * (1 + 0.025 * (offset - len(policies) / 2)) for r in rows]
        mean = [r[split]["ppl_ratio"]["mean"] for r in rows]
        low = [m - r[split]["ppl_ratio"]["ci95"][0] for m, r in zip(mean, rows)]
        high = [r[split]["ppl_ratio"]["ci95"][1] - m for m, r in zip(mean, rows)]
        style = dict(marker="o", linewidth=2.6 if policy == "flashcache" else 1.2,
                     linestyle="--" if policy in ATTENTION_BASED else "-")
        axes[0].errorbar(x, mean, yerr=[low, high], label=policy, capsize=3, **style)
    title = "held-out text" if split == "held_out" else "all windows"
    axes[0].set(xlabel="retention (share of candidate tokens kept)", ylabel="continuation perplexity ratio",
                xscale="log", yscale="log", title=f"Perplexity ratio, shared set, {title} (mean, 95% CI)")
    retentions_shown = sorted({r["retention"] for r in main})
    axes[0].set_xticks(retentions_shown, [str(r) for r in retentions_shown])
    axes[0].minorticks_off()
    axes[0].legend(fontsize=8)
    # Panel 2: paired difference of the default against each baseline (held-out), per retention.
    comparisons = [c for c in analysis["comparisons"] if c["split"] == split]
    retentions = sorted({c["retention"] for c in comparisons}, reverse=True)
    others = list(dict.fromkeys(c["against"] for c in comparisons))
    width = 0.8 / max(1, len(retentions))
    for index, retention in enumerate(retentions):
        rows = {c["against"]: c for c in comparisons if c["retention"] == retention}
        y = [i + (index - (len(retentions) - 1) / 2) * width for i in range(len(others))]
        mean = [rows[o]["mean_difference"] if o in rows else float("nan") for o in others]
        err = [[m - rows[o]["ci95"][0] if o in rows else 0 for o, m in zip(others, mean)],
               [rows[o]["ci95"][1] - m if o in rows else 0 for o, m in zip(others, mean)]]
        axes[1].barh(y, mean, height=width, xerr=err, capsize=2, label=f"retention {retention}")
        for yy, o in zip(y, others):
            if o in rows and rows[o]["significantly_lower"]:
                axes[1].annotate("*", (0, yy), fontsize=12, va="center")
    axes[1].axvline(0, color="black", linewidth=0.8)
    axes[1].set_yticks(range(len(others)), others)
    axes[1].set(xlabel="flashcache minus policy, perplexity ratio (paired; < 0: flashcache better)",
                title=f"Paired differences, {title} (95% CI; * Wilcoxon p<0.05)")
    axes[1].legend(fontsize=8)
    energy = report["energy"]["0.2"]
    layers = range(len(energy["values"]))
    for key, label in (("keys_post_rope", "K post-RoPE"), ("keys_pre_rope", "K pre-RoPE"), ("values", "V")):
        axes[2].plot(layers, energy[key], marker=".", label=label)
    axes[2].axhline(0.9, color="grey", linestyle=":", label="paper's 90%")
    axes[2].set(xlabel="layer", ylabel="energy share in lowest 20% frequencies", ylim=(0, 1),
                title="Low-frequency energy (gamma = 0.2)")
    axes[2].legend(fontsize=8)
    config = report["config"]
    counts = {s: sum(w["split"] == s for w in report["windows"]) for s in ("tune", "held_out")}
    figure.suptitle(f"{config['model_name']}: {counts['tune']} tuning + {counts['held_out']} held-out windows, "
                    f"context {config['context']}, continuation {config['continuation']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------ main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF model directory (default: SmolLM2-135M from flashcache_sglang.testing)")
    parser.add_argument("--text", action="append", default=[], help="tuning text source (repeatable)")
    parser.add_argument("--held-out-text", action="append", default=[], help="held-out text source (repeatable)")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--retention", type=float, nargs="+", default=[0.5, 0.2, 0.1])
    parser.add_argument("--variant-retention", type=float, nargs="+", default=[0.2, 0.1])
    parser.add_argument("--policies", nargs="+", default=["all"])
    parser.add_argument("--windows-per-text", type=int, default=3)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--recent-window", type=int, default=64)
    parser.add_argument("--observation-window", type=int, default=64, help="SnapKV window (queries kept)")
    parser.add_argument("--no-ablations", dest="ablations", action="store_false", help="skip the scoring variants")
    parser.add_argument("--no-kv-dtypes", dest="kv_dtypes", action="store_false", help="skip the bf16/FP8 KV rows")
    parser.add_argument("--kvpress-python", help="python of a venv with kvpress installed (cross-check)")
    parser.add_argument("--kvpress-retention", type=float, default=0.2)
    parser.add_argument("--kvpress-windows", type=int, default=4, help="first N windows for the kvpress check")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG plot here")
    parser.add_argument("--reanalyze", metavar="JSON", help="recompute statistics from a saved run; no model")
    parser.add_argument("--markdown", metavar="OUT", help="also write the result tables as markdown here")
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["kvpress-worker"]:
        _kvpress_worker(argv[1:])
        return {}
    parser = _parser()
    args = parser.parse_args(argv)
    if args.reanalyze:
        report = json.loads(Path(args.reanalyze).read_text())
        return _finish(report, args, args.json or args.reanalyze)
    if not args.text and not args.held_out_text:
        parser.error("give at least one --text or --held-out-text source")
    for retention in args.retention + args.variant_retention + [args.kvpress_retention]:
        if not 0 < retention <= 1:
            parser.error(f"retention must be in (0, 1], got {retention}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model_dir = args.model
    if model_dir is None:
        from flashcache_sglang.testing.models import smollm2_dir

        model_dir = str(smollm2_dir())
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sources = [("tune", s) for s in args.text] + [("held_out", s) for s in args.held_out_text]
    windows = _windows(tokenizer, sources, args.context + args.continuation, args.windows_per_text)
    settings = _settings(args)
    kvpress_settings = _kvpress_settings(args) if args.kvpress_python else []
    runs: dict[str, list] = {s.key: [] for s in settings + kvpress_settings}
    kept_sets: dict[str, list] = {s.key: [] for s in kvpress_settings}
    energies, full_nll_means = [], []
    for index, window in enumerate(windows):
        tick = time.time()
        chosen = settings + (kvpress_settings if index < args.kvpress_windows else [])
        results, energy, full_nll_mean = _run_window(model, window, args, chosen)
        full_nll_means.append(full_nll_mean)
        for key, (ratio, error, kept) in results.items():
            runs[key].append([ratio, error])
            if key in kept_sets:
                kept_sets[key].append(kept)
        energies.append(energy)
        elapsed = time.time() - started
        print(f"window {index + 1}/{len(windows)} [{window['split']}] {window['text']}@{window['start']}: "
              f"{len(results)} settings in {time.time() - tick:.0f}s; elapsed {elapsed / 60:.1f} min, "
              f"ETA {elapsed / (index + 1) * (len(windows) - index - 1) / 60:.1f} min", file=sys.stderr, flush=True)

    num_layers = len(energies[0]["0.2"]["values"])
    energy = {
        gamma: {key: [sum(e[gamma][key][layer] for e in energies) / len(energies) for layer in range(num_layers)]
                for key in energies[0][gamma]}
        for gamma in energies[0]
    }
    report = {
        "benchmark": "fidelity",
        "config": {
            "model": model_dir, "model_name": Path(model_dir).name,
            "texts": {"tune": args.text, "held_out": args.held_out_text},
            "context": args.context, "continuation": args.continuation, "retention": args.retention,
            "variant_retention": args.variant_retention, "sink_tokens": args.sink_tokens,
            "recent_window": args.recent_window, "observation_window": args.observation_window,
            "command": "python -m benchmarks.fidelity " + " ".join(argv),
            "candidates": "all context tokens but the first sink_tokens and the last recent_window",
            "statistics": "mean and 95% t-interval over windows; paired: Wilcoxon signed-rank (two-sided) on "
                          "per-window log perplexity ratios, mean paired difference with 95% t-interval",
            "kv_quantization": "bf16: round to bfloat16; fp8_e4m3: per-layer scale amax/448 over the context's "
                               "K (resp. V), x / scale cast to float8_e4m3fn, times scale; applied to every K/V "
                               "attention reads after prefill (the prefill's own attention is float32)",
        },
        "machine": _machine(),
        "windows": [{k: w[k] for k in ("text", "source", "split", "start")} for w in windows],
        "settings": [{**asdict(s), "options": dict(s.options), "key": s.key} for s in settings],
        "runs": {key: value for key, value in runs.items() if not key.startswith("kvpress_ours")},
        "full_nll_mean": full_nll_means,
        "energy": energy,
        "energy_mean": {gamma: {key: sum(v) / len(v) for key, v in entry.items()} for gamma, entry in energy.items()},
    }
    if kvpress_settings:
        # Full-context NLL per window turns kvpress NLLs into ratios: recover it from our own run
        # of the same window (ratio = exp(mean nll_c - mean nll_full)).
        count = min(args.kvpress_windows, len(windows))
        ours = {s.policy: [(runs[s.key][i][0], kept_sets[s.key][i]) for i in range(count)] for s in kvpress_settings}
        kvpress_out = _run_kvpress(args, windows[:count], model_dir)
        if kvpress_out is not None:
            report["kvpress"] = {
                "version": kvpress_out["kvpress"], "machine": kvpress_out["machine"],
                "windows": [f"{w['text']}@{w['start']}" for w in windows[:count]],
                "setting": "no protected tokens, one set per KV head, kvpress's n_kept = int(N * retention)",
                "rows": _compare_kvpress(kvpress_out, ours, full_nll_means, args.kvpress_retention),
            }
    report["elapsed_s"] = time.time() - started
    return _finish(report, args, args.json)


def _finish(report: dict, args, json_path) -> dict:
    """Analyse the report, write its JSON / plot / markdown where asked, print its table."""
    report["analysis"] = _analyse(report)
    report["targets"] = report["analysis"]["targets"]
    report["main"] = report["analysis"]["rows"]["main"]  # what benchmarks/make_report.py reads
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1))
    if args.plot:
        _plot(report, args.plot)
    if args.markdown:
        Path(args.markdown).write_text(markdown_tables(report))
    _print_table(report)
    return report


def markdown_tables(report: dict) -> str:
    """The result tables of a report as markdown (the prose around them is written by hand)."""
    analysis = report["analysis"]
    splits = [s for s in ("tune", "held_out") if any(s in r for r in analysis["rows"]["main"])]
    names = {"tune": "tuning text", "held_out": "held-out text", "all": "all windows"}
    counts = {s: sum(w["split"] == s for w in report["windows"]) for s in ("tune", "held_out")}
    out = []

    def table(header: list[str], rows: list[list[str]]) -> None:
        out.extend(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)])
        out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        out.append("")

    def ratio(summary: dict) -> str:
        return _fmt(summary) if summary.get("n") else "-"

    for retention in sorted({r["retention"] for r in analysis["rows"]["main"]}, reverse=True):
        rows = [r for r in analysis["rows"]["main"] if r["retention"] == retention]
        rows.sort(key=lambda r: r[splits[-1]]["ppl_ratio"]["mean"])
        out.append(f"**Retention {retention}**: perplexity ratio, mean [95% CI]; attention error (mean)")
        out.append("")
        header = ["policy"] + [f"{names[s]} ({counts[s]} windows)" for s in splits] + ["attn err (held-out)"]
        table(header, [[r["policy"]] + [ratio(r[s]["ppl_ratio"]) for s in splits]
                       + [f"{r[splits[-1]]['attn_error'].get('mean', float('nan')):.3f}"] for r in rows])
    for split in splits:
        comparisons = [c for c in analysis["comparisons"] if c["split"] == split]
        if not comparisons:
            continue
        out.append(f"**Paired, {names[split]}**: flashcache minus policy, perplexity ratio; Wilcoxon "
                   "signed-rank p on log ratios; windows where flashcache is lower")
        out.append("")
        table(["retention", "policy", "mean difference [95% CI]", "Wilcoxon p", "flashcache lower"],
              [[c["retention"], c["against"],
                f"{c['mean_difference']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]",
                f"{c['wilcoxon_p']:.4f}" + (" *" if c["significantly_lower"] else ""),
                f"{c['wins']}/{c['n']}"] for c in comparisons])
    variants = analysis["rows"]["variants"]
    if variants:
        by_key = {(c["variant"], c["retention"], c["split"]): c for c in analysis["variant_comparisons"]}
        out.append("**Variants of the default** (one change each): perplexity ratio, mean [95% CI]; "
                   "paired difference to the default (Wilcoxon p)")
        out.append("")
        header = ["retention", "variant"]
        for split in splits:
            header += [names[split], "vs default"]
        rows = []
        for row in variants:
            line = [row["retention"], row["label"]]
            for split in splits:
                comparison = by_key.get((row["label"], row["retention"], split))
                line.append(ratio(row[split]["ppl_ratio"]))
                line.append("-" if comparison is None else
                            f"{comparison['mean_difference']:+.3f} (p={comparison['wilcoxon_p']:.3f})")
            rows.append(line)
        table(header, rows)
    kv_rows = analysis["rows"]["kv_dtype"]
    if kv_rows:
        out.append("**KV dtype**: perplexity ratio against the float32 full cache, all windows, mean [95% CI]")
        out.append("")
        table(["setting", "retention", "ratio"], [[r["label"], r["retention"], ratio(r["all"]["ppl_ratio"])]
                                                  for r in kv_rows])
    if "kvpress" in report:
        kv = report["kvpress"]
        out.append(f"**kvpress {kv['version']} cross-check** ({kv['setting']}; windows {', '.join(kv['windows'])})")
        out.append("")
        table(["policy", "retention", "ppl ratio kvpress", "ppl ratio ours", "keep-set Jaccard (mean, min)"],
              [[r["policy"], r["retention"], f"{r['ppl_ratio_kvpress']['mean']:.4f}",
                f"{r['ppl_ratio_ours']['mean']:.4f}",
                f"{r['keep_set_jaccard']['mean']:.3f}, {r['keep_set_jaccard']['min']:.3f}"] for r in kv["rows"]])
    targets = analysis["targets"]
    out.append(f"**Acceptance ({names[targets['split']]})**: {'met' if targets['met'] else 'not met'}")
    out.append("")
    table(["check", "result"], [[k, "yes" if v else "no"] for k, v in targets["checks"].items()])
    return "\n".join(out)


def _fmt(summary: dict) -> str:
    if not summary.get("n"):
        return "-"
    low, high = summary["ci95"]
    return f"{summary['mean']:.3f} [{low:.3f}, {high:.3f}]"


def _print_table(report: dict) -> None:
    analysis = report["analysis"]
    splits = [s for s in ("tune", "held_out", "all") if any(s in r for r in analysis["rows"]["main"])]
    print(f"{'policy':<20}{'retention':>10}" + "".join(f"{s + ' ppl ratio [95% CI]':>30}" for s in splits))
    for row in sorted(analysis["rows"]["main"], key=lambda r: (-r["retention"], r["all"]["ppl_ratio"]["mean"])):
        print(f"{row['policy']:<20}{row['retention']:>10.2f}"
              + "".join(f"{_fmt(row[s]['ppl_ratio']):>30}" for s in splits))
    print("\npaired: flashcache minus policy (mean difference [95% CI], Wilcoxon p)")
    for comparison in analysis["comparisons"]:
        if comparison["split"] == "all":
            continue
        low, high = comparison["ci95"]
        print(f"  r{comparison['retention']:<5}{comparison['split']:<10}{comparison['against']:<18}"
              f"{comparison['mean_difference']:+.4f} [{low:+.4f}, {high:+.4f}] p={comparison['wilcoxon_p']:.4f}"
              f" wins {comparison['wins']}/{comparison['n']}")
    if analysis["rows"]["variants"]:
        print("\nvariants of the default (one change each)")
        for row in analysis["rows"]["variants"]:
            print(f"  r{row['retention']:<5}{row['label']:<36}"
                  + "".join(f"{_fmt(row[s]['ppl_ratio']):>30}" for s in splits if s in row))
    if analysis["rows"]["kv_dtype"]:
        print("\nKV dtype (ratios against the float32 full cache)")
        for row in analysis["rows"]["kv_dtype"]:
            print(f"  r{row['retention']:<5}{row['label']:<36}{_fmt(row['all']['ppl_ratio']):>30}")
    if "kvpress" in report:
        print(f"\nkvpress {report['kvpress']['version']} cross-check (ppl ratio kvpress / ours, keep-set Jaccard)")
        for row in report["kvpress"]["rows"]:
            print(f"  {row['policy']:<16}{row['retention']:>6.2f}{row['ppl_ratio_kvpress']['mean']:>10.4f}"
                  f"{row['ppl_ratio_ours']['mean']:>10.4f}{row['keep_set_jaccard']['mean']:>8.3f}")
    targets = analysis["targets"]
    print(f"\nacceptance ({targets['split']}): met={targets['met']}", json.dumps(targets["checks"], indent=1))


if __name__ == "__main__":
    main()
