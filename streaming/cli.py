"""``flashcache-stream``: ingest and question video streams.

    flashcache-stream run SOURCE [--ask QUESTION ...]     one process, live progress line
    flashcache-stream serve [--port 8000]                 the HTTP API (streams resume from Redis)
    flashcache-stream ask --api URL STREAM_ID TOKEN QUESTION

Without ``--sglang-url`` the memory is the in-process backend (token accounting and budgets,
no model: answers are labelled summaries). Without ``--redis-url`` metadata stays in process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

from .budget import BudgetSettings
from .chunker import ChunkSettings
from .memory import InProcessMemoryBackend, MemoryBackend
from .service import StreamConfig, StreamManager
from .sources import SamplingSettings, SourceError
from .store import DEFAULT_NAMESPACE, StoreUnavailable, open_store

__all__ = ["main", "build_parser"]


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=os.environ.get("FLASHCACHE_REDIS_URL"), help="metadata store (default: in process)")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Redis key namespace of this deployment")
    parser.add_argument("--sglang-url", default=None, help="SGLang server holding the memories (default: in-process backend)")
    parser.add_argument("--chunk-dir", default=None, help="where chunk videos are kept for the SGLang backend")
    parser.add_argument("--video-transport", choices=["data_url", "path"], default="data_url")
    parser.add_argument("--log-level", default="WARNING")


def _add_stream_settings(parser: argparse.ArgumentParser) -> None:
    defaults = BudgetSettings()
    parser.add_argument("--fps", type=float, default=2.0, help="sampled frames per second (default 2)")
    parser.add_argument("--max-pixels", type=int, default=224 * 224, help="pixels per resized frame")
    parser.add_argument("--pace", type=float, default=0.0,
                        help="replay a file at this speed (1.0: real time, as a live camera; default 0: as fast as it decodes)")
    parser.add_argument("--chunk-frames", type=int, default=4, help="frames per chunk (default 4)")
    parser.add_argument("--chunk-seconds", type=float, default=None, help="close a chunk after this span")
    parser.add_argument("--kv-cap", type=int, default=defaults.kv_cap_tokens, help="KV tokens kept per stream")
    parser.add_argument("--base-retention", type=float, default=defaults.base_retention)
    parser.add_argument("--no-sink", action="store_true", help="let the first chunk shrink like the others")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashcache-stream", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="ingest one source in this process")
    run.add_argument("source", help="video file, rtsp://, http(s):// or file:// URL")
    _add_common(run)
    _add_stream_settings(run)
    run.add_argument("--ask", action="append", default=[], help="question asked after every --ask-every chunks")
    run.add_argument("--ask-every", type=int, default=0, help="ask the questions every N chunks (0: at the end)")
    run.add_argument("--duration", type=float, default=0.0, help="stop a live source after this many seconds")

    serve = commands.add_parser("serve", help="run the HTTP API")
    _add_common(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-resume", action="store_true", help="do not resume streams listed in the store")

    ask = commands.add_parser("ask", help="ask a running service about a stream")
    ask.add_argument("--api", default="http://127.0.0.1:8000")
    ask.add_argument("stream_id")
    ask.add_argument("token")
    ask.add_argument("question")
    ask.add_argument("--conversation", default="default")
    return parser


def build_backend(args: argparse.Namespace) -> MemoryBackend:
    if not args.sglang_url:
        return InProcessMemoryBackend()
    from .sglang_backend import SGLangMemoryBackend

    chunk_dir = args.chunk_dir or os.path.join(tempfile.gettempdir(), "flashcache-stream-chunks")
    return SGLangMemoryBackend(
        args.sglang_url, chunk_dir, fps=getattr(args, "fps", 2.0), video_transport=args.video_transport
    )


def _config(args: argparse.Namespace) -> StreamConfig:
    return StreamConfig(
        sampling=SamplingSettings(fps=args.fps, max_pixels=args.max_pixels, pace=args.pace),
        chunking=ChunkSettings(frames=args.chunk_frames, seconds=args.chunk_seconds),
        budget=BudgetSettings(kv_cap_tokens=args.kv_cap, base_retention=args.base_retention, keep_sink=not args.no_sink),
    )


def _progress_line(stream_id: str, manager: StreamManager) -> str:
    progress = manager.progress(stream_id)
    return (
        f"\r[{progress.status}] frames {progress.frames_read} (dropped {progress.frames_dropped}) | "
        f"chunks {progress.chunks} | KV kept {progress.kept_tokens}/{progress.cap_tokens} "
        f"(logical {progress.logical_tokens}) | {progress.fps:.1f} fps   "
    )


def _run(args: argparse.Namespace) -> int:
    manager = StreamManager(open_store(args.redis_url, args.namespace), build_backend(args))
    stream_id, token = manager.start_stream(args.source, _config(args))
    print(f"stream {stream_id} token {token}", file=sys.stderr)
    interactive = sys.stderr.isatty()
    started, asked_at_chunk = time.monotonic(), 0
    try:
        while not manager.wait(stream_id, 0.5):
            progress = manager.progress(stream_id)
            if interactive:
                print(_progress_line(stream_id, manager), end="", file=sys.stderr, flush=True)
            if args.ask and args.ask_every and progress.chunks >= asked_at_chunk + args.ask_every:
                asked_at_chunk = progress.chunks
                for question in args.ask:
                    print(f"\n[chunk {progress.chunks}] Q: {question}\nA: {manager.ask(stream_id, token, question).text}", file=sys.stderr)
            if args.duration and time.monotonic() - started > args.duration:
                manager.stop_stream(stream_id, token)
                break
    except KeyboardInterrupt:
        manager.stop_stream(stream_id, token)
    print(_progress_line(stream_id, manager).lstrip("\r"), file=sys.stderr)
    record = manager.store.get_stream(stream_id)
    if record.status == "failed":
        print(f"error: {record.error}", file=sys.stderr)
        return 1
    for question in args.ask:
        answer = manager.ask(stream_id, token, question) if record.status != "stopped" else None
        if answer is not None:
            print(f"Q: {question}\nA: {answer.text}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api import create_app

    manager = StreamManager(open_store(args.redis_url, args.namespace), build_backend(args))
    if not args.no_resume:
        resumed = manager.resume_all()
        if resumed:
            logging.getLogger(__name__).warning("resumed %d streams: %s", len(resumed), ", ".join(resumed))
    try:
        uvicorn.run(create_app(manager), host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        manager.shutdown()
    return 0


def _ask(args: argparse.Namespace) -> int:
    import requests

    response = requests.post(
        f"{args.api.rstrip('/')}/streams/{args.stream_id}/ask",
        json={"question": args.question, "conversation_id": args.conversation},
        headers={"Authorization": f"Bearer {args.token}"},
        timeout=300,
    )
    if response.status_code != 200:
        print(f"error {response.status_code}: {response.json().get('detail', response.text)}", file=sys.stderr)
        return 1
    print(response.json()["text"])
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "WARNING").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "serve":
            return _serve(args)
        return _ask(args)
    except StoreUnavailable as error:
        print(f"error: metadata store unavailable: {error}", file=sys.stderr)
        return 2
    except (SourceError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
