"""The stream manager: ingest loops, questions, metadata and resume after a restart.

Per stream two threads run:

    reader:  source (decord / PyAV, reconnecting) -> BoundedQueue of frames (drop policy)
    ingest:  frames -> Chunker -> MemoryBackend.append_chunk -> MetadataStore (chunk record)

``ask`` runs in the caller's thread against the backend's memory snapshot, so it never waits
for ingest. Metadata writes that fail because the store is unreachable are kept (bounded) and
written once it answers again; the stream keeps ingesting meanwhile.

Security: stream ids and owner tokens come from ``secrets``; the store keeps only the token's
hash; raw source URLs (which may hold credentials) stay in this process's memory. To resume a
stream whose URL held credentials after a restart, pass ``credentials`` (sanitised URL -> full
URL); without it such a stream fails with a clear error. Every source passes the manager's
source policy (streaming.source_policy) at start, resume and each reconnect.

Several managers (service replicas) may share one store: a stream is ingested only by the
holder of its lease, whose writes are fenced (streaming.lease); ``resume_all`` takes over the
streams whose owner died. Chunk files are rotated and deleted per streaming.artifacts.
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .artifacts import ArtifactKeeper
from .auth import new_stream_token
from .backpressure import BoundedQueue, QueueClosed
from .budget import BudgetSettings
from .chunker import Chunker, ChunkSettings
from .lease import LeaseKeeper, LeaseSettings
from .limits import Limits, RateLimited
from .memory import MemoryBackend, UnknownMemoryError
from .source_policy import SourcePolicy
from .sources import (
    BackoffSettings,
    SamplingSettings,
    SourceError,
    open_source,
)
from .store import (
    Lease,
    LeaseLost,
    MetadataStore,
    StoreUnavailable,
    StreamRecord,
    UnknownStreamError,
    hash_token,
    token_matches,
)
from .types import RESUMABLE_STATUSES, Answer, ChunkRecord, StreamStatus, Turn

__all__ = ["StreamConfig", "StreamManager", "StreamProgress", "AccessDenied", "UnknownStreamError"]

logger = logging.getLogger(__name__)

_PENDING_CHUNK_RECORDS = 1024  # chunk records kept while the store is unreachable


class AccessDenied(PermissionError):
    """The presented token does not match the stream's owner token."""


@dataclass(frozen=True)
class StreamConfig:
    """Everything that shapes one stream's ingest.

    ``drop_policy`` None picks ``block`` for files and ``drop_oldest`` for live sources;
    ``queue_frames`` bounds the frames waiting between reader and ingest.
    """

    sampling: SamplingSettings = SamplingSettings()
    chunking: ChunkSettings = ChunkSettings()
    budget: BudgetSettings = BudgetSettings()
    backoff: BackoffSettings = BackoffSettings()
    queue_frames: int = 64
    drop_policy: Optional[str] = None

    def to_dicts(self) -> dict[str, dict[str, Any]]:
        return {
            "sampling": dict(self.sampling.__dict__),
            "chunking": dict(self.chunking.__dict__),
            "budget": self.budget.to_dict(),
        }


@dataclass
class StreamProgress:
    """Live counters of a stream running in this process (for progress lines and tests)."""

    frames_read: int = 0
    frames_dropped: int = 0
    chunks: int = 0
    reconnects: int = 0
    kept_tokens: int = 0
    logical_tokens: int = 0
    cap_tokens: int = 0
    store_errors: int = 0
    status: str = StreamStatus.STARTING
    error: str = ""
    started_monotonic: float = field(default_factory=time.monotonic)

    @property
    def fps(self) -> float:
        elapsed = time.monotonic() - self.started_monotonic
        return self.frames_read / elapsed if elapsed > 0 else 0.0


class _Runtime:
    """A stream running in this process."""

    def __init__(self, stream_id: str, raw_url: str, config: StreamConfig, start_s: float, next_chunk: int, is_live: bool):
        self.stream_id = stream_id
        self.raw_url = raw_url
        self.config = config
        self.start_s = start_s
        self.next_chunk = next_chunk
        policy = config.drop_policy or ("drop_oldest" if is_live else "block")
        self.queue: BoundedQueue = BoundedQueue(config.queue_frames, policy)
        self.progress = StreamProgress(cap_tokens=config.budget.kv_cap_tokens)
        self.stop_event = threading.Event()
        self.source = None
        self.threads: list[threading.Thread] = []
        self.pending_fields: dict[str, Any] = {}
        self.pending_chunks: collections.deque[ChunkRecord] = collections.deque(maxlen=_PENDING_CHUNK_RECORDS)
        self.done = threading.Event()
        self.lease: Optional[Lease] = None  # this replica's ownership; its fence goes with every write
        self.lease_lost = ""  # why this replica stopped owning the stream ("" while it owns it)


class StreamManager:
    """Starts, stops, resumes and questions streams.

    Args:
        store: metadata store (RedisStore across processes, InMemoryStore embedded).
        backend: where the memories live.
        credentials: maps a sanitised source URL back to the full URL on resume.
        source_policy: which sources may be read; default :meth:`SourcePolicy.local_user`
            (an in-process caller reads what its user may read). ``serve`` passes the
            operator's policy, and the HTTP API refuses to run with the default.
        limits: per-tenant and per-stream limits (streaming.limits).
        leases: lease timing (streaming.lease).
        chunk_dir: the folder chunk files may be deleted from (default: ``backend.chunk_dir``
            when the backend has one; None: chunk files are never deleted).
        replica_id: this replica's name in leases (default: host, pid and a random suffix).
    """

    def __init__(
        self,
        store: MetadataStore,
        backend: MemoryBackend,
        credentials: Optional[Callable[[str], Optional[str]]] = None,
        *,
        source_policy: Optional[SourcePolicy] = None,
        limits: Limits = Limits(),
        leases: LeaseSettings = LeaseSettings(),
        chunk_dir: Optional[str] = None,
        replica_id: Optional[str] = None,
    ):
        self.store = store
        self.backend = backend
        self.credentials = credentials or (lambda sanitized: None)
        self.source_policy = source_policy or SourcePolicy.local_user()
        self.limits = limits
        self.replica_id = replica_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.leases = LeaseKeeper(store, self.replica_id, leases, on_lost=self._lease_lost)
        self.artifacts = ArtifactKeeper(chunk_dir or getattr(backend, "chunk_dir", None), limits.max_stream_disk_bytes)
        self._runtimes: dict[str, _Runtime] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- life cycle

    def start_stream(self, source: str, config: StreamConfig = StreamConfig(), tenant: str = "") -> tuple[str, str]:
        """Start ingesting ``source`` for ``tenant``; returns ``(stream_id, owner_token)``.

        Raises BadSourceError for a malformed URL, an unsupported scheme or a missing file
        (SourcePolicyError, a BadSourceError, for a source the policy refuses) and
        StreamLimitReached when the tenant has ``limits.max_streams_per_tenant`` streams;
        errors found while reading (corrupt file, unsupported codec, unreachable camera) end
        this stream with status ``failed`` and a message.
        """
        spec = self.source_policy.check(source)
        stream_id = "st_" + secrets.token_urlsafe(16)
        token = new_stream_token()
        now = time.time()
        dicts = config.to_dicts()
        record = StreamRecord(
            stream_id=stream_id,
            source=spec.sanitized,
            owner_token_hash=hash_token(token),
            tenant=tenant,
            is_live=spec.is_live,
            status=StreamStatus.STARTING,
            backend=self.backend.name,
            created_at=now,
            updated_at=now,
            budget=dicts["budget"],
            sampling=dicts["sampling"],
            chunking=dicts["chunking"],
            cap_tokens=config.budget.kv_cap_tokens,
        )
        started = self.leases.now()
        lease = self.store.create_stream(record, self.limits.max_streams_per_tenant if tenant else 0,
                                         owner=self.replica_id, ttl_s=self.leases.settings.ttl_s)
        self.leases.adopt(lease, started)
        self.backend.open(stream_id, config.budget)
        self.artifacts.track(stream_id, ())
        self._launch(stream_id, source, config, start_s=0.0, next_chunk=0, is_live=spec.is_live, lease=lease)
        logger.info("stream %s started from %s", stream_id, spec.sanitized)
        return stream_id, token

    def _launch(self, stream_id: str, raw_url: str, config: StreamConfig, start_s: float, next_chunk: int, is_live: bool,
                lease: Lease) -> None:
        runtime = _Runtime(stream_id, raw_url, config, start_s, next_chunk, is_live)
        runtime.lease = lease
        reader = threading.Thread(target=self._read_loop, args=(runtime,), name=f"reader-{stream_id}", daemon=True)
        ingest = threading.Thread(target=self._ingest_loop, args=(runtime,), name=f"ingest-{stream_id}", daemon=True)
        runtime.threads = [reader, ingest]
        with self._lock:
            self._runtimes[stream_id] = runtime
        reader.start()
        ingest.start()

    def resume_all(self) -> list[str]:
        """Take over every stored stream that should be running but has no owner (its service
        stopped or died and its lease expired); the takeover scan of ``serve`` calls this.

        Files continue from the next chunk; live sources continue from now on the same clock.
        Returns the ids resumed here.
        """
        resumed = []
        for stream_id in self.store.orphaned_streams():
            if self.is_running(stream_id):
                continue
            lease = self.leases.acquire(stream_id)
            if lease is None:
                continue  # another replica was faster
            try:
                # Read after acquiring: the previous owner cannot write past this point.
                record = self.store.get_stream(stream_id)
                if record is None or record.status not in RESUMABLE_STATUSES:
                    self.leases.release(lease)
                    continue
                self._resume(record, lease)
                resumed.append(stream_id)
            except Exception as error:  # one broken record must not stop the others
                logger.error("cannot resume stream %s: %s", stream_id, error)
                self._update(stream_id, fence=lease.fence, status=StreamStatus.FAILED, error=f"resume failed: {error}")
                self.leases.release(lease)
        return resumed

    def start_takeover(self) -> None:
        """Run :meth:`resume_all` every ``leases.scan_every_s`` in the lease thread."""
        self.leases.run_scan(self.resume_all)

    def _resume(self, record: StreamRecord, lease: Lease) -> None:
        raw_url = self.credentials(record.source) or record.source
        if "***" in raw_url:
            raise SourceError(
                f"source {record.source!r} needs credentials that are never stored; pass a credentials provider"
            )
        spec = self.source_policy.check(raw_url)
        config = StreamConfig(
            sampling=SamplingSettings(**record.sampling),
            chunking=ChunkSettings(**record.chunking),
            budget=BudgetSettings.from_dict(record.budget),
        )
        chunk_records = self.store.chunks(record.stream_id)
        self.backend.open(record.stream_id, config.budget, restore=chunk_records)
        self.artifacts.track(record.stream_id, chunk_records)
        if record.last_chunk_index < 0:
            start_s = 0.0
        elif spec.is_live:
            start_s = record.last_chunk_end_s + max(0.0, time.time() - record.updated_at)
        else:
            start_s = record.last_chunk_end_s + 1.0 / config.sampling.fps  # the next sample on the same grid
        self._launch(record.stream_id, raw_url, config, start_s, record.last_chunk_index + 1, spec.is_live, lease)
        logger.info("stream %s resumed at chunk %d (%.2f s)", record.stream_id, record.last_chunk_index + 1, start_s)

    def stop_stream(self, stream_id: str, token: Optional[str], timeout_s: float = 10.0, tenant: Optional[str] = None) -> None:
        """Stop ingest wherever it runs: here directly; on another replica by revoking its
        lease (its next write or renewal fails and it stops)."""
        self.authorize(stream_id, token, tenant)
        self._stop_runtime(stream_id, timeout_s)
        self.store.revoke_lease(stream_id, status=StreamStatus.STOPPED, updated_at=time.time())
        self.backend.release(stream_id)

    def delete_stream(self, stream_id: str, token: Optional[str], tenant: Optional[str] = None) -> None:
        """Stop and forget the stream: metadata, lease, memory and chunk files (an owner on
        another replica deletes its own chunk files when it finds the stream gone)."""
        self.authorize(stream_id, token, tenant)
        self._stop_runtime(stream_id, 10.0)
        chunk_records = self.store.chunks(stream_id)
        self.backend.release(stream_id)
        self.store.delete_stream(stream_id)
        self.artifacts.delete_stream(stream_id, chunk_records)

    def _stop_runtime(self, stream_id: str, timeout_s: float) -> None:
        with self._lock:
            runtime = self._runtimes.pop(stream_id, None)
        if runtime is None:
            return
        runtime.stop_event.set()
        runtime.queue.close()
        if runtime.source is not None:
            runtime.source.close()
        for thread in runtime.threads:
            thread.join(timeout_s)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every runtime of this process without changing stored statuses (so another
        service process resumes them)."""
        with self._lock:
            runtimes = list(self._runtimes.values())
            self._runtimes.clear()
        for runtime in runtimes:
            runtime.stop_event.set()
            runtime.queue.close()
            if runtime.source is not None:
                runtime.source.close()
        for runtime in runtimes:
            for thread in runtime.threads:
                thread.join(timeout_s)
        self.leases.stop()

    # ----------------------------------------------------------------- ownership

    def _lease_lost(self, lease: Lease, reason: str) -> None:
        with self._lock:
            runtime = self._runtimes.get(lease.stream_id)
        if runtime is not None and runtime.lease == lease:
            self._abandon(runtime, reason)

    def _abandon(self, runtime: _Runtime, reason: str) -> None:
        """Stop ingesting a stream this replica no longer owns; its stored status is the new
        owner's (or the stopper's) business. Cleanup runs when the ingest thread exits."""
        if not runtime.lease_lost:
            logger.warning("stream %s: no longer owned here (%s); stopping its ingest", runtime.stream_id, reason)
        runtime.lease_lost = reason
        runtime.stop_event.set()
        runtime.queue.close()
        if runtime.source is not None:
            runtime.source.close()

    def _runtime_exit(self, runtime: _Runtime) -> None:
        """The ingest thread's last step: give the lease back, or clean up after losing it."""
        stream_id = runtime.stream_id
        if not runtime.lease_lost:
            self.leases.release(runtime.lease)
            return
        self.leases.forget(runtime.lease)
        # The memory is the new owner's now: forget it here without closing it on the server.
        getattr(self.backend, "forget", self.backend.release)(stream_id)
        try:
            deleted = self.store.get_stream(stream_id) is None
        except StoreUnavailable:
            deleted = False
        if deleted:
            self.artifacts.delete_stream(stream_id)
        else:
            self.artifacts.forget(stream_id)

    def owner(self, stream_id: str) -> Optional[str]:
        """The replica id holding the stream's lease (None: nobody ingests it now)."""
        return self.store.lease_owner(stream_id)

    # ----------------------------------------------------------------- queries

    def authorize(self, stream_id: str, token: Optional[str], tenant: Optional[str] = None) -> StreamRecord:
        """The stream's record if ``token`` is its owner token, or if ``tenant`` (an operator
        authenticated by API key) owns it. UnknownStreamError for an unknown stream or another
        tenant's (so ids never leak across tenants); AccessDenied for a wrong token."""
        record = self.store.get_stream(stream_id)
        if record is None:
            raise UnknownStreamError(stream_id)
        if tenant is not None:
            if not record.tenant or not hmac.compare_digest(record.tenant.encode(), tenant.encode()):
                raise UnknownStreamError(stream_id)
            return record
        if not token_matches(token, record.owner_token_hash):
            raise AccessDenied(f"wrong token for stream {stream_id!r}")
        return record

    def list_streams(self, tenant: str) -> list[StreamRecord]:
        """The tenant's streams, oldest first."""
        return self.store.list_streams(tenant=tenant)

    def check_ask_rate(self, stream_id: str) -> None:
        """Take one question from the stream's token bucket; RateLimited when it is empty."""
        if self.limits.ask_rate_per_s <= 0:
            return
        wait_s = self.store.take_ask_token(stream_id, self.limits.ask_rate_per_s, self.limits.ask_burst)
        if wait_s > 0:
            raise RateLimited(
                f"stream {stream_id} allows {self.limits.ask_rate_per_s:g} questions per second "
                f"(bursts of {self.limits.ask_burst:g}); retry in {wait_s:.2f} s",
                wait_s,
            )

    def is_running(self, stream_id: str) -> bool:
        with self._lock:
            runtime = self._runtimes.get(stream_id)
        return runtime is not None and not runtime.done.is_set()

    def progress(self, stream_id: str) -> Optional[StreamProgress]:
        with self._lock:
            runtime = self._runtimes.get(stream_id)
        return runtime.progress if runtime is not None else None

    def wait(self, stream_id: str, timeout_s: Optional[float] = None) -> bool:
        """Wait until the stream's ingest ends (file end, failure, stop); False on timeout."""
        with self._lock:
            runtime = self._runtimes.get(stream_id)
        return True if runtime is None else runtime.done.wait(timeout_s)

    def ask(self, stream_id: str, token: Optional[str], question: str, conversation_id: str = "default",
            tenant: Optional[str] = None) -> Answer:
        """Answer ``question`` from the stream's memory; the turn joins ``conversation_id``."""
        if not question or not question.strip():
            raise ValueError("question must be a non-empty string")
        record = self.authorize(stream_id, token, tenant)
        history = self.store.turns(stream_id, conversation_id)
        try:
            answer = self.backend.ask(stream_id, question, history)
        except UnknownMemoryError:
            # Memory of a stream that is not running here (finished before a restart, stopped,
            # or ingested by another process): rebuild it from the stored chunk records.
            self.backend.open(stream_id, BudgetSettings.from_dict(record.budget), restore=self.store.chunks(stream_id))
            answer = self.backend.ask(stream_id, question, history)
        self.store.add_turn(
            stream_id,
            conversation_id,
            Turn(question=question, answer=answer.text, asked_at=time.time(), memory_chunks=answer.memory_chunks),
        )
        return answer

    # ----------------------------------------------------------------- threads

    def _read_loop(self, runtime: _Runtime) -> None:
        fence = runtime.lease.fence

        def on_state(state: str, message: str) -> None:
            if state == "reconnecting":
                self._update(runtime.stream_id, fence=fence, status=StreamStatus.RECONNECTING, error=message)
            elif state == "running":
                runtime.progress.reconnects += 1
                self._update(runtime.stream_id, fence=fence, status=StreamStatus.RUNNING, error="",
                             reconnects=runtime.progress.reconnects)
            runtime.progress.status = StreamStatus.RECONNECTING if state == "reconnecting" else StreamStatus.RUNNING

        try:
            spec = self.source_policy.check(runtime.raw_url)
            runtime.source = open_source(spec, runtime.config.sampling, runtime.start_s, runtime.config.backoff, on_state,
                                         policy=self.source_policy)
            if runtime.stop_event.is_set():
                runtime.source.close()
                return
            for frame in runtime.source.frames():
                if runtime.stop_event.is_set():
                    break
                runtime.progress.frames_read += 1
                runtime.queue.put(frame)
                runtime.progress.frames_dropped = runtime.queue.dropped
        except SourceError as error:
            if not runtime.stop_event.is_set():
                runtime.progress.error = str(error)
        except Exception as error:  # a decoder bug must end this stream only
            if not runtime.stop_event.is_set():
                logger.exception("reader of stream %s crashed", runtime.stream_id)
                runtime.progress.error = f"{type(error).__name__}: {error}"
        finally:
            runtime.queue.close()

    def _ingest_loop(self, runtime: _Runtime) -> None:
        chunker = Chunker(runtime.config.chunking, next_index=runtime.next_chunk)
        stream_id = runtime.stream_id
        first = True
        try:
            while True:
                try:
                    frame = runtime.queue.get(timeout=1.0)
                except QueueClosed:
                    break
                if runtime.stop_event.is_set():
                    break  # queued frames of a stopped stream are not ingested
                if frame is None:
                    self._flush_pending(runtime)
                    continue
                if first:
                    first = False
                    runtime.progress.status = StreamStatus.RUNNING
                    self._update_runtime(runtime, status=StreamStatus.RUNNING, error="")
                chunk = chunker.push(frame)
                if chunk is not None:
                    self._ingest_chunk(runtime, chunk)
            if runtime.stop_event.is_set():
                return  # stop/shutdown: the partial chunk is dropped; resume restarts it
            if runtime.progress.error:
                self._finish(runtime, StreamStatus.FAILED, runtime.progress.error)
                return
            tail = chunker.flush()
            if tail is not None:
                self._ingest_chunk(runtime, tail)
            self._finish(runtime, StreamStatus.FINISHED, "")
        except Exception as error:
            logger.exception("ingest of stream %s failed", stream_id)
            runtime.stop_event.set()
            runtime.queue.close()
            if runtime.source is not None:
                runtime.source.close()
            self._finish(runtime, StreamStatus.FAILED, f"{type(error).__name__}: {error}")
        finally:
            try:
                self._runtime_exit(runtime)
            finally:
                runtime.done.set()

    def _ingest_chunk(self, runtime: _Runtime, chunk) -> None:
        receipt = self.backend.append_chunk(runtime.stream_id, chunk)
        progress = runtime.progress
        progress.chunks += 1
        progress.kept_tokens = receipt.memory.kept_tokens
        progress.logical_tokens = receipt.memory.logical_tokens
        progress.cap_tokens = receipt.memory.cap_tokens
        runtime.pending_chunks.append(
            ChunkRecord(
                index=chunk.index,
                start_s=chunk.start_s,
                end_s=chunk.end_s,
                num_frames=len(chunk.frames),
                logical_tokens=receipt.logical_tokens,
                kept_tokens=receipt.kept_tokens,
                retention=receipt.retention,
                outlier_energy=chunk.outlier_energy,
                ingested_at=time.time(),
                artifact=receipt.artifact,
                memory_logical_tokens=receipt.memory.logical_tokens,
                memory_kept_tokens=receipt.memory.kept_tokens,
            )
        )
        runtime.pending_fields.update(
            chunks_ingested=chunk.index + 1,
            last_chunk_index=chunk.index,
            last_chunk_end_s=chunk.end_s,
            frames_read=progress.frames_read,
            frames_dropped=progress.frames_dropped,
            logical_tokens=receipt.memory.logical_tokens,
            kept_tokens=receipt.memory.kept_tokens,
            cap_tokens=receipt.memory.cap_tokens,
        )
        self._flush_pending(runtime)

    def _flush_pending(self, runtime: _Runtime) -> None:
        """Write pending chunk records (fenced), rotate chunk files, then the stream fields
        that point past them."""
        fence = runtime.lease.fence
        try:
            written = False
            while runtime.pending_chunks:
                self.store.add_chunk(runtime.stream_id, runtime.pending_chunks[0], fence)
                self.artifacts.added(runtime.stream_id, runtime.pending_chunks.popleft())
                written = True
            if written:
                self._rotate_artifacts(runtime)
            if runtime.pending_fields:
                fields = dict(runtime.pending_fields, updated_at=time.time())
                self.store.update_stream(runtime.stream_id, fence=fence, **fields)
                runtime.pending_fields.clear()
        except StoreUnavailable as error:
            runtime.progress.store_errors += 1
            logger.warning("stream %s: metadata kept for later, %s", runtime.stream_id, error)
        except UnknownStreamError:
            self._abandon(runtime, "deleted")
        except LeaseLost:
            self._abandon(runtime, "its lease was taken over or revoked (write refused by the fence)")

    def _rotate_artifacts(self, runtime: _Runtime) -> None:
        """Delete chunk files the memory no longer needs; record bytes on disk and any warning."""
        needed_artifacts = getattr(self.backend, "needed_artifacts", None)
        needed = needed_artifacts(runtime.stream_id) if needed_artifacts is not None else None
        report = self.artifacts.rotate(runtime.stream_id, needed)
        runtime.pending_fields.update(artifact_bytes=report.bytes_on_disk, warning=report.warning)

    def _update_runtime(self, runtime: _Runtime, **fields: Any) -> None:
        runtime.pending_fields.update(fields)
        self._flush_pending(runtime)

    def _finish(self, runtime: _Runtime, status: str, error: str) -> None:
        runtime.progress.status = status
        runtime.progress.error = error
        if status == StreamStatus.FAILED:
            logger.error("stream %s failed: %s", runtime.stream_id, error)
        self._update_runtime(runtime, status=status, error=error)

    def _update(self, stream_id: str, fence: Optional[int] = None, **fields: Any) -> None:
        try:
            self.store.update_stream(stream_id, fence=fence, updated_at=time.time(), **fields)
        except (StoreUnavailable, UnknownStreamError, LeaseLost) as error:
            logger.warning("stream %s: cannot update metadata: %s", stream_id, error)
