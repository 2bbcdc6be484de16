"""The FlashCache streaming demo: a video stream's KV memory in SGLang, compressed and capped.

    python -m flashcache_sglang.streaming.demo                      # generated video, tiny model, CPU
    python -m flashcache_sglang.streaming.demo --video clip.mp4     # a file (or an rtsp:// URL)
    python -m flashcache_sglang.streaming.demo --model-path Qwen/Qwen2.5-VL-7B-Instruct   # GPU

What it does: generates a test video with ffmpeg (unless --video), starts an SGLang server with
FlashCache (the tiny random-weight Qwen2.5-VL on CPU unless --model-path), ingests the stream
chunk by chunk with a live progress line, asks questions at points of the stream, prints the
KV memory kept vs the uncompressed (logical) prompt per chunk, and writes ``memory.png`` (KV
memory over stream time: kept vs what vanilla SGLang would hold) and ``memory.json`` (the
series) into --output. Metadata goes to Redis with --redis-url, else stays in process.

Without an engine (--no-engine, or when the server cannot start) the stream runs on the
in-process backend: the same chunking and budgets, token accounting only, no model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .budget import BudgetSettings
from .chunker import ChunkSettings
from .memory import InProcessMemoryBackend, MemoryBackend
from .service import StreamConfig, StreamManager, StreamProgress
from .sources import SamplingSettings, parse_source
from .store import open_store

__all__ = ["main", "build_parser"]

QUESTIONS = (
    "What is shown in the video so far?",
    "What changed most recently?",
    "What did the stream show at its very start?",
)
# The memory used to be a window of the newest 64 chunks (each request resent it); the default
# generated video is longer, so the last question, about the start, can only be answered from a
# memory that kept every minute.
OLD_WINDOW_CHUNKS = 64
TINY_MAX_PIXELS = 28 * 28 * 16  # the tiny model's processor limit (112 x 112)
REAL_MODEL_COMMAND = (
    "bash scripts/demo.sh --model-path Qwen/Qwen2.5-VL-7B-Instruct --video YOUR_VIDEO.mp4 --kv-cap 2048"
    "   # on a machine with a GPU"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flashcache_sglang.streaming.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--video", help="video file or rtsp:// URL (default: a generated test video)")
    parser.add_argument("--seconds", type=float, default=144.0,
                        help="length of the generated test video (default: longer than the old 64-chunk window)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds to watch a live source")
    parser.add_argument("--model-path", help="a Qwen2.5-VL model (default: the tiny random-weight one, CPU)")
    parser.add_argument("--no-engine", action="store_true", help="skip SGLang: in-process backend, no model")
    parser.add_argument("--redis-url", default=os.environ.get("FLASHCACHE_REDIS_URL"), help="metadata store (default: in process)")
    parser.add_argument("--output", default="demo-output", help="folder for memory.png, memory.json and chunk videos")
    parser.add_argument("--fps", type=float, default=2.0, help="sampled frames per second")
    parser.add_argument("--chunk-frames", type=int, default=4, help="frames per chunk")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help=f"pixels per frame (default: {TINY_MAX_PIXELS} for the tiny model, 224*224 otherwise)")
    parser.add_argument("--kv-cap", type=int, default=None,
                        help="visual KV tokens a stream may keep (default: 32 for the tiny model, 2048 otherwise)")
    parser.add_argument("--base-retention", type=float, default=0.3, help="retention of a chunk of average energy")
    parser.add_argument("--max-total-tokens", type=int, default=16384, help="the server's KV pool in tokens")
    parser.add_argument("--question", action="append", default=None, help="questions (default: three built-in ones)")
    parser.add_argument("--answer-tokens", type=int, default=16, help="tokens per answer")
    return parser


# --------------------------------------------------------------------------- pieces


def generate_video(path: Path, seconds: float) -> Path:
    """A test video whose content changes (moving pattern, static bars, fractal zoom), so the
    per-chunk outlier energy and therefore the retention vary over the stream."""
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg is not installed: run bash scripts/setup.sh (or apt-get install ffmpeg), or pass --video")
    part = max(1.0, seconds / 3)
    size = "320x240:rate=10"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size={size}:duration={part}",
         "-f", "lavfi", "-i", f"smptebars=size={size}:duration={part}",
         "-f", "lavfi", "-i", f"mandelbrot=size={size},trim=duration={part}",
         "-filter_complex", "[0:v][1:v][2:v]concat=n=3:v=1:a=0,format=yuv420p",
         "-c:v", "libx264", "-preset", "veryfast", str(path)],
        check=True, timeout=120,
    )
    return path


def stream_seconds(args: argparse.Namespace, is_live: bool, source: str) -> float:
    """How long the stream will run (to place the questions)."""
    if is_live:
        return args.duration
    if not args.video:
        return args.seconds
    try:
        import av

        with av.open(source) as container:
            return container.duration / 1e6 if container.duration else 24.0
    except Exception:
        return 24.0


@dataclass
class Engine:
    """The SGLang server the demo started (None: in-process backend)."""

    server: Any = None
    model: str = "none"
    note: str = ""


def start_engine(args: argparse.Namespace, output: Path, max_pixels: int) -> Engine:
    if args.no_engine:
        return Engine(note="--no-engine")
    try:
        from flashcache_sglang.testing.server import SGLangServer
    except Exception as error:  # SGLang or torch missing: the accounting demo still runs
        return Engine(note=f"SGLang is not importable ({type(error).__name__}: {error})")
    if args.model_path:
        model = args.model_path
    else:
        from flashcache_sglang.testing.models import cache_root, tiny_qwen2_5_vl_dir

        if not (cache_root() / "tiny-qwen2.5-vl-v1" / "config.json").exists():
            print("building the tiny random-weight Qwen2.5-VL once (about 40 s) ...", flush=True)
        try:
            model = str(tiny_qwen2_5_vl_dir())
        except Exception as error:
            return Engine(note=f"cannot build the tiny model ({type(error).__name__}: {error})")
    mm_config = {"video": {"fps": args.fps, "min_pixels": 28 * 28 * 4, "max_pixels": max_pixels}}
    server = SGLangServer(
        model,
        flashcache={"retention": args.base_retention, "candidates": "multimodal", "min_candidates": 8},
        extra_args=["--enable-multimodal", "--mm-process-config", json.dumps(mm_config)],
        max_total_tokens=args.max_total_tokens,
        log_dir=output,
        startup_timeout=600,
    )
    print(f"starting SGLang with FlashCache ({'CPU' if not args.model_path else model}); log: {server.log_path}", flush=True)
    started = time.monotonic()
    try:
        server.start()
    except Exception as error:
        server.stop()
        tail = "\n".join("    " + line for line in server.log_tail(8).splitlines())
        return Engine(note=f"the SGLang server did not start ({type(error).__name__}); log tail:\n{tail}")
    print(f"server ready at {server.url} after {time.monotonic() - started:.0f} s", flush=True)
    return Engine(server=server, model=model)


@dataclass
class AskedQuestion:
    question: str
    answer: str
    chunks: int  # chunks in memory when it was asked
    stream_s: float  # stream time of the memory's last chunk
    cached_tokens: int
    prompt_tokens: int
    ttft_s: float


@dataclass
class DemoRun:
    stream_id: str = ""
    status: str = ""
    error: str = ""
    questions: list[AskedQuestion] = field(default_factory=list)
    wall_s: float = 0.0


class QuestionPoints:
    """Wraps a backend so that ingest waits after chosen chunks until the demo has asked its
    question there (so questions land at known points of a file that ingests faster than real
    time), and keeps the server's report of each ingest when the backend has one. Everything
    else goes to the wrapped backend."""

    def __init__(self, backend: MemoryBackend, after_chunks: Sequence[int], timeout_s: float = 300.0):
        self.backend = backend
        self.name = backend.name
        self.timeout_s = timeout_s
        self.reached = {index: threading.Event() for index in after_chunks}
        self.answered = {index: threading.Event() for index in after_chunks}
        self.chunk_end_s: dict[int, float] = {}
        self.ingest_reports: dict[int, dict] = {}  # chunk index -> the server's stream report

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def append_chunk(self, stream_id, chunk):
        receipt = self.backend.append_chunk(stream_id, chunk)
        self.chunk_end_s[chunk.index] = chunk.end_s
        last_report = getattr(self.backend, "last_report", None)
        if last_report is not None:
            self.ingest_reports[chunk.index] = last_report(stream_id)
        if chunk.index in self.reached:
            self.reached[chunk.index].set()
            self.answered[chunk.index].wait(self.timeout_s)
        return receipt

    def release_all(self) -> None:
        for event in self.answered.values():
            event.set()


def _progress(progress: StreamProgress) -> str:
    saved = 1 - progress.kept_tokens / progress.logical_tokens if progress.logical_tokens else 0.0
    return (f"[{progress.status}] frames {progress.frames_read} | chunks {progress.chunks} | "
            f"KV kept {progress.kept_tokens} of {progress.logical_tokens} logical tokens ({saved:.0%} saved, "
            f"visual cap {progress.cap_tokens}) | {progress.fps:.1f} frames/s")


def run_stream(manager: StreamManager, points: QuestionPoints, source: str, config: StreamConfig,
               questions: Sequence[str], ask_after: Sequence[Optional[int]], is_live: bool, duration_s: float) -> DemoRun:
    """Ingest ``source``; ask ``questions[i]`` right after chunk ``ask_after[i]`` was ingested
    (None: at the end of the stream)."""
    run = DemoRun()
    stream_id, token = manager.start_stream(source, config)
    run.stream_id = stream_id
    progress = manager.progress(stream_id)  # the live counters; still readable once the stream stopped
    interactive = sys.stderr.isatty()
    started = time.monotonic()
    pending = list(zip(questions, ask_after))
    last_chunks = -1

    def show_progress(final: bool = False) -> None:
        nonlocal last_chunks
        if interactive:
            print("\r" + _progress(progress) + ("\n" if final else "   "), end="", file=sys.stderr, flush=True)
        elif progress.chunks != last_chunks or final:
            print("  " + _progress(progress), flush=True)
        last_chunks = progress.chunks

    def ask(question: str) -> None:
        answer = manager.ask(stream_id, token, question)
        stream_s = points.chunk_end_s.get(answer.memory_chunks - 1, 0.0)
        asked = AskedQuestion(question, answer.text, answer.memory_chunks, stream_s, answer.cached_tokens,
                              int(answer.extra.get("prompt_tokens", 0)), answer.ttft_s)
        run.questions.append(asked)
        if answer.backend == "sglang":
            how = (f"{answer.cached_tokens} of {asked.prompt_tokens} prompt tokens came from the cached memory; "
                   f"first token after {answer.ttft_s:.2f} s")
        else:
            how = "in-process backend: no model ran"
        print(f"{chr(10) if interactive else ''}  Q{len(run.questions)} [memory of {answer.memory_chunks} chunks, "
              f"stream at {stream_s:.1f} s]: {question}\n  A: {answer.text or '(empty)'}\n     ({how})", flush=True)

    try:
        while True:
            done = manager.wait(stream_id, 0.25)
            if done:
                break
            show_progress()
            while pending and pending[0][1] is not None and points.reached[pending[0][1]].is_set():
                question, index = pending.pop(0)
                ask(question)
                points.answered[index].set()
            if is_live and time.monotonic() - started > duration_s:
                points.release_all()  # an ingest waiting for a question must not hold up the stop
                manager.stop_stream(stream_id, token)
                break
    finally:
        points.release_all()
    show_progress(final=True)
    record = manager.store.get_stream(stream_id)
    run.status, run.error = record.status, record.error
    if record.status in ("finished", "stopped"):
        for question, _ in pending:
            ask(question)
    run.wall_s = time.monotonic() - started
    return run


def chunk_series(manager: StreamManager, points: QuestionPoints, stream_id: str) -> list[dict[str, Any]]:
    """Per chunk: its own tokens and the whole memory's right after it (from the metadata
    store), plus the server's visual-token split when the memory is in SGLang."""
    series = []
    for c in manager.store.chunks(stream_id):
        row = {
            "index": c.index, "start_s": c.start_s, "end_s": c.end_s, "frames": c.num_frames,
            "outlier_energy": c.outlier_energy, "retention": c.retention,
            "chunk_logical_tokens": c.logical_tokens, "chunk_kept_tokens": c.kept_tokens,
            "memory_logical_tokens": c.memory_logical_tokens, "memory_kept_tokens": c.memory_kept_tokens,
        }
        report = points.ingest_reports.get(c.index)
        if report:
            row.update(memory_total_kv_slots=report["memory_tokens"], memory_next_position=report["next_position"],
                       memory_version=report["version"], cached_tokens=report["cached_tokens"])
        series.append(row)
    return series


def print_table(series: Sequence[dict[str, Any]], cap: int) -> None:
    visual = False
    print("KV memory per chunk, in tokens. 'logical' = the uncompressed prompt that vanilla SGLang would hold"
          + ("; (visual) = of which video tokens, the part FlashCache compresses and caps" if visual else ""))
    print(f"  {'chunk':>5} {'stream s':>8} {'energy':>6} {'retention':>9} {'chunk logical->kept':>19} "
          f"{'memory kept' + (' (visual)' if visual else ''):>22} {'logical' + (' (visual)' if visual else ''):>18} {'saved':>6}")
    for row in series:
        kept, logical = row["memory_kept_tokens"], row["memory_logical_tokens"]
        saved = 1 - kept / logical if logical > 0 else 0.0
        kept_text, logical_text = str(kept), str(logical)
        if visual:
            kept_text += f" ({row['memory_visual_kept_tokens']})"
            logical_text += f" ({row['memory_visual_logical_tokens']})"
        print(f"  {row['index']:>5} {row['end_s']:>8.1f} {row['outlier_energy']:>6.3f} {row['retention']:>9.2f} "
              f"{row['chunk_logical_tokens']:>10} -> {row['chunk_kept_tokens']:<5} "
              f"{kept_text:>22} {logical_text:>18} {saved:>6.0%}")
    print(f"  (KV cap: {cap} tokens per stream for video tokens and their delimiters; the prompt header is never dropped)")


def plot(series: Sequence[dict[str, Any]], questions: Sequence[AskedQuestion], cap: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    def steps(key: str) -> list[float]:
        values = [0] + [row[key] for row in series]
        return values + values[-1:]  # hold the last value for the final step

    tail = (series[-1]["end_s"] - series[-1]["start_s"] + 0.5) if series else 1.0
    times = [0.0] + [row["end_s"] for row in series] + ([series[-1]["end_s"] + tail] if series else [tail])
    logical, kept = steps("memory_logical_tokens"), steps("memory_kept_tokens")
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1.1]}, constrained_layout=True)
    top.step(times, logical, where="post", color="tab:gray", linewidth=2,
             label="vanilla SGLang: uncompressed prompt (logical tokens)")
    top.fill_between(times, kept, logical, step="post", color="tab:green", alpha=0.12, label="KV freed by FlashCache")
    top.step(times, kept, where="post", color="tab:green", linewidth=2.5,
             label="FlashCache: KV slots the memory really holds")
    if series and "memory_total_kv_slots" in series[0]:
        top.step(times, steps("memory_total_kv_slots"), where="post", color="darkgreen", linewidth=1.2,
                 linestyle="--", label="  whole memory incl. prompt header and sink chunk")
    top.axhline(cap, color="tab:red", linestyle=":", linewidth=1.5, label=f"cap on video tokens ({cap})")
    above = blended_transform_factory(top.transData, top.transAxes)
    for number, asked in enumerate(questions, 1):
        top.axvline(asked.stream_s, color="tab:blue", linestyle=":", linewidth=1)
        top.text(asked.stream_s, 1.01, f"Q{number}", transform=above, color="tab:blue", ha="center", va="bottom")
    if series:
        last = series[-1]
        top.annotate(f"{last['memory_kept_tokens']} vs {last['memory_logical_tokens']} tokens",
                     (last["end_s"], last["memory_kept_tokens"]), xytext=(-150, 22), textcoords="offset points",
                     arrowprops={"arrowstyle": "->", "color": "tab:green"}, color="tab:green")
    top.set_ylabel("KV tokens of the stream's memory")
    top.set_title(title, pad=18)
    top.legend(loc="upper left", fontsize=8.5)
    top.grid(alpha=0.3)
    top.set_ylim(bottom=0)
    top.set_xlim(left=0)

    starts = [row["start_s"] for row in series]
    widths = [max(row["end_s"] - row["start_s"], 0.5) for row in series]
    bottom.bar(starts, [row["retention"] for row in series], width=widths, align="edge", color="tab:olive",
               edgecolor="white", label="retention of each chunk's video tokens (follows its outlier energy)")
    bottom.set_ylabel("retention")
    bottom.set_ylim(0, 1.05)
    bottom.set_xlabel("stream time (s)")
    bottom.legend(loc="upper left", fontsize=8.5)
    bottom.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    began = time.monotonic()
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    tiny = not args.model_path
    max_pixels = args.max_pixels or (TINY_MAX_PIXELS if tiny else 224 * 224)
    cap = args.kv_cap or (32 if tiny else 2048)

    if args.video:
        source = args.video
    else:
        source = str(generate_video(output / "demo-input.mp4", args.seconds))
        print(f"generated a {args.seconds:.0f} s test video: {source}")
    spec = parse_source(source)

    engine = start_engine(args, output, max_pixels)
    backend: MemoryBackend
    if engine.server is not None:
        from .sglang_backend import SGLangMemoryBackend

        backend = SGLangMemoryBackend(engine.server.url, str(output / "chunks"), fps=args.fps,
                                      video_transport="path", max_answer_tokens=args.answer_tokens)
        backend_label = f"SGLang + FlashCache ({'tiny random-weight Qwen2.5-VL, CPU' if tiny else engine.model})"
    else:
        backend = InProcessMemoryBackend()
        backend_label = "in-process backend (token accounting only, no model)"
        print(f"\nNo SGLang engine: {engine.note}\n-> falling back to the in-process backend: the same chunks, "
              "retentions and cap, but no model runs and answers are summaries of the accounting.\n")

    try:
        store = open_store(args.redis_url, namespace="flashcache-demo")
        expected = max(3, round(stream_seconds(args, spec.is_live, source) * args.fps / args.chunk_frames))
        questions = args.question or list(QUESTIONS)
        # Questions after about 1/3 and 2/3 of the stream's chunks, the last one at its end.
        ask_after = [max(0, round(expected * (i + 1) / len(questions)) - 1) for i in range(len(questions) - 1)]
        points = QuestionPoints(backend, ask_after)
        manager = StreamManager(store, points)
        config = StreamConfig(
            sampling=SamplingSettings(fps=args.fps, max_pixels=max_pixels),
            chunking=ChunkSettings(frames=args.chunk_frames),
            budget=BudgetSettings(kv_cap_tokens=cap, base_retention=args.base_retention),
        )
        print(f"\ningesting {spec.sanitized} ({args.fps:g} fps, {args.chunk_frames} frames per chunk) into: {backend_label}")
        run = run_stream(manager, points, source, config, questions, ask_after + [None], spec.is_live, args.duration)
        if run.status not in ("finished", "stopped"):
            print(f"\nthe stream ended with status {run.status}: {run.error}")
            return 1

        series = chunk_series(manager, points, run.stream_id)
        print()
        print_table(series, cap)
        title = f"KV memory of one video stream: {backend_label}"
        plot(series, run.questions, cap, title, output / "memory.png")
        (output / "memory.json").write_text(json.dumps({
            "backend": backend_label, "model": engine.model, "source": spec.sanitized, "cap_tokens": cap,
            "base_retention": args.base_retention, "fps": args.fps, "chunk_frames": args.chunk_frames,
            "chunks": series, "questions": [q.__dict__ for q in run.questions],
        }, indent=1))

        last = series[-1] if series else None
        print("\nSummary")
        if last:
            held = last.get("memory_total_kv_slots", last["memory_kept_tokens"])
            saved = 1 - held / last["memory_logical_tokens"]
            print(f"  after {len(series)} chunks ({last['end_s']:.1f} s of video): the memory holds {held} KV slots "
                  f"({last['memory_kept_tokens']} of them video tokens under the cap of {cap}); vanilla SGLang would "
                  f"hold {last['memory_logical_tokens']} ({saved:.0%} less)")
            if len(series) > OLD_WINDOW_CHUNKS:
                print(f"  the stream ran {len(series)} chunks, past the old {OLD_WINDOW_CHUNKS}-chunk window that forgot its start")
            report = points.ingest_reports.get(last["index"]) or {}
            footprint = {int(k): v for k, v in report.get("footprint", {}).items()}
            if footprint:
                third = max(1, len(series) // 3)
                early = sum(v for k, v in footprint.items() if k < third)
                print(f"  the memory still holds {early} video tokens from the first third of the stream (chunks 0-{third - 1}),"
                      f" {len(footprint)} of {len(series)} chunks keep at least one; positions end at "
                      f"{report.get('next_position')} (bounded by the memory, not the stream's length)")
            if engine.server is not None and run.questions:
                whole = sum(1 for q in run.questions if q.cached_tokens > 0 and q.prompt_tokens > q.cached_tokens)
                print(f"  questions answered after the whole server-held memory, sending only their text: "
                      f"{whole} of {len(run.questions)} (the last one asks about the start)")
        if engine.server is not None:
            stats = engine.server.stats()
            print(f"  server: {stats.get('candidate_tokens', 0)} new visual tokens ranked, {stats.get('kept_tokens', 0)} "
                  "kept on arrival (the cap then re-ranks the whole memory at every append)")
        print(f"  questions: {len(run.questions)}; stream ingested in {run.wall_s:.0f} s; whole demo {time.monotonic() - began:.0f} s")
        print(f"  wrote {output / 'memory.png'} and {output / 'memory.json'}")
        if engine.server is not None and tiny:
            print("\nNOTE: the answers above come from a tiny model with RANDOM weights: they are not meaningful.\n"
                  "      They show the mechanics (the compressed memory is reused, never recomputed). For real answers:\n"
                  f"      {REAL_MODEL_COMMAND}")
        elif engine.server is None:
            print("\nNOTE: no model ran (in-process backend); answers are accounting summaries. With SGLang installed\n"
                  "      (bash scripts/setup.sh) the demo runs the engine; for real answers:\n"
                  f"      {REAL_MODEL_COMMAND}")
        return 0
    finally:
        if engine.server is not None:
            engine.server.stop()


if __name__ == "__main__":
    sys.exit(main())
