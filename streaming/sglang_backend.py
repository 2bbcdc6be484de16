"""A stream's memory inside an SGLang server: the server holds it, requests carry only what is new.

The server (``python -m flashcache_sglang.launch_server ... --enable-multimodal``) keeps each
stream's memory as versions of a compressed token sequence in its radix tree
(flashcache_sglang.stream_memory). This backend speaks that protocol over ``/generate``:

- **append**: the request's prompt is the new chunk only (the first also carries the prompt
  header, ``start: true``); ``custom_params.flashcache.stream`` says which stream, the chunk's
  retention (streaming.budget.RetentionSchedule: outlier energy above the stream's mean keeps
  more), the cap, the chunk's index and stream time. The server prefills the chunk after the
  memory, ranks every candidate of memory and chunk together, keeps the best under the cap
  (at least one visual token per ``footprint_s`` of stream time) and re-bases the kept tokens to
  contiguous positions. Nothing earlier is re-sent, re-decoded or re-processed.
- **ask**: the prompt is the conversation's history and the question; it is answered after the
  memory and never enters it.
- **close**: SGLang's ``/close_session`` with ``flashcache-stream:<id>``.

Memory numbers are the server's, from ``meta_info["flashcache"][0]["stream"]``.

A server that lost a memory (restart, flush, crash, idle timeout) answers 404; the backend then
**rebuilds** it from the chunk files it kept: the sink chunk, then up to ``rebuild_chunks`` chunks
(the newest ones and those the server's footprint said held the most tokens), each re-appended
under the same cap. Those files are all it keeps (``needed_artifacts``); the service rotates the
others away.

Chunks travel as small mp4 files, each chunk cut into videos of ``frames_per_video`` frames
(default 2, one Qwen-VL temporal patch: SGLang 0.5.23 gives each video of a multi-video prompt its
own cache identity only then). ``video_transport="path"`` sends file paths (server on the same file
system), ``"data_url"`` base64 (any server).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional, Sequence

import requests

from .budget import BudgetSettings, RetentionSchedule
from .memory import MemoryBackendError, UnknownMemoryError
from .types import Answer, Chunk, ChunkReceipt, ChunkRecord, Frame, MemoryUsage, Turn

__all__ = ["PromptTemplate", "SGLangMemoryBackend", "VideoChunkClient", "artifact_videos", "chunk_videos", "encode_mp4",
           "STREAM_SESSION_PREFIX"]

logger = logging.getLogger(__name__)

# SGLang's /close_session addresses a flashcache stream memory by this prefix (stream_memory.py).
STREAM_SESSION_PREFIX = "flashcache-stream:"
# Chunks besides the sink re-appended when a lost memory is rebuilt (so chunk files kept per stream).
DEFAULT_REBUILD_CHUNKS = 16
# A server with no KV slots free while questions read the memory answers an append "retryable".
APPEND_RETRIES, APPEND_RETRY_BACKOFF_S = 5, 0.5

# Qwen-VL groups frames in pairs (temporal patch 2) and SGLang's video sampler refuses fewer
# than 2 frames, so a video always holds an even number of frames, at least 2.
FRAME_FACTOR = 2


def chunk_videos(chunk: Chunk, frames_per_video: Optional[int]) -> list[list[Frame]]:
    """The chunk's frames cut into videos of ``frames_per_video`` frames (None: one video).

    A video with an odd number of frames (a stream's last, partial chunk) is padded by
    repeating its last frame, so the server's sampler keeps every frame.
    """
    frames = list(chunk.frames)
    size = frames_per_video or len(frames)
    videos = [frames[start : start + size] for start in range(0, len(frames), size)]
    for video in videos:
        while len(video) < FRAME_FACTOR or len(video) % FRAME_FACTOR:
            video.append(video[-1])
    return videos


def encode_mp4(frames: Sequence[Frame], fps: float) -> bytes:
    """Frames as an H.264 mp4 (``fps`` frames per second, yuv420p)."""
    import av

    height, width = frames[0].pixels.shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


@dataclass(frozen=True)
class PromptTemplate:
    """Prompt pieces (defaults: Qwen2.5-VL's ChatML). The first append sends ``header`` and its
    chunk's videos, each later append only ``video`` per video of its chunk, a question only
    :meth:`question_suffix`: each piece tokenizes on its own, as the server prefills it after
    the memory."""

    system: str = "You are watching a live video stream. Answer questions about what it showed."
    header: str = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    video: str = "<|vision_start|><|video_pad|><|vision_end|>"
    question: str = "\n{question}<|im_end|>\n<|im_start|>assistant\n"
    answer_end: str = "<|im_end|>\n<|im_start|>user\n"

    def question_suffix(self, history: Sequence[Turn], question: str) -> str:
        text = ""
        for turn in history:
            text += self.question.format(question=turn.question) + turn.answer + self.answer_end
        return text + self.question.format(question=question)


class MemoryLost(MemoryBackendError):
    """The server holds no memory for the stream (404): it must be rebuilt."""


@dataclass
class _ChunkFiles:
    index: int
    start_s: float
    paths: tuple[str, ...]
    energy: float = 0.0


@dataclass
class _SGLangStream:
    settings: BudgetSettings
    schedule: RetentionSchedule
    chunks: dict[int, _ChunkFiles] = field(default_factory=dict)  # files a rebuild may need
    sink: Optional[int] = None  # chunk index of the first chunk
    footprint: dict[int, int] = field(default_factory=dict)  # server: kept visual tokens per chunk
    logical_tokens: int = 0  # every chunk ever appended, header included (what vanilla would hold)
    memory_tokens: int = 0  # the server's memory length after the last append
    capped_kv_slots: int = 0  # what the cap counts (visual tokens + delimiters)
    next_position: int = 0
    version: int = 0
    chunks_seen: int = 0
    rebuilds: int = 0
    last_report: dict = field(default_factory=dict)
    append_lock: threading.Lock = field(default_factory=threading.Lock)
    state_lock: threading.Lock = field(default_factory=threading.Lock)


class VideoChunkClient:
    """What every backend that sends chunk videos to an SGLang server shares: the chunk files on
    disk (one folder per chunk, one mp4 per video), their transport, and ``/generate`` calls
    (plain and streamed) whose refusals become :class:`MemoryBackendError` (404:
    :class:`MemoryLost`, in the HTTP status or inside a streamed answer)."""

    def __init__(self, base_url: str, chunk_dir: str, fps: float, frames_per_video: Optional[int],
                 video_transport: str, timeout_s: float, session: Optional[requests.Session]):
        if video_transport not in ("path", "data_url"):
            raise ValueError(f"video_transport={video_transport!r}; valid: ['path', 'data_url']")
        if frames_per_video is not None and (
            not isinstance(frames_per_video, int) or frames_per_video < FRAME_FACTOR or frames_per_video % FRAME_FACTOR
        ):
            raise ValueError(f"frames_per_video={frames_per_video!r} must be None or an even int >= {FRAME_FACTOR}")
        self.base_url = base_url.rstrip("/")
        self.chunk_dir = chunk_dir
        self.fps = fps
        self.frames_per_video = frames_per_video
        self.video_transport = video_transport
        self.timeout_s = timeout_s
        self._http = session or requests.Session()
    def _write_chunk(self, stream_id: str, chunk: Chunk) -> tuple[str, tuple[str, ...]]:
        """Write the chunk's videos into its own folder; returns the folder and the paths."""
        folder = os.path.join(self.chunk_dir, stream_id, f"chunk_{chunk.index:08d}")
        os.makedirs(folder, exist_ok=True)
        paths = []
        for part, frames in enumerate(chunk_videos(chunk, self.frames_per_video)):
            path = os.path.join(folder, f"part_{part:03d}.mp4")
            temporary = path + ".tmp"
            with open(temporary, "wb") as handle:
                handle.write(encode_mp4(frames, self.fps))
            os.replace(temporary, path)
            paths.append(path)
        return folder, tuple(paths)

    def _video_payload(self, paths: Sequence[str]) -> list[str]:
        if self.video_transport == "path":
            return [os.path.abspath(p) for p in paths]
        payload = []
        for path in paths:
            with open(path, "rb") as handle:
                payload.append("data:video/mp4;base64," + base64.b64encode(handle.read()).decode())
        return payload

    def _post(self, body: dict[str, Any], stream: bool):
        try:
            return self._http.post(f"{self.base_url}/generate", json=body, timeout=self.timeout_s, stream=stream)
        except requests.RequestException as error:
            raise MemoryBackendError(f"SGLang server at {self.base_url} unreachable: {error}") from None

    @staticmethod
    def _check(response) -> None:
        if response.status_code == 404:
            raise MemoryLost(f"SGLang holds no memory for this stream: {response.text[:300]}")
        if response.status_code != 200:
            raise MemoryBackendError(f"SGLang /generate returned {response.status_code}: {response.text[:300]}")

    def _generate(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self._post(body, stream=False)
        self._check(response)
        return response.json()

    def _generate_streaming(self, body: dict[str, Any], sampling_params: dict[str, Any],
                            started: float) -> tuple[str, dict[str, Any], float]:
        ttft = None
        text, meta = "", {}
        with self._post(dict(body, sampling_params=sampling_params, stream=True), stream=True) as response:
            self._check(response)
            try:
                for line in response.iter_lines(decode_unicode=True):
                    if not line or not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    _raise_if_aborted(event)
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    text = event.get("text", text)  # SGLang streams the cumulative text
                    meta = event.get("meta_info", meta)
            except requests.RequestException as error:
                raise MemoryBackendError(f"SGLang server at {self.base_url} broke the answer: {error}") from None
        return text, meta, ttft if ttft is not None else time.perf_counter() - started


class SGLangMemoryBackend(VideoChunkClient):
    """Stream memories held by an SGLang server launched with flashcache.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:30000``.
        chunk_dir: where chunk videos are kept (one folder per stream).
        fps: frame rate written into chunk videos (the sampling fps).
        frames_per_video: frames per video (even; None: a chunk is one video). Keep 2 for
            Qwen2.5-VL on SGLang 0.5.23 (see the module docstring).
        template: prompt pieces of the served model.
        video_transport: ``"path"`` or ``"data_url"``.
        rebuild_chunks: most chunks besides the sink re-appended when a lost memory is rebuilt
            (and so the most chunk files kept per stream).
        max_answer_tokens: answer length.
        timeout_s: per request.
    """

    name = "sglang"

    def __init__(
        self,
        base_url: str,
        chunk_dir: str,
        fps: float = 2.0,
        frames_per_video: Optional[int] = FRAME_FACTOR,
        template: PromptTemplate = PromptTemplate(),
        video_transport: str = "data_url",
        rebuild_chunks: int = DEFAULT_REBUILD_CHUNKS,
        max_answer_tokens: int = 64,
        timeout_s: float = 120.0,
        session: Optional[requests.Session] = None,
    ):
        super().__init__(base_url, chunk_dir, fps, frames_per_video, video_transport, timeout_s, session)
        if not isinstance(rebuild_chunks, int) or rebuild_chunks < 0:
            raise ValueError(f"rebuild_chunks={rebuild_chunks!r} must be an int >= 0")
        self.template = template
        self.rebuild_chunks = rebuild_chunks
        self.max_answer_tokens = max_answer_tokens
        self._streams: dict[str, _SGLangStream] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- protocol

    def open(self, stream_id: str, budget: BudgetSettings, restore: Sequence[ChunkRecord] = ()) -> None:
        """Track a stream. With ``restore`` (a restarted service) the server may still hold the
        memory; if it does not, the first append or question rebuilds it from these records."""
        state = _SGLangStream(budget, RetentionSchedule(budget))
        for record in restore:
            state.chunks_seen += 1
            state.logical_tokens += record.logical_tokens
            if state.sink is None:
                state.sink = record.index
            paths = artifact_videos(record.artifact)
            if paths:
                state.chunks[record.index] = _ChunkFiles(record.index, record.start_s, paths, record.outlier_energy)
            elif record.index == state.sink:
                logger.warning("stream %s: the sink chunk %d has no video file left", stream_id, record.index)
        if restore:
            state.schedule.mean_energy = sum(r.outlier_energy for r in restore) / len(restore)
            state.schedule.num_chunks = len(restore)
            last = restore[-1]
            state.memory_tokens = state.capped_kv_slots = max(0, last.memory_kept_tokens)
            if last.memory_logical_tokens >= 0:
                state.logical_tokens = last.memory_logical_tokens
        with self._lock:
            self._streams[stream_id] = state

    def append_chunk(self, stream_id: str, chunk: Chunk) -> ChunkReceipt:
        state = self._state(stream_id)
        with state.append_lock:  # one append per stream at a time (the server refuses a second)
            folder, paths = self._write_chunk(stream_id, chunk)
            files = _ChunkFiles(chunk.index, chunk.start_s, paths, chunk.outlier_energy)
            with state.state_lock:
                retention = state.schedule.next_retention(chunk.outlier_energy)
                start = state.sink is None
            try:
                meta = self._append(stream_id, state, files, retention, start=start)
            except MemoryLost:
                self._rebuild(stream_id, state)
                meta = self._append(stream_id, state, files, retention, start=False)
            with state.state_lock:
                logical = self._record_append(state, files, meta, start)
                usage = self._usage(state)
                report = state.last_report
        kept_own = int(report.get("kept_tokens", 0)) + max(0, logical - int(report.get("candidate_tokens", 0)))
        return ChunkReceipt(logical, min(kept_own, logical), retention, usage, artifact=folder)

    def ask(self, stream_id: str, question: str, history: Sequence[Turn]) -> Answer:
        state = self._state(stream_id)
        with state.state_lock:
            chunks_seen = state.chunks_seen
            empty = state.sink is None
        if empty:
            return Answer("The stream has no video in memory yet.", 0.0, 0, 0, self.name)
        prompt = self.template.question_suffix(history, question)
        sampling = {"max_new_tokens": self.max_answer_tokens, "temperature": 0.0,
                    "custom_params": {"flashcache": {"stream": {"id": stream_id, "op": "ask"}}}}
        started = time.perf_counter()
        try:
            text, meta, ttft = self._generate_streaming({"text": prompt}, sampling, started)
        except MemoryLost:
            with state.append_lock:
                self._rebuild(stream_id, state)
            started = time.perf_counter()
            text, meta, ttft = self._generate_streaming({"text": prompt}, sampling, started)
        stream = _stream_entry(meta)
        extra: dict[str, Any] = {"prompt_tokens": int(meta.get("prompt_tokens", 0)),
                                 "e2e_s": time.perf_counter() - started,
                                 "request_bytes": len(json.dumps({"text": prompt, "sampling_params": sampling}))}
        entry = _flashcache_entry(meta)
        if entry is not None and "server_timing" in entry:
            extra["server_timing"] = entry["server_timing"]
        if stream is not None:
            extra["memory_version"] = stream.get("version")
        return Answer(text=text.strip(), ttft_s=ttft, cached_tokens=int(meta.get("cached_tokens", 0)),
                      memory_chunks=chunks_seen, backend=self.name, extra=extra)

    def memory_tokens(self, stream_id: str) -> MemoryUsage:
        state = self._state(stream_id)
        with state.state_lock:
            return self._usage(state)

    def release(self, stream_id: str) -> None:
        """Forget the stream here and close its memory on the server."""
        with self._lock:
            state = self._streams.pop(stream_id, None)
        if state is None:
            return
        try:
            self._http.post(f"{self.base_url}/close_session",
                            json={"session_id": STREAM_SESSION_PREFIX + stream_id}, timeout=self.timeout_s)
        except requests.RequestException as error:
            logger.warning("stream %s: could not close its memory on %s: %s", stream_id, self.base_url, error)

    def forget(self, stream_id: str) -> None:
        """Forget the stream here only: another replica owns it now and keeps using its memory."""
        with self._lock:
            self._streams.pop(stream_id, None)

    def needed_artifacts(self, stream_id: str) -> Optional[set[int]]:
        """Chunk indices whose files a rebuild would re-append: the sink and the rebuild set."""
        state = self._state(stream_id)
        with state.state_lock:
            return self._rebuild_set(state) | ({state.sink} if state.sink is not None else set())

    def last_report(self, stream_id: str) -> dict:
        """The server's ``stream`` entry of the stream's latest append (empty before the first)."""
        state = self._state(stream_id)
        with state.state_lock:
            return dict(state.last_report)

    # ----------------------------------------------------------------- appends and rebuilds

    def _append(self, stream_id: str, state: _SGLangStream, files: _ChunkFiles, retention: float, *,
                start: bool) -> dict[str, Any]:
        settings = state.settings
        stream = {"id": stream_id, "op": "append", "retention": float(retention), "cap_tokens": settings.kv_cap_tokens,
                  "chunk": files.index, "time_s": float(files.start_s), "footprint_s": float(settings.footprint_s),
                  "report_footprint": True}
        if start:
            stream.update(start=True, keep_sink=settings.keep_sink)
        text = (self.template.header.format(system=self.template.system) if start else "") \
            + self.template.video * len(files.paths)
        body = {"text": text, "video_data": self._video_payload(files.paths),
                "sampling_params": {"max_new_tokens": 1, "temperature": 0.0,
                                    "custom_params": {"flashcache": {"stream": stream}}}}
        for attempt in range(APPEND_RETRIES + 1):
            meta = self._generate(body).get("meta_info", {})
            entry = _stream_entry(meta)
            if entry is None:
                raise MemoryBackendError(
                    f"SGLang at {self.base_url} answered an append without meta_info.flashcache[0].stream: "
                    "is it started with python -m flashcache_sglang.launch_server?")
            if "error" not in entry:
                return meta
            if not entry.get("retryable") or attempt == APPEND_RETRIES:
                raise MemoryBackendError(f"SGLang could not append chunk {files.index}: {entry['error']}")
            logger.info("stream %s: chunk %d not appended yet (%s); retrying", stream_id, files.index, entry["error"])
            time.sleep(APPEND_RETRY_BACKOFF_S * (attempt + 1))
        raise AssertionError("unreachable")

    def _record_append(self, state: _SGLangStream, files: _ChunkFiles, meta: dict, start: bool) -> int:
        """Update the stream from an append's answer; returns the chunk's logical tokens."""
        stream = _stream_entry(meta)
        entry = _flashcache_entry(meta) or {}
        previous = 0 if start else state.memory_tokens
        logical = max(1, int(meta.get("prompt_tokens", 0)) - previous)
        state.chunks[files.index] = files
        if start:
            state.sink = files.index
        state.footprint = {int(k): int(v) for k, v in stream.get("footprint", {}).items()}
        state.memory_tokens = int(stream["memory_tokens"])
        state.capped_kv_slots = int(stream["capped_kv_slots"])
        state.next_position = int(stream["next_position"])
        state.version = int(stream["version"])
        state.logical_tokens += logical
        state.chunks_seen += 1
        state.last_report = dict(stream, kept_tokens=entry.get("kept_tokens", 0),
                                 candidate_tokens=entry.get("candidate_tokens", 0),
                                 prompt_tokens=int(meta.get("prompt_tokens", 0)),
                                 cached_tokens=int(meta.get("cached_tokens", 0)))
        # Files no rebuild needs any more are forgotten here (the service deletes them).
        keep = self._rebuild_set(state) | {state.sink}
        state.chunks = {index: c for index, c in state.chunks.items() if index in keep}
        return logical

    def _rebuild_set(self, state: _SGLangStream) -> set[int]:
        """Chunks a rebuild re-appends after the sink: the newest half of the budget, then the
        chunks the server's footprint says held the most visual tokens."""
        budget = self.rebuild_chunks
        candidates = sorted(index for index in state.chunks if index != state.sink)
        newest = candidates[-(budget - budget // 2):] if budget else []
        by_footprint = sorted((index for index in candidates if index not in newest),
                              key=lambda index: (-state.footprint.get(index, 0), -index))
        return set(newest) | set(by_footprint[: budget - len(newest)])

    def _rebuild(self, stream_id: str, state: _SGLangStream) -> None:
        """Start the memory again from the kept chunk files (the caller holds ``append_lock``)."""
        with state.state_lock:
            sink = state.chunks.get(state.sink) if state.sink is not None else None
            order = [state.chunks[index] for index in sorted(self._rebuild_set(state))]
            retention = state.settings.base_retention
        if sink is None:
            raise MemoryBackendError(f"stream {stream_id}: the server lost its memory and the sink chunk's "
                                     "files are gone; it cannot be rebuilt")
        logger.warning("stream %s: the server lost its memory; rebuilding from %d chunk files", stream_id, 1 + len(order))
        meta = self._append(stream_id, state, sink, 1.0, start=True)
        with state.state_lock:
            state.memory_tokens = 0
            self._apply_rebuilt(state, meta)
        for files in order:
            meta = self._append(stream_id, state, files, retention, start=False)
            with state.state_lock:
                self._apply_rebuilt(state, meta)
        with state.state_lock:
            state.rebuilds += 1

    @staticmethod
    def _apply_rebuilt(state: _SGLangStream, meta: dict) -> None:
        stream = _stream_entry(meta)
        state.footprint = {int(k): int(v) for k, v in stream.get("footprint", {}).items()}
        state.memory_tokens = int(stream["memory_tokens"])
        state.capped_kv_slots = int(stream["capped_kv_slots"])
        state.next_position = int(stream["next_position"])
        state.version = int(stream["version"])

    # ----------------------------------------------------------------- helpers

    def _state(self, stream_id: str) -> _SGLangStream:
        with self._lock:
            state = self._streams.get(stream_id)
        if state is None:
            raise UnknownMemoryError(f"no memory for stream {stream_id!r}")
        return state

    def _usage(self, state: _SGLangStream) -> MemoryUsage:
        return MemoryUsage(state.logical_tokens, state.capped_kv_slots, state.settings.kv_cap_tokens,
                           state.chunks_seen, total_kv_slots=state.memory_tokens)

def _raise_if_aborted(event: dict[str, Any]) -> None:
    """A streamed answer reports a refusal inside the stream (HTTP 200): raise it as the
    non-streamed answer's status would."""
    if "error" in event:
        error = event["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        if code == 404:
            raise MemoryLost(message)
        raise MemoryBackendError(f"SGLang refused the request: {message[:300]}")
    reason = (event.get("meta_info") or {}).get("finish_reason") or {}
    if isinstance(reason, dict) and reason.get("type") == "abort":
        message = str(reason.get("message", "aborted"))
        if reason.get("status_code") == 404:
            raise MemoryLost(message)
        raise MemoryBackendError(f"SGLang aborted the request: {message[:300]}")


def _stream_entry(meta: dict[str, Any]) -> Optional[dict[str, Any]]:
    entry = _flashcache_entry(meta)
    stream = entry.get("stream") if entry is not None else None
    return stream if isinstance(stream, dict) else None


def _flashcache_entry(meta: dict[str, Any]) -> Optional[dict[str, Any]]:
    """``meta_info["flashcache"][0]`` when the server reported one."""
    entries = meta.get("flashcache")
    if isinstance(entries, list) and entries and isinstance(entries[0], dict):
        return entries[0]
    return None


def artifact_videos(artifact: str) -> tuple[str, ...]:
    """The videos of a stored chunk: its folder's ``part_*.mp4`` (or a single video file)."""
    if artifact and os.path.isdir(artifact):
        return tuple(sorted(os.path.join(artifact, name) for name in os.listdir(artifact)
                            if name.startswith("part_") and name.endswith(".mp4")))
    if artifact and os.path.isfile(artifact):
        return (artifact,)
    return ()
