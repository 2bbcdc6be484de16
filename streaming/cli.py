"""``flashcache-stream``: ingest and question video streams.

    flashcache-stream run SOURCE [--ask QUESTION ...]     one process, live progress line
    flashcache-stream serve [--port 8000]                 the HTTP API (streams resume from Redis)
    flashcache-stream keys create --tenant T              an operator API key (printed once)
    flashcache-stream keys list | keys revoke KEY_ID
    flashcache-stream ask --api URL STREAM_ID TOKEN QUESTION

Without ``--sglang-url`` the memory is the in-process backend (token accounting and budgets,
no model: answers are labelled summaries). Several ``--sglang-url`` spread the streams over
SGLang workers (streaming.workers: placement shared through ``--redis-url``, a dead worker's
streams moved and their memories rebuilt). Without ``--redis-url`` metadata stays in process.

``serve`` needs operator API keys (``keys create`` into the same Redis and namespace, or an
``--api-keys`` file) and applies the operator's source policy (default: rtsp/rtsps/http/https
to public addresses only, no local files). ``run`` reads whatever its user could read unless
given source policy flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

from .auth import default_key_file_mode, key_file_line, new_api_key
from .budget import BudgetSettings
from .chunker import ChunkSettings
from .lease import LeaseSettings
from .limits import Limits, parse_size
from .memory import InProcessMemoryBackend, MemoryBackend
from .service import StreamConfig, StreamManager
from .source_policy import SourcePolicy
from .sources import SamplingSettings, SourceError
from .store import DEFAULT_NAMESPACE, StoreUnavailable, open_store
from .workers import WorkerSettings, parse_worker_urls

__all__ = ["main", "build_parser"]


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=os.environ.get("FLASHCACHE_REDIS_URL"), help="metadata store (default: in process)")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Redis key namespace of this deployment")
    parser.add_argument("--sglang-url", action="append", default=None, metavar="URL",
                        help="SGLang worker holding the memories (default: in-process backend); repeat it or give a "
                             "comma-separated list for several workers: each stream is placed on one, and moved "
                             "(its memory rebuilt) when that worker dies")
    parser.add_argument("--chunk-dir", default=None, help="where chunk videos are kept for the SGLang backend")
    parser.add_argument("--video-transport", choices=["data_url", "path"], default="data_url")
    parser.add_argument("--rebuild-chunks", type=int, default=16,
                        help="chunks besides the sink re-appended when a memory is rebuilt (and so the chunk files "
                             "kept per stream; default 16)")
    parser.add_argument("--max-answer-tokens", type=int, default=64, help="answer length for the SGLang backend (default 64)")
    group = parser.add_argument_group("several SGLang workers")
    defaults = WorkerSettings()
    group.add_argument("--worker-health-every", type=float, default=defaults.health_every_s,
                       help=f"seconds between health checks of each worker (default {defaults.health_every_s:g})")
    group.add_argument("--worker-fail-after", type=int, default=defaults.fail_after,
                       help=f"failed health checks in a row that mark a worker down (default {defaults.fail_after})")
    parser.add_argument("--log-level", default="WARNING")


def _add_source_policy(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("source policy (which sources clients may name)")
    group.add_argument("--source-policy", metavar="FILE", default=None,
                       help="TOML file with schemes, hosts, allow_private, media_root (flags below add to it)")
    group.add_argument("--allow-scheme", action="append", default=None, metavar="SCHEME",
                       help="allowed URL scheme (repeat; replaces the default rtsp, rtsps, http, https)")
    group.add_argument("--allow-host", action="append", default=None, metavar="ENTRY",
                       help="allowed host: name or glob, IP or CIDR, optional :PORT (repeat; replaces the default '*', "
                            "any public address; loopback/link-local need an explicit IP/CIDR entry)")
    group.add_argument("--allow-private-networks", action="store_true",
                       help="host names may resolve to 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7")
    group.add_argument("--media-root", metavar="DIR", default=None, help="local files must lie inside DIR (default: none allowed)")


def _policy_flags_given(args: argparse.Namespace) -> bool:
    return bool(args.source_policy or args.allow_scheme or args.allow_host or args.allow_private_networks or args.media_root)


def build_source_policy(args: argparse.Namespace) -> SourcePolicy:
    """The operator's policy: the file, then the flags on top of it."""
    base = SourcePolicy.from_file(args.source_policy) if args.source_policy else SourcePolicy()
    return SourcePolicy(
        schemes=tuple(args.allow_scheme) if args.allow_scheme else base.schemes,
        hosts=tuple(args.allow_host) if args.allow_host else base.hosts,
        allow_private=args.allow_private_networks or base.allow_private,
        media_root=args.media_root or base.media_root,
    )


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
    _add_source_policy(run)
    run.add_argument("--ask", action="append", default=[], help="question asked after every --ask-every chunks")
    run.add_argument("--ask-every", type=int, default=0, help="ask the questions every N chunks (0: at the end)")
    run.add_argument("--duration", type=float, default=0.0, help="stop a live source after this many seconds")

    serve = commands.add_parser("serve", help="run the HTTP API")
    _add_common(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-resume", action="store_true",
                       help="do not take over streams of the store that have no owner (at start and periodically)")
    serve.add_argument("--api-keys", metavar="FILE", default=None,
                       help="file of hashed operator keys (`keys create --file FILE`); keys in the store work too")
    _add_source_policy(serve)
    limits = Limits()
    group = serve.add_argument_group("limits (0: unlimited)")
    group.add_argument("--max-streams-per-tenant", type=int, default=limits.max_streams_per_tenant)
    group.add_argument("--max-body-bytes", type=parse_size, default=limits.max_body_bytes, help="e.g. 64KiB")
    group.add_argument("--ask-rate", type=float, default=limits.ask_rate_per_s, help="questions per second per stream")
    group.add_argument("--ask-burst", type=float, default=limits.ask_burst, help="questions allowed at once per stream")
    group.add_argument("--max-stream-disk", type=parse_size, default=limits.max_stream_disk_bytes,
                       help="chunk files per stream, e.g. 2GiB (files the memory still needs are kept and reported)")
    lease = LeaseSettings()
    group = serve.add_argument_group("replicas (several serve processes sharing one Redis)")
    group.add_argument("--replica-id", default=None, help="this replica's name in leases (default: host:pid:random)")
    group.add_argument("--lease-ttl", type=float, default=lease.ttl_s,
                       help="seconds a stream stays owned by a replica that stopped renewing (default %(default)s)")
    group.add_argument("--takeover-scan", type=float, default=lease.scan_every_s,
                       help="seconds between scans for streams whose owner died (default %(default)s)")

    keys = commands.add_parser("keys", help="operator API keys: create, list, revoke")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    for name, text in [("create", "create a key (printed once, stored hashed)"), ("list", "list keys (ids, tenants)"),
                       ("revoke", "revoke a key by id")]:
        sub = key_commands.add_parser(name, help=text)
        sub.add_argument("--redis-url", default=os.environ.get("FLASHCACHE_REDIS_URL"), help="the deployment's Redis")
        sub.add_argument("--namespace", default=DEFAULT_NAMESPACE)
        sub.add_argument("--file", default=None, help="an --api-keys file instead of Redis")
        if name == "create":
            sub.add_argument("--tenant", required=True)
            sub.add_argument("--label", default="", help="a note shown in listings (who holds the key)")
        elif name == "list":
            sub.add_argument("--tenant", default=None)
        else:
            sub.add_argument("key_id")

    ask = commands.add_parser("ask", help="ask a running service about a stream")
    ask.add_argument("--api", default="http://127.0.0.1:8000")
    ask.add_argument("stream_id")
    ask.add_argument("token")
    ask.add_argument("question")
    ask.add_argument("--conversation", default="default")
    return parser


def build_backend(args: argparse.Namespace) -> MemoryBackend:
    """The in-process backend, one SGLang server, or several workers with a shared placement
    (in the deployment's Redis when ``--redis-url`` is given)."""
    if not args.sglang_url:
        return InProcessMemoryBackend()
    from .sglang_backend import SGLangMemoryBackend

    urls = parse_worker_urls(args.sglang_url)
    chunk_dir = args.chunk_dir or os.path.join(tempfile.gettempdir(), "flashcache-stream-chunks")
    options = dict(fps=getattr(args, "fps", 2.0), video_transport=args.video_transport, rebuild_chunks=args.rebuild_chunks,
                   max_answer_tokens=args.max_answer_tokens)
    if len(urls) == 1:
        return SGLangMemoryBackend(urls[0], chunk_dir, **options)
    from .workers import InMemoryPlacement, MultiWorkerMemoryBackend, RedisPlacement

    placement = RedisPlacement(args.redis_url, args.namespace) if args.redis_url else InMemoryPlacement()
    settings = WorkerSettings(health_every_s=args.worker_health_every, fail_after=args.worker_fail_after)
    return MultiWorkerMemoryBackend(urls, chunk_dir, placement=placement, workers=settings, **options)


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
    policy = build_source_policy(args) if _policy_flags_given(args) else SourcePolicy.local_user()
    manager = StreamManager(open_store(args.redis_url, args.namespace), build_backend(args), source_policy=policy)
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
    from .auth import Authenticator

    log = logging.getLogger(__name__)
    policy = build_source_policy(args)
    limits = Limits(
        max_streams_per_tenant=args.max_streams_per_tenant,
        max_body_bytes=args.max_body_bytes,
        ask_rate_per_s=args.ask_rate,
        ask_burst=args.ask_burst,
        max_stream_disk_bytes=args.max_stream_disk,
    )
    store = open_store(args.redis_url, args.namespace)
    backend = build_backend(args)
    manager = StreamManager(store, backend, source_policy=policy, limits=limits,
                            leases=LeaseSettings(ttl_s=args.lease_ttl, scan_every_s=args.takeover_scan),
                            chunk_dir=getattr(backend, "chunk_dir", None), replica_id=args.replica_id)
    authenticator = Authenticator(store, args.api_keys)
    if not authenticator.has_keys():
        log.warning("no operator API keys: nobody can create streams; run `flashcache-stream keys create --tenant NAME "
                    "--redis-url ...` (same Redis and namespace) or pass --api-keys FILE")
    log.warning("replica %s; source policy: %s", manager.replica_id, policy.describe())
    if not args.no_resume:
        resumed = manager.resume_all()
        if resumed:
            log.warning("resumed %d streams: %s", len(resumed), ", ".join(resumed))
        manager.start_takeover()
    try:
        uvicorn.run(create_app(manager, authenticator), host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        manager.shutdown()
        if hasattr(backend, "close"):
            backend.close()
    return 0


def _keys(args: argparse.Namespace) -> int:
    if args.file:
        return _keys_file(args)
    if not args.redis_url:
        print("error: keys live in the deployment's Redis (--redis-url or FLASHCACHE_REDIS_URL) or in an --api-keys file "
              "(--file PATH)", file=sys.stderr)
        return 2
    store = open_store(args.redis_url, args.namespace)
    if args.keys_command == "create":
        key, record = new_api_key(args.tenant, args.label)
        store.add_api_key(record)
        print(key)
        print(f"key {record.key_id} for tenant {record.tenant!r} stored hashed in namespace {args.namespace!r}; "
              "the key is shown only now", file=sys.stderr)
        return 0
    if args.keys_command == "list":
        for record in store.list_api_keys(args.tenant):
            print(f"{record.key_id}  tenant={record.tenant}  created={time.strftime('%Y-%m-%d %H:%M', time.gmtime(record.created_at))}Z"
                  f"  {record.label}")
        return 0
    if not store.delete_api_key(args.key_id):
        print(f"error: no key {args.key_id!r} in namespace {args.namespace!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}", file=sys.stderr)
    return 0


def _keys_file(args: argparse.Namespace) -> int:
    from .auth import load_key_file

    existing = load_key_file(args.file) if os.path.exists(args.file) else {}
    if args.keys_command == "create":
        key, record = new_api_key(args.tenant, args.label)
        with open(args.file, "a", encoding="utf-8") as handle:
            handle.write(key_file_line(record) + "\n")
        default_key_file_mode(args.file)
        print(key)
        print(f"key {record.key_id} for tenant {record.tenant!r} appended (hashed) to {args.file}; the key is shown only now; "
              "serve reads the file at start", file=sys.stderr)
        return 0
    if args.keys_command == "list":
        for record in existing.values():
            if args.tenant is None or record.tenant == args.tenant:
                print(f"{record.key_id}  tenant={record.tenant}  {record.label}")
        return 0
    if args.key_id not in existing:
        print(f"error: no key {args.key_id!r} in {args.file}", file=sys.stderr)
        return 1
    del existing[args.key_id]
    with open(args.file, "w", encoding="utf-8") as handle:
        handle.writelines(key_file_line(record) + "\n" for record in existing.values())
    print(f"revoked {args.key_id} (restart serve to apply)", file=sys.stderr)
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
        if args.command == "keys":
            return _keys(args)
        return _ask(args)
    except StoreUnavailable as error:
        print(f"error: metadata store unavailable: {error}", file=sys.stderr)
        return 2
    except (SourceError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
