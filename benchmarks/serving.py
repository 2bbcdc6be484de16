"""Serving benchmark: vanilla SGLang vs FlashCache at the same KV pool size, on loopback.

    python -m benchmarks.serving                                  # every workload, full sizes
    python -m benchmarks.serving --quick --workloads long-prompt  # smoke run (CI)
    python -m benchmarks.serving --wait-for-load 1.5 --output benchmarks/results/serving_cpu.json

Every workload runs twice in one invocation: against ``sglang.launch_server`` (vanilla) and
against ``flashcache_sglang.launch_server`` with the same ``--max-total-tokens``, one server at a
time (:class:`flashcache_sglang.testing.server.SGLangServer`). Metric names follow
``python -m sglang.bench_serving``: ``request_throughput``, ``input_throughput``,
``output_throughput`` and ``{mean,median,p99}_{ttft,tpot,itl,e2e_latency}_ms``.

Workloads (prompts are real English text: the licenses in /usr/share/common-licenses):

- ``sessions-held`` (the headline): distinct long contexts are sent one after another until the
  server's first eviction (``sglang:evicted_tokens_total`` on ``/metrics``); the number cached
  before it is how many sessions the pool holds at once. Afterwards a short probe of every
  session (its first ``probe_tokens`` tokens) checks which ones are really still cached.
- ``long-prompt``: ``num_prompts`` distinct long prompts at a fixed concurrency (or a Poisson
  ``request_rate``); how many requests the server runs at once (the scheduler's
  ``#running-req``, logged every decode step, and the overlap of client-side decode intervals)
  and how many prompts' KV fit in the pool. SGLang admits new prefills only until one does not
  fit; its ``batch_is_full`` flag is then cleared only when a running request leaves, so slots
  FlashCache frees right after a prefill raise admission only while prefill still proceeds in
  rounds (chunked prefill: ``--chunked-prefill-size``, 4096 on CPU) or arrivals are spread out.
- ``multi-turn``: ``num_sessions`` conversations of ``turns`` turns, each turn re-sending the
  whole conversation so far; cached-token share and TTFT per turn.
- ``shared-prefix``: one long prefix, cached by a warm-up request, then ``num_branches``
  requests branching off it with different questions.
- ``video-shared-prefix`` and ``video-multi-turn`` (with a Qwen2.5-VL model, ``--model tiny-vl``
  on CPU): the same two shapes over a *video* prefix (``videos`` 2-frame clips of a generated
  video, one Qwen-VL temporal patch each, as the stream backend sends them); FlashCache
  compresses the visual tokens (``candidates`` multimodal). Not in the default set.

After each workload on each server the tool checks for errors and leaked KV slots: it flushes
the cache, and for FlashCache reads the allocator's free count once the tree gave back every
slot (``stats()["last_flush"]``: ``available_after_evict == allocator_size``); for vanilla
SGLang, whose tree exposes no such count, it checks that ``/flush_cache`` succeeded and the server
is alive and healthy (SGLang's own idle-time memory check, on by default, kills a leaking
scheduler). The exit status is non-zero when any request failed or any check did not pass.

Timings on a shared machine are meaningless under load: ``--wait-for-load 1.5`` waits (up to
``--wait-timeout`` seconds) until the 1-minute load average is below 1.5, and the JSON records
the load average before and after every workload.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import requests

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LICENSES_DIR = Path("/usr/share/common-licenses")
BACKENDS = ("vanilla", "flashcache")
WORKLOAD_NAMES = ("sessions-held", "long-prompt", "multi-turn", "shared-prefix")
VIDEO_WORKLOAD_NAMES = ("video-shared-prefix", "video-multi-turn")
# Flags both servers get: the eviction counter comes from /metrics, admission from the
# scheduler's "#running-req" logged at every decode step.
COMMON_SERVER_ARGS = ("--enable-metrics", "--decode-log-interval", "1")
# --quick prompts are short: a smaller prefill chunk makes admission proceed in rounds, as it does
# for the full sizes with SGLang's default chunk (4096 on CPU), so compression between rounds can
# let more requests in.
QUICK_SERVER_ARGS = ("--chunked-prefill-size", "512")
EVICTED_TOKENS_METRIC = "sglang:evicted_tokens_total"
RUNNING_REQ_PATTERN = re.compile(r"Decode batch.*?#running-req: (\d+).*?token usage: ([0-9.]+)")

# Per-workload sizes. Full sizes keep all four workloads on both servers under ~12 minutes on a
# quiet 2-core CPU with SmolLM2-135M in float32; quick sizes keep one workload under a minute.
FULL_SIZES: dict[str, dict[str, Any]] = {
    "sessions-held": {"session_tokens": 1000, "max_sessions": 40, "probe_tokens": 48},
    "long-prompt": {"num_prompts": 8, "prompt_tokens": 1500, "output_tokens": 32,
                    "max_concurrency": 8, "request_rate": math.inf},
    "multi-turn": {"num_sessions": 3, "turns": 3, "context_tokens": 1000, "output_tokens": 24},
    "shared-prefix": {"prefix_tokens": 1500, "num_branches": 8, "output_tokens": 24,
                      "max_concurrency": 8},
    "video-shared-prefix": {"videos": 32, "num_branches": 8, "output_tokens": 16, "max_concurrency": 4},
    "video-multi-turn": {"num_sessions": 3, "turns": 3, "videos": 16, "output_tokens": 16},
}
QUICK_SIZES: dict[str, dict[str, Any]] = {
    "sessions-held": {"session_tokens": 256, "max_sessions": 16, "probe_tokens": 32},
    "long-prompt": {"num_prompts": 4, "prompt_tokens": 256, "output_tokens": 8,
                    "max_concurrency": 4, "request_rate": math.inf},
    "multi-turn": {"num_sessions": 2, "turns": 2, "context_tokens": 200, "output_tokens": 8},
    "shared-prefix": {"prefix_tokens": 256, "num_branches": 4, "output_tokens": 8,
                      "max_concurrency": 4},
    "video-shared-prefix": {"videos": 8, "num_branches": 4, "output_tokens": 8, "max_concurrency": 4},
    "video-multi-turn": {"num_sessions": 2, "turns": 2, "videos": 6, "output_tokens": 8},
}
# 7800 slots: vanilla holds 7 sessions of 1000 tokens; FlashCache at retention 0.2 keeps ~229 slots
# a session and needs one uncompressed prefill's room (1001) free, so (7800 - 1001) // 229 + 1 = 30.
FULL_POOL_TOKENS = 7800
QUICK_POOL_TOKENS = 1024
DEFAULT_FLASHCACHE = {"retention": 0.2, "candidates": "text", "sink_tokens": 4, "recent_tokens": 32}
VIDEO_FPS, VIDEO_MAX_PIXELS = 2.0, 28 * 28 * 16  # the tiny Qwen2.5-VL's processor limit
QUESTION_TOPICS = ("redistribution", "warranty", "patents", "source code", "liability", "license terms",
                   "modifications", "termination", "trademarks", "compatibility", "the authors",
                   "notices", "distribution of binaries", "sublicensing", "jurisdiction", "fees")


# ---------------------------------------------------------------------------------------- text
class LicenseCorpus:
    """Real English text: every license file in ``folder``, tokenized once and concatenated.

    Windows start at distinct offsets, so two windows never share a radix-tree prefix (the
    corpus holds ~52K SmolLM2 tokens).
    """

    def __init__(self, tokenizer, folder: Path = LICENSES_DIR) -> None:
        files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.is_symlink())
        if not files:
            raise FileNotFoundError(f"no license texts under {folder}")
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        for path in files:
            self.ids += tokenizer(path.read_text(errors="replace"))["input_ids"]

    def windows(self, count: int, length: int, salt: int = 0) -> list[list[int]]:
        """``count`` windows of ``length`` tokens, starts spread evenly over the corpus.

        ``salt`` shifts every start, so different workloads get different texts.
        """
        if not 1 <= length <= len(self.ids) - 64:
            raise ValueError(f"window length {length} must be in [1, {len(self.ids) - 64}] (corpus size)")
        span = len(self.ids) - length
        stride = span // count if count > 1 else 0
        if count > 1 and stride < 8:
            raise ValueError(f"{count} windows of {length} tokens do not fit in {len(self.ids)} tokens "
                             "with distinct starts")
        offset = (salt * 37) % max(stride, 1)
        return [self.ids[offset + i * stride: offset + i * stride + length] for i in range(count)]

    def question(self, index: int) -> list[int]:
        topic = QUESTION_TOPICS[index % len(QUESTION_TOPICS)]
        return self.tokenizer(f"\n\nQuestion {index + 1}: what does the text say about {topic}?\nAnswer:",
                              add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------- client
@dataclass
class RequestSpec:
    """One /generate call: greedy, fixed output length (``ignore_eos``) like bench_serving."""

    input_ids: list[int]
    output_tokens: int
    label: str = ""
    body: Optional[dict] = None  # instead of input_ids: e.g. {"text": ..., "video_data": [...]}


@dataclass
class RequestOutcome:
    """What the client saw; times are ``time.perf_counter()`` seconds."""

    label: str
    prompt_tokens: int
    success: bool = False
    error: str = ""
    output_tokens: int = 0
    cached_tokens: int = 0
    start: float = 0.0
    first_token: float = 0.0
    end: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    flashcache: Optional[dict] = None

    @property
    def ttft(self) -> float:
        return self.first_token - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> Optional[float]:
        if self.output_tokens < 2:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)


def stream_generate(url: str, spec: RequestSpec, timeout: float) -> RequestOutcome:
    """POST /generate with ``stream``; TTFT at the first token, ITL between token chunks."""
    outcome = RequestOutcome(label=spec.label, prompt_tokens=len(spec.input_ids))
    body = {**(spec.body or {"input_ids": spec.input_ids}), "stream": True,
            "sampling_params": {"max_new_tokens": spec.output_tokens, "temperature": 0.0, "ignore_eos": True}}
    outcome.start = time.perf_counter()
    seen, last_chunk, final = 0, outcome.start, None
    try:
        with requests.post(f"{url}/generate", json=body, stream=True, timeout=timeout) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {response.text[:500]}"
                return outcome
            for line in response.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    outcome.error = f"server error: {chunk['error']}"
                    return outcome
                now = time.perf_counter()
                produced = chunk.get("meta_info", {}).get("completion_tokens", 0)
                if produced > seen:
                    if seen == 0:
                        outcome.first_token = now
                    else:
                        outcome.itl.append(now - last_chunk)
                    last_chunk, seen = now, produced
                    ids = chunk.get("output_ids") or []
                    # Cumulative by default; incremental when the server streams deltas.
                    outcome.output_ids = list(ids) if len(ids) == produced else outcome.output_ids + list(ids)
                final = chunk
    except (requests.RequestException, ValueError) as error:
        outcome.error = f"{type(error).__name__}: {error}"
        return outcome
    outcome.end = time.perf_counter()
    if final is None or seen == 0:
        outcome.error = "stream ended without a token"
        return outcome
    meta = final["meta_info"]
    outcome.output_tokens = meta.get("completion_tokens", seen)
    outcome.cached_tokens = meta.get("cached_tokens", 0)
    outcome.prompt_tokens = meta.get("prompt_tokens", outcome.prompt_tokens)
    reports = meta.get("flashcache")
    outcome.flashcache = reports[0] if isinstance(reports, list) and reports else reports
    outcome.success = True
    return outcome


def run_requests(url: str, specs: Sequence[RequestSpec], *, max_concurrency: int, request_rate: float,
                 deadline: float, timeout: float, seed: int = 0) -> tuple[list[RequestOutcome], float, int]:
    """Send ``specs`` at ``request_rate`` (Poisson; inf = all at once), at most ``max_concurrency``
    in flight, none started after ``deadline`` (monotonic).

    Returns (outcomes in spec order, wall duration in seconds, number of requests not sent).
    """
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    rng = random.Random(seed)
    slots = threading.Semaphore(max_concurrency)
    futures = []
    started = time.perf_counter()

    def one(spec: RequestSpec) -> RequestOutcome:
        try:
            return stream_generate(url, spec, timeout)
        finally:
            slots.release()

    with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
        for spec in specs:
            if math.isfinite(request_rate):
                time.sleep(rng.expovariate(request_rate))
            slots.acquire()
            if time.monotonic() > deadline:
                slots.release()
                break
            futures.append(pool.submit(one, spec))
        outcomes = [future.result() for future in futures]
    return outcomes, time.perf_counter() - started, len(specs) - len(futures)


# ---------------------------------------------------------------------------------------- metrics
def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(name: str, seconds: Sequence[float]) -> dict[str, float]:
    """``{mean,median,p99}_{name}_ms`` as bench_serving names them (NaN when empty)."""
    ms = [1000.0 * s for s in seconds]
    mean = sum(ms) / len(ms) if ms else float("nan")
    return {f"mean_{name}_ms": mean, f"median_{name}_ms": _percentile(ms, 50), f"p99_{name}_ms": _percentile(ms, 99)}


def serving_metrics(outcomes: Sequence[RequestOutcome], duration: float) -> dict[str, Any]:
    """bench_serving's summary over the successful requests of one run."""
    done = [o for o in outcomes if o.success]
    input_tokens = sum(o.prompt_tokens for o in done)
    output_tokens = sum(o.output_tokens for o in done)
    metrics: dict[str, Any] = {
        "completed": len(done),
        "errors": len(outcomes) - len(done),
        "duration": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration if duration > 0 else float("nan"),
        "input_throughput": input_tokens / duration if duration > 0 else float("nan"),
        "output_throughput": output_tokens / duration if duration > 0 else float("nan"),
    }
    metrics.update(distribution_ms("ttft", [o.ttft for o in done]))
    metrics.update(distribution_ms("tpot", [o.tpot for o in done if o.tpot is not None]))
    metrics.update(distribution_ms("itl", [gap for o in done for gap in o.itl]))
    metrics.update(distribution_ms("e2e_latency", [o.e2e for o in done]))
    metrics["concurrency"] = sum(o.e2e for o in done) / duration if duration > 0 else float("nan")
    metrics["cached_token_share"] = (sum(o.cached_tokens for o in done) / input_tokens) if input_tokens else 0.0
    slots = [o.flashcache["prompt_kv_slots"] for o in done if o.flashcache and "prompt_kv_slots" in o.flashcache]
    if slots:
        metrics["mean_prompt_kv_slots"] = sum(slots) / len(slots)
    return metrics


def max_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """Largest number of [start, end) intervals covering one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda event: (event[0], event[1]))
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


def prometheus_value(text: str, name: str) -> float:
    """Sum of a metric's samples over all label sets (0 when the server has not emitted it yet)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def running_requests_in_log(log_text: str) -> dict[str, float]:
    """Peak ``#running-req`` and token usage over the scheduler's decode-step log lines."""
    peaks = [(int(m.group(1)), float(m.group(2))) for m in RUNNING_REQ_PATTERN.finditer(log_text)]
    return {"max_running_requests": max((p[0] for p in peaks), default=0),
            "peak_token_usage": max((p[1] for p in peaks), default=0.0),
            "decode_steps_logged": len(peaks)}


def ratio(flashcache: Any, vanilla: Any) -> Optional[float]:
    if not isinstance(flashcache, (int, float)) or not isinstance(vanilla, (int, float)):
        return None
    if vanilla == 0 or math.isnan(vanilla) or math.isnan(flashcache):
        return None
    return flashcache / vanilla


# ---------------------------------------------------------------------------------------- server side
def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def wait_for_load(threshold: float, timeout: float) -> dict[str, Any]:
    """Sleep until the 1-minute load average is below ``threshold`` (or ``timeout`` passes)."""
    started = time.monotonic()
    while True:
        load = load_average()
        waited = time.monotonic() - started
        if load[0] < threshold:
            return {"threshold": threshold, "waited_s": waited, "reached": True, "load_average": load}
        if waited >= timeout:
            return {"threshold": threshold, "waited_s": waited, "reached": False, "load_average": load}
        print(f"[serving] load {load[0]:.2f} >= {threshold}: waiting ({waited:.0f} s so far)", file=sys.stderr,
              flush=True)
        time.sleep(min(20.0, max(1.0, timeout - waited)))


class BenchServer:
    """One started SGLang server plus what the workloads read from it."""

    def __init__(self, server, backend: str, request_timeout: float) -> None:
        self.server = server
        self.backend = backend
        self.url = server.url
        self.request_timeout = request_timeout

    @property
    def is_flashcache(self) -> bool:
        return self.backend == "flashcache"

    def generate(self, input_ids: list[int], output_tokens: int, label: str = "",
                 body: Optional[dict] = None) -> RequestOutcome:
        return stream_generate(self.url, RequestSpec(input_ids, output_tokens, label, body), self.request_timeout)

    def evicted_tokens(self) -> float:
        response = requests.get(f"{self.url}/metrics", timeout=30)
        response.raise_for_status()
        return prometheus_value(response.text, EVICTED_TOKENS_METRIC)

    def log_offset(self) -> int:
        try:
            return self.server.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        with open(self.server.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def flush(self, timeout: float = 120.0) -> dict[str, Any]:
        """Flush the radix cache (retrying while requests drain) and check nothing leaked."""
        deadline = time.monotonic() + timeout
        check: dict[str, Any] = {"flush_ok": False}
        while time.monotonic() < deadline:
            asked_at = time.time()
            try:
                response = requests.post(f"{self.url}/flush_cache", timeout=60)
            except requests.RequestException as error:
                check["error"] = f"{type(error).__name__}: {error}"
                break
            if response.status_code == 200:
                if not self.is_flashcache:
                    check["flush_ok"] = True
                    break
                stats = self.server.stats()
                last = stats.get("last_flush")
                if stats.get("time", 0) >= asked_at and last and last["tree_protected"] == 0:
                    check.update(flush_ok=True, last_flush=last,
                                 leaked_kv_slots=last["allocator_size"] - last["available_after_evict"])
                    break
            time.sleep(1.0)
        check["server_alive"] = self.server.alive()
        try:
            check["healthy"] = requests.get(f"{self.url}/health_generate", timeout=120).status_code == 200
        except requests.RequestException:
            check["healthy"] = False
        if not self.is_flashcache:
            # Vanilla's tree publishes no slot count; SGLang's idle-time check (available +
            # evictable + protected == total, on by default) would have killed a leaking server.
            check["leaked_kv_slots"] = 0 if check["flush_ok"] and check["server_alive"] else None
            check["method"] = "flush_cache succeeded + server alive/healthy (SGLang strict idle memory check on)"
        else:
            check["method"] = "stats()['last_flush']: available_after_evict == allocator_size"
        check["ok"] = bool(check["flush_ok"] and check["server_alive"] and check["healthy"]
                           and check.get("leaked_kv_slots") == 0)
        return check


@dataclass
class WorkloadContext:
    bench: BenchServer
    corpus: LicenseCorpus
    sizes: dict[str, Any]
    deadline: float
    pool_tokens: int
    seed: int
    videos: Sequence[str] = ()  # 2-frame clips for the video workloads


# ---------------------------------------------------------------------------------------- workloads
def run_sessions_held(ctx: WorkloadContext) -> dict[str, Any]:
    """Distinct long contexts, one after another, until the server's first eviction."""
    sizes, bench = ctx.sizes, ctx.bench
    contexts = ctx.corpus.windows(sizes["max_sessions"], sizes["session_tokens"], salt=1)
    baseline = bench.evicted_tokens()
    inserted: list[RequestOutcome] = []
    first_eviction_at = None
    timed_out = False
    for index, ids in enumerate(contexts):
        if time.monotonic() > ctx.deadline:
            timed_out = True
            break
        outcome = bench.generate(ids, 1, label=f"session {index + 1}")
        inserted.append(outcome)
        if not outcome.success:
            break
        if bench.evicted_tokens() > baseline:
            first_eviction_at = index + 1
            break
    held = (first_eviction_at - 1) if first_eviction_at else len([o for o in inserted if o.success])
    # Which sessions are really still cached? A short probe of each, newest first: a hit extends
    # one token, so probes of cached sessions cannot evict the older ones probed after them.
    probe_tokens = sizes["probe_tokens"]
    before_probes = bench.evicted_tokens()
    cached = []
    for index in reversed(range(len(inserted))):
        if not inserted[index].success:
            continue
        probe = bench.generate(contexts[index][:probe_tokens], 1, label=f"probe {index + 1}")
        cached.append({"session": index + 1, "cached_tokens": probe.cached_tokens,
                       "hit": probe.success and probe.cached_tokens >= probe_tokens - 1, "error": probe.error})
    cached.reverse()
    slots = [o.flashcache["prompt_kv_slots"] for o in inserted if o.success and o.flashcache]
    result = {
        "sessions_held": held,
        "first_eviction_at_session": first_eviction_at,
        "reached_eviction": first_eviction_at is not None,
        "sessions_sent": len(inserted),
        "sessions_cached_after_fill": sum(1 for c in cached if c["hit"]),
        "first_session_evicted": bool(cached) and not cached[0]["hit"],
        "probes_evicted_tokens": bench.evicted_tokens() - before_probes,
        "kv_slots_per_session": (sum(slots) / len(slots)) if slots else float(sizes["session_tokens"]),
        "probe_results": cached,
        "mean_prefill_s": (sum(o.e2e for o in inserted if o.success) / max(1, sum(o.success for o in inserted))),
        "errors": sum(not o.success for o in inserted) + sum(1 for c in cached if c["error"]),
        "timed_out": timed_out,
    }
    if not result["reached_eviction"]:
        result["note"] = "no eviction within max_sessions/time limit: sessions_held is a lower bound"
    return result


def run_long_prompt(ctx: WorkloadContext) -> dict[str, Any]:
    """N long prompts at once (or Poisson): admission, throughput, latency."""
    sizes, bench = ctx.sizes, ctx.bench
    prompts = ctx.corpus.windows(sizes["num_prompts"], sizes["prompt_tokens"], salt=2)
    specs = [RequestSpec(ids, sizes["output_tokens"], f"prompt {i + 1}") for i, ids in enumerate(prompts)]
    offset = bench.log_offset()
    outcomes, duration, not_sent = run_requests(
        bench.url, specs, max_concurrency=sizes["max_concurrency"], request_rate=sizes["request_rate"],
        deadline=ctx.deadline, timeout=bench.request_timeout, seed=ctx.seed)
    metrics = serving_metrics(outcomes, duration)
    metrics.update(running_requests_in_log(bench.log_since(offset)))
    done = [o for o in outcomes if o.success]
    metrics["max_concurrent_decoding_client"] = max_overlap([(o.first_token, o.end) for o in done])
    per_request = metrics.get("mean_prompt_kv_slots", float(sizes["prompt_tokens"])) + sizes["output_tokens"]
    metrics["prompts_fitting_in_pool"] = ctx.pool_tokens / per_request
    metrics["not_sent"] = not_sent
    metrics["errors"] += not_sent
    metrics["ttft_by_request_ms"] = [round(1000 * o.ttft, 1) for o in done]
    return metrics


def run_multi_turn(ctx: WorkloadContext) -> dict[str, Any]:
    """Conversations re-sending their growing history every turn."""
    sizes, bench = ctx.sizes, ctx.bench
    contexts = ctx.corpus.windows(sizes["num_sessions"], sizes["context_tokens"], salt=3)
    turns = sizes["turns"]
    started = time.perf_counter()

    def conversation(session: int) -> list[RequestOutcome]:
        history = list(contexts[session])
        outcomes = []
        for turn in range(turns):
            if time.monotonic() > ctx.deadline:
                break
            prompt = history + ctx.corpus.question(session * turns + turn)
            outcome = bench.generate(prompt, sizes["output_tokens"], label=f"session {session + 1} turn {turn + 1}")
            outcomes.append(outcome)
            if not outcome.success:
                break
            history = prompt + outcome.output_ids
        return outcomes

    with ThreadPoolExecutor(max_workers=sizes["num_sessions"]) as pool:
        per_session = list(pool.map(conversation, range(sizes["num_sessions"])))
    duration = time.perf_counter() - started
    outcomes = [o for session in per_session for o in session]
    metrics = serving_metrics(outcomes, duration)
    metrics["per_turn"] = per_turn_metrics(per_session, turns)
    metrics["errors"] += sizes["num_sessions"] * turns - len(outcomes)
    return metrics


def per_turn_metrics(per_session: Sequence[Sequence[RequestOutcome]], turns: int) -> list[dict[str, Any]]:
    """Cached share, TTFT and KV slots of each turn over the sessions."""
    by_turn = []
    for turn in range(turns):
        done = [s[turn] for s in per_session if len(s) > turn and s[turn].success]
        prompt = sum(o.prompt_tokens for o in done)
        entry = {"turn": turn + 1, "requests": len(done),
                 "cached_token_share": (sum(o.cached_tokens for o in done) / prompt) if prompt else 0.0,
                 "mean_prompt_tokens": prompt / len(done) if done else 0.0}
        entry.update(distribution_ms("ttft", [o.ttft for o in done]))
        slots = [o.flashcache["prompt_kv_slots"] for o in done if o.flashcache]
        if slots:
            entry["mean_prompt_kv_slots"] = sum(slots) / len(slots)
        by_turn.append(entry)
    return by_turn


def run_shared_prefix(ctx: WorkloadContext) -> dict[str, Any]:
    """One long prefix cached by a warm-up request, then many branches off it."""
    sizes, bench = ctx.sizes, ctx.bench
    prefix = ctx.corpus.windows(1, sizes["prefix_tokens"], salt=4)[0]
    warmup = bench.generate(prefix, 1, label="warm-up")
    specs = [RequestSpec(prefix + ctx.corpus.question(i), sizes["output_tokens"], f"branch {i + 1}")
             for i in range(sizes["num_branches"])]
    return run_branches(ctx, warmup, specs)


def run_branches(ctx: WorkloadContext, warmup: RequestOutcome, specs: Sequence[RequestSpec]) -> dict[str, Any]:
    """Send the branches of a prefix the warm-up request cached; metrics plus the prefix's KV slots."""
    outcomes, duration, not_sent = run_requests(
        ctx.bench.url, specs, max_concurrency=ctx.sizes["max_concurrency"], request_rate=math.inf,
        deadline=ctx.deadline, timeout=ctx.bench.request_timeout, seed=ctx.seed)
    metrics = serving_metrics(outcomes, duration)
    metrics["warmup_ttft_ms"] = 1000 * warmup.ttft if warmup.success else None
    metrics["prefix_tokens"] = warmup.prompt_tokens if warmup.success else None
    # Vanilla reports no slots: its prefix holds one per token.
    metrics["prefix_kv_slots"] = ((warmup.flashcache or {}).get("prompt_kv_slots", warmup.prompt_tokens)
                                  if warmup.success else None)
    metrics["errors"] += not_sent + (0 if warmup.success else 1)
    metrics["not_sent"] = not_sent
    _vanilla_slots(metrics, outcomes)
    return metrics


VIDEO_QUESTIONS = ("What happens in the video?", "Which colors dominate?", "Is anything moving?",
                   "Describe the first frames.", "Describe the last frames.", "Count the shapes you see.",
                   "Is there any text on screen?", "What changed over time?")


def video_body(videos: Sequence[str], suffix: str = "") -> dict[str, Any]:
    """A Qwen2.5-VL ChatML prompt holding ``videos`` (the stream backend's template) + ``suffix``."""
    from flashcache_sglang.streaming.sglang_backend import PromptTemplate

    template = PromptTemplate()
    text = template.header.format(system=template.system) + template.video * len(videos) + suffix
    return {"text": text, "video_data": list(videos)}


def run_video_shared_prefix(ctx: WorkloadContext) -> dict[str, Any]:
    """One video prefix cached (and compressed) by a warm-up request, then many question branches."""
    from flashcache_sglang.streaming.sglang_backend import PromptTemplate

    sizes, bench, template = ctx.sizes, ctx.bench, PromptTemplate()
    videos = list(ctx.videos[: sizes["videos"]])
    warmup = bench.generate([], 1, label="warm-up", body=video_body(videos))
    specs = [RequestSpec([], sizes["output_tokens"], f"branch {i + 1}",
                         video_body(videos, template.question_suffix([], VIDEO_QUESTIONS[i % len(VIDEO_QUESTIONS)])))
             for i in range(sizes["num_branches"])]
    return run_branches(ctx, warmup, specs)


def _vanilla_slots(metrics: dict[str, Any], outcomes: Sequence[RequestOutcome]) -> None:
    """Vanilla SGLang reports no KV slots: a prompt holds one per token."""
    done = [o for o in outcomes if o.success]
    if "mean_prompt_kv_slots" not in metrics and done:
        metrics["mean_prompt_kv_slots"] = sum(o.prompt_tokens for o in done) / len(done)


def run_video_multi_turn(ctx: WorkloadContext) -> dict[str, Any]:
    """Conversations about a video each: every turn resends the video and the turns so far."""
    from flashcache_sglang.streaming.sglang_backend import PromptTemplate
    from flashcache_sglang.streaming.types import Turn

    sizes, bench, template = ctx.sizes, ctx.bench, PromptTemplate()
    count, turns = sizes["videos"], sizes["turns"]
    if len(ctx.videos) < count * sizes["num_sessions"]:
        raise ValueError(f"video-multi-turn needs {count * sizes['num_sessions']} clips, got {len(ctx.videos)}")
    started = time.perf_counter()

    def conversation(session: int) -> list[RequestOutcome]:
        videos = ctx.videos[session * count: (session + 1) * count]  # distinct videos per session
        history: list[Turn] = []
        outcomes = []
        for turn in range(turns):
            if time.monotonic() > ctx.deadline:
                break
            question = VIDEO_QUESTIONS[(session * turns + turn) % len(VIDEO_QUESTIONS)]
            body = video_body(videos, template.question_suffix(history, question))
            outcome = bench.generate([], sizes["output_tokens"], f"session {session + 1} turn {turn + 1}", body)
            outcomes.append(outcome)
            if not outcome.success:
                break
            answer = ctx.corpus.tokenizer.decode(outcome.output_ids, skip_special_tokens=True)
            history.append(Turn(question=question, answer=answer, asked_at=time.time(), memory_chunks=0))
        return outcomes

    with ThreadPoolExecutor(max_workers=sizes["num_sessions"]) as pool:
        per_session = list(pool.map(conversation, range(sizes["num_sessions"])))
    outcomes = [o for session in per_session for o in session]
    metrics = serving_metrics(outcomes, time.perf_counter() - started)
    _vanilla_slots(metrics, outcomes)
    metrics["per_turn"] = per_turn_metrics(per_session, turns)
    metrics["errors"] += sizes["num_sessions"] * turns - sum(len(s) for s in per_session)
    return metrics


WORKLOADS: dict[str, Callable[[WorkloadContext], dict[str, Any]]] = {
    "sessions-held": run_sessions_held,
    "long-prompt": run_long_prompt,
    "multi-turn": run_multi_turn,
    "shared-prefix": run_shared_prefix,
    "video-shared-prefix": run_video_shared_prefix,
    "video-multi-turn": run_video_multi_turn,
}

# Metrics whose FlashCache / vanilla ratio the report lists, per workload.
RATIO_KEYS = {
    "sessions-held": ("sessions_held", "sessions_cached_after_fill", "kv_slots_per_session", "mean_prefill_s"),
    "long-prompt": ("max_running_requests", "max_concurrent_decoding_client", "prompts_fitting_in_pool",
                    "request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
                    "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "mean_e2e_latency_ms", "duration"),
    "multi-turn": ("cached_token_share", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
                   "median_tpot_ms", "mean_e2e_latency_ms", "duration"),
    "shared-prefix": ("cached_token_share", "prefix_kv_slots", "request_throughput", "output_throughput",
                      "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "mean_e2e_latency_ms"),
    "video-shared-prefix": ("cached_token_share", "prefix_kv_slots", "request_throughput", "output_throughput",
                            "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "mean_e2e_latency_ms"),
    "video-multi-turn": ("cached_token_share", "mean_prompt_kv_slots", "request_throughput", "median_ttft_ms",
                         "p99_ttft_ms", "median_tpot_ms", "mean_e2e_latency_ms", "duration"),
}


# ---------------------------------------------------------------------------------------- driver
def machine_info() -> dict[str, Any]:
    import torch

    try:
        import sglang

        sglang_version = sglang.__version__
    except ImportError:  # pragma: no cover - the benchmark needs it to run at all
        sglang_version = None
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu_model": cpu_model or platform.processor(), "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "sglang": sglang_version,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def resolve_model(name: str) -> str:
    from flashcache_sglang.testing import models

    builders = {"smollm2": models.smollm2_dir, "tiny-llama": models.tiny_llama_dir, "tiny-vl": models.tiny_qwen2_5_vl_dir}
    if name in builders:
        return str(builders[name]())
    if not Path(name, "config.json").exists():
        raise ValueError(f"--model {name!r}: expected one of {sorted(builders)} or a HF model directory")
    return name


def server_details(url: str) -> dict[str, Any]:
    try:
        info = requests.get(f"{url}/server_info", timeout=30).json()
    except (requests.RequestException, ValueError):
        return {}
    state = (info.get("internal_states") or [{}])[0]
    keep = ("max_total_tokens", "chunked_prefill_size", "max_running_requests", "schedule_policy",
            "attention_backend", "dtype", "page_size", "radix_cache_backend", "disable_overlap_schedule")
    details = {key: info.get(key) for key in keep if key in info}
    details["effective_max_running_requests"] = state.get("effective_max_running_requests_per_dp")
    return details


def is_video_run(args) -> bool:
    return any(name in VIDEO_WORKLOAD_NAMES for name in args.workloads)


def server_args(args) -> list[str]:
    extra = list(COMMON_SERVER_ARGS) + (list(QUICK_SERVER_ARGS) if args.quick else [])
    if is_video_run(args):
        mm = {"video": {"fps": VIDEO_FPS, "min_pixels": 28 * 28 * 4, "max_pixels": VIDEO_MAX_PIXELS}}
        extra += ["--enable-multimodal", "--mm-process-config", json.dumps(mm)]
    return extra


def flashcache_settings(args) -> dict[str, Any]:
    """FlashCache's settings: text candidates for text runs, visual tokens for video runs."""
    settings = dict(DEFAULT_FLASHCACHE, retention=args.retention, recent_tokens=args.recent_tokens)
    if is_video_run(args):
        settings = {"retention": args.retention, "candidates": "multimodal", "min_candidates": 8}
    return settings


def needed_videos(args, sizes: dict[str, dict]) -> int:
    counts = [0]
    if "video-shared-prefix" in args.workloads:
        counts.append(sizes["video-shared-prefix"]["videos"])
    if "video-multi-turn" in args.workloads:
        counts.append(sizes["video-multi-turn"]["videos"] * sizes["video-multi-turn"]["num_sessions"])
    return max(counts)


def run_backend(backend: str, args, model_dir: str, corpus: LicenseCorpus, sizes: dict[str, dict],
                log_dir: Path, stop_at: float) -> dict[str, Any]:
    """Start one server, run every selected workload on it, stop it."""
    from flashcache_sglang.testing.server import SGLangServer

    settings = flashcache_settings(args)
    server = SGLangServer(model_dir, flashcache=settings if backend == "flashcache" else None,
                          max_total_tokens=args.max_total_tokens, extra_args=server_args(args),
                          startup_timeout=args.startup_timeout, log_dir=log_dir)
    out: dict[str, Any] = {"workloads": {}}
    started = time.monotonic()
    print(f"[serving] {backend}: starting server (pool {args.max_total_tokens} tokens)", file=sys.stderr, flush=True)
    ACTIVE_SERVERS.append(server)
    try:
        server.start()
    except Exception as error:  # noqa: BLE001 - recorded, the other backend still runs
        out["error"] = f"server start failed: {error}"
        print(f"[serving] {backend}: {out['error']}", file=sys.stderr, flush=True)
        server.stop()
        ACTIVE_SERVERS.remove(server)
        return out
    try:
        out["startup_s"] = time.monotonic() - started
        out["server"] = server_details(server.url)
        bench = BenchServer(server, backend, args.request_timeout)
        for name in args.workloads:
            if time.monotonic() > stop_at:
                out["workloads"][name] = {"skipped": "total time limit reached", "errors": 0}
                continue
            bench.flush()
            load_start = load_average()
            tick = time.monotonic()
            ctx = WorkloadContext(bench=bench, corpus=corpus, sizes=sizes[name], videos=getattr(args, "videos", ()),
                                  deadline=min(stop_at, tick + args.time_limit), pool_tokens=args.max_total_tokens,
                                  seed=args.seed)
            try:
                result = WORKLOADS[name](ctx)
            except Exception as error:  # noqa: BLE001 - a broken workload is an error in the JSON
                result = {"errors": 1, "exception": f"{type(error).__name__}: {error}"}
            result["wall_s"] = time.monotonic() - tick
            result["load_average_start"] = load_start
            result["load_average_end"] = load_average()
            result["leak_check"] = bench.flush()
            if bench.is_flashcache:
                stats = server.stats()
                result["flashcache_stats"] = {k: stats.get(k) for k in (
                    "requests_compressed", "candidate_tokens", "kept_tokens", "slots_saved",
                    "compression_seconds")}
            out["workloads"][name] = result
            print(f"[serving] {backend} {name}: {summary_line(name, result)}", file=sys.stderr, flush=True)
    finally:
        out["server_alive_at_end"] = server.alive()
        if not server.alive():
            out["log_tail"] = server.log_tail(40)
        server.stop()
        ACTIVE_SERVERS.remove(server)
    return out


def summary_line(name: str, result: dict) -> str:
    keys = {"sessions-held": ("sessions_held", "sessions_cached_after_fill", "kv_slots_per_session"),
            "long-prompt": ("max_running_requests", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
                            "median_tpot_ms"),
            "multi-turn": ("cached_token_share", "median_ttft_ms", "median_tpot_ms"),
            "shared-prefix": ("cached_token_share", "request_throughput", "median_ttft_ms", "median_tpot_ms"),
            "video-shared-prefix": ("prefix_kv_slots", "cached_token_share", "request_throughput", "median_ttft_ms"),
            "video-multi-turn": ("mean_prompt_kv_slots", "cached_token_share", "median_ttft_ms")}[name]
    parts = [f"{k}={result[k]:.4g}" if isinstance(result.get(k), float) else f"{k}={result.get(k)}" for k in keys]
    leak = result.get("leak_check", {})
    return ", ".join(parts + [f"errors={result.get('errors')}", f"leaked={leak.get('leaked_kv_slots')}",
                              f"wall={result.get('wall_s', 0):.0f}s"])


def compare(name: str, vanilla: dict, flashcache: dict) -> dict[str, Optional[float]]:
    return {key: ratio(flashcache.get(key), vanilla.get(key)) for key in RATIO_KEYS[name]}


def _sizes(args) -> dict[str, dict]:
    sizes = {name: dict(values) for name, values in (QUICK_SIZES if args.quick else FULL_SIZES).items()}
    for name, flag in (("num_prompts", args.num_prompts), ("prompt_tokens", args.prompt_tokens),
                       ("output_tokens", args.output_tokens), ("max_concurrency", args.max_concurrency),
                       ("request_rate", args.request_rate)):
        if flag is not None:
            sizes["long-prompt"][name] = flag
    for item in args.param:
        key, _, value = item.partition("=")
        workload, _, param = key.partition(".")
        if workload not in sizes or param not in sizes[workload]:
            valid = [f"{w}.{p}" for w in sizes for p in sizes[w]]
            raise ValueError(f"--param {item!r}: unknown; valid: {', '.join(valid)}")
        sizes[workload][param] = float(value) if param == "request_rate" else int(value)
    return sizes


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOAD_NAMES + VIDEO_WORKLOAD_NAMES,
                        default=list(WORKLOAD_NAMES),
                        help="default: the text workloads; the video ones need --model tiny-vl (or a Qwen2.5-VL)")
    parser.add_argument("--quick", action="store_true", help="small sizes (a CI smoke run: < 1 min a workload)")
    parser.add_argument("--model", default="smollm2", help="smollm2 (real weights), tiny-llama, or a HF directory")
    parser.add_argument("--max-total-tokens", type=int, default=None,
                        help=f"KV pool of BOTH servers (default {FULL_POOL_TOKENS}; --quick {QUICK_POOL_TOKENS})")
    parser.add_argument("--retention", type=float, default=DEFAULT_FLASHCACHE["retention"])
    parser.add_argument("--recent-tokens", type=int, default=DEFAULT_FLASHCACHE["recent_tokens"])
    parser.add_argument("--num-prompts", type=int, help="long-prompt: number of requests")
    parser.add_argument("--prompt-tokens", type=int, help="long-prompt: tokens per prompt")
    parser.add_argument("--output-tokens", type=int, help="long-prompt: tokens generated per request")
    parser.add_argument("--max-concurrency", type=int, help="long-prompt: requests in flight at most")
    parser.add_argument("--request-rate", type=float, help="long-prompt: Poisson arrivals per second (inf: all at once)")
    parser.add_argument("--param", action="append", default=[], metavar="WORKLOAD.KEY=VALUE",
                        help="override any size, e.g. sessions-held.session_tokens=1200")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds per workload per server before it stops sending (default 300; --quick 45)")
    parser.add_argument("--total-time-limit", type=float, default=None,
                        help="seconds for the whole run; later workloads are skipped (default 1500; --quick 600)")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--wait-for-load", type=float, default=None, metavar="LOAD",
                        help="first wait until the 1-minute load average is below LOAD")
    parser.add_argument("--wait-timeout", type=float, default=1500.0)
    parser.add_argument("--run-anyway", action="store_true", help="run even if the load never got below LOAD")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/serving_*.json)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: the JSON's, .png)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if is_video_run(args) and not set(args.workloads) <= set(VIDEO_WORKLOAD_NAMES):
        parser.error(f"--workloads {args.workloads}: video workloads run without text ones "
                     "(the servers are started differently)")
    if is_video_run(args) and args.model == "smollm2":
        args.model = "tiny-vl"
    if not 0.0 < args.retention <= 1.0:
        parser.error(f"--retention {args.retention} must be in (0, 1]")
    args.max_total_tokens = args.max_total_tokens or (QUICK_POOL_TOKENS if args.quick else FULL_POOL_TOKENS)
    args.time_limit = args.time_limit or (45.0 if args.quick else 300.0)
    args.total_time_limit = args.total_time_limit or (600.0 if args.quick else 1500.0)
    return args


ACTIVE_SERVERS: list = []  # the servers the benchmarks are using, for the SIGTERM handler


def settings_from_options(parser: argparse.ArgumentParser, args: argparse.Namespace, options, start,
                          **overrides):
    """A benchmark's settings dataclass: ``start`` (its defaults or quick settings) with every
    option of ``options`` (``(flag, field, type, help)`` rows) the command line gave, and
    ``overrides`` (None: not given); an invalid value is a usage error naming it."""
    given = {name: getattr(args, name) for _, name, _, _ in options}
    given.update(overrides)
    try:
        return type(start)(**{**asdict(start), **{k: v for k, v in given.items() if v is not None}})
    except ValueError as error:
        parser.error(str(error))


def exit_on_sigterm(signum, frame) -> None:
    # Stop the server first: in-flight requests then fail at once, so the worker threads that
    # SystemExit has to wait for (ThreadPoolExecutor shutdown) end quickly. Python's default
    # SIGTERM action would leave the server's process group running.
    for server in list(ACTIVE_SERVERS):
        server.stop()
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        sizes = _sizes(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = "python -m benchmarks.serving " + " ".join(sys.argv[1:] if argv is None else argv)
    waited = wait_for_load(args.wait_for_load, args.wait_timeout) if args.wait_for_load is not None else None
    if waited is not None and not waited["reached"] and not args.run_anyway:
        print(f"error: the 1-minute load average stayed >= {args.wait_for_load} for {args.wait_timeout:.0f} s; "
              "timings would be meaningless (pass --run-anyway to run regardless)", file=sys.stderr)
        return 3

    from transformers import AutoTokenizer

    from flashcache_sglang import cpu_compat

    model_dir = resolve_model(args.model)
    corpus = LicenseCorpus(AutoTokenizer.from_pretrained(model_dir))
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    if is_video_run(args):
        import tempfile

        from benchmarks.video_overhead import make_videos

        config = json.loads(Path(model_dir, "config.json").read_text())
        if "vision_config" not in config:
            print(f"error: --model {args.model} has no vision_config; the video workloads need a Qwen2.5-VL "
                  "(--model tiny-vl on CPU)", file=sys.stderr)
            return 2
        folder = Path(tempfile.mkdtemp(prefix="flashcache-serving-videos-", dir=log_dir))
        args.videos = make_videos(folder, needed_videos(args, sizes), VIDEO_FPS, VIDEO_MAX_PIXELS)
    started = time.monotonic()
    stop_at = started + args.total_time_limit
    load_start = load_average()
    backends = {backend: run_backend(backend, args, model_dir, corpus, sizes, log_dir, stop_at)
                for backend in BACKENDS}

    workloads: dict[str, Any] = {}
    for name in args.workloads:
        vanilla = backends["vanilla"]["workloads"].get(name, {"skipped": "server did not start"})
        flash = backends["flashcache"]["workloads"].get(name, {"skipped": "server did not start"})
        workloads[name] = {"sizes": sizes[name], "vanilla": vanilla, "flashcache": flash,
                           "ratios": compare(name, vanilla, flash)}
    errors = sum(int(w[b].get("errors", 0) or 0) for w in workloads.values() for b in BACKENDS)
    leak_checks = [w[b].get("leak_check") for w in workloads.values() for b in BACKENDS]
    leaks = sum(1 for check in leak_checks if check is not None and not check.get("ok"))
    skipped = [f"{name}/{b}" for name, w in workloads.items() for b in BACKENDS if "skipped" in w[b]]
    report: dict[str, Any] = {
        "benchmark": "serving",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "quick": args.quick,
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_end": load_average(),
                    "waited_for_load": waited},
        "settings": {
            "model": Path(model_dir).name, "dtype": "float32" if cpu_compat.needed() else "model default",
            "max_total_tokens": args.max_total_tokens,
            "flashcache": flashcache_settings(args),
            "server_args": server_args(args), "seed": args.seed, "time_limit_s": args.time_limit,
            "total_time_limit_s": args.total_time_limit, "corpus": str(LICENSES_DIR),
            "corpus_tokens": len(corpus.ids),
        },
        "servers": {b: {k: v for k, v in backends[b].items() if k != "workloads"} for b in BACKENDS},
        "workloads": workloads,
        "errors": errors,
        "failed_leak_checks": leaks,
        "skipped": skipped,
        "elapsed_s": time.monotonic() - started,
    }
    if "sessions-held" in workloads:
        held = workloads["sessions-held"]
        report["headline"] = {
            "sessions_held_vanilla": held["vanilla"].get("sessions_held"),
            "sessions_held_flashcache": held["flashcache"].get("sessions_held"),
            "ratio": held["ratios"].get("sessions_held"),
            "retention": args.retention, "max_total_tokens": args.max_total_tokens,
            "session_tokens": sizes["sessions-held"]["session_tokens"],
        }
    report["ok"] = errors == 0 and leaks == 0 and not skipped and all(
        "error" not in backends[b] for b in BACKENDS)

    output = args.output or RESULTS_DIR / f"serving_{'quick' if args.quick else 'cpu'}.json"
    from benchmarks.plot_serving import plot_serving

    write_report(report, output, None if args.no_plot else (args.plot or output.with_suffix(".png")), plot_serving,
                 "serving")
    print_table(report)
    return 0 if report["ok"] else 1


def write_report(report: dict, output: Path, plot_path: Optional[Path], plot: Callable[[dict, Path], Any],
                 tag: str) -> None:
    """Write ``report`` as strict JSON, and its figure unless ``plot_path`` is None."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(finite(report), indent=1, allow_nan=False))
    print(f"[{tag}] wrote {output}", file=sys.stderr)
    if plot_path is not None:
        try:
            plot(finite(report), plot_path)
        except Exception as error:  # noqa: BLE001 - the measurements are saved; the figure can be redone
            print(f"[{tag}] the plot failed ({type(error).__name__}: {error}); {output} is saved, redo the figure "
                  "with --reanalyze", file=sys.stderr)
        else:
            print(f"[{tag}] wrote {plot_path}", file=sys.stderr)


def finite(value):
    """Strict JSON: NaN (no data) becomes null, an infinite rate the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def print_table(report: dict) -> None:
    for name, workload in report["workloads"].items():
        print(f"\n== {name}")
        print(f"{'metric':<34}{'vanilla':>14}{'flashcache':>14}{'ratio':>10}")
        for key, value in workload["ratios"].items():
            v, f = workload["vanilla"].get(key), workload["flashcache"].get(key)
            cell = lambda x: f"{x:14.4g}" if isinstance(x, (int, float)) and x is not None else f"{str(x):>14}"
            print(f"{key:<34}{cell(v)}{cell(f)}{(f'{value:10.3f}' if value is not None else '         -')}")
    if "headline" in report:
        h = report["headline"]
        print(f"\nsessions held in {h['max_total_tokens']} KV slots ({h['session_tokens']}-token contexts): "
              f"vanilla {h['sessions_held_vanilla']}, flashcache {h['sessions_held_flashcache']} "
              f"(x{h['ratio'] if h['ratio'] is None else round(h['ratio'], 2)})")
    print(f"errors: {report['errors']}, failed leak checks: {report['failed_leak_checks']}, ok: {report['ok']}")


if __name__ == "__main__":
    sys.exit(main())
