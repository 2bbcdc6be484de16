"""A stream's memory inside an SGLang server (native ``/generate`` API over HTTP).

The memory of a stream is a prompt prefix::

    <system> <user> <video chunk 0> <video chunk 1> ... <video chunk k>

- **Ingest** of chunk k+1 is one request over ``prefix + chunk k+1`` with ``max_new_tokens=1``:
  the radix cache matches the (already compressed) prefix, SGLang prefills only the new
  chunk, and FlashCache compresses its visual tokens with the retention the chunk's outlier
  energy earned (streaming.budget.RetentionSchedule). With ``memory_cap_tokens`` the server
  then re-scores the older kept visual tokens of the prefix and drops the lowest until the
  memory fits the cap (the first chunk is spared with ``keep_sink``), in place in the tree.
- **Asking** sends ``prefix + earlier turns + question``: the prefix is matched in the radix
  cache, only the question is computed, and nothing after the prefix is ever part of the
  memory (each question is a branch of the tree). Questions carry the stream's cap too: when
  the server had evicted the memory, the question that recomputes it holds it to the cap as an
  ingest would (an in-place shrink only ever touches nodes the requester alone holds).

Every request of a stream carries ``custom_params["flashcache"]["namespace"] =
"stream/<stream_id>"``: chunks compressed at different retentions still form one reusable
prefix, and streams never share (or shrink) each other's nodes.

Memory numbers are the server's, from ``meta_info["flashcache"][0]`` of each ingest:
``prompt_tokens`` (logical) and ``prompt_kv_slots`` (KV slots the prompt really holds, the
reused compressed prefix included). Nothing is estimated on the client.

Chunks travel as small mp4 files (SGLang's Qwen-VL processor decodes ``video_data`` with
decord/torchcodec and samples ``fps`` from the server's ``--mm-process-config``), each chunk
cut into videos of ``frames_per_video`` frames (default 2, one Qwen-VL temporal patch). Why:
SGLang 0.5.23 gives each video of a multi-video prompt its own radix-cache identity only when
it can split the processor's output per video, which for Qwen2.5-VL (one contiguous token run
per video) happens only if every video is a single temporal patch; otherwise all videos of a
request share one hash and no earlier chunk is ever reused. The files are kept under
``chunk_dir`` (one folder per chunk) because every request resends the whole prefix (the radix key carries
a hash of each video's content, so the exact same bytes must come back) and because a
restarted service rebuilds the prefix from them. ``video_transport="path"`` sends file paths
(server on the same file system), ``"data_url"`` sends base64 (any server).

An endless stream's prompt cannot grow forever (context length, tokenizer work per request),
so the prompt holds at most ``max_prompt_chunks`` chunks; past that it keeps the sink and the
newest chunks, down to half the limit. Leaving changes the prefix, so the next request
prefills the remaining window once (counted in ``rebases``).
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

__all__ = ["PromptTemplate", "SGLangMemoryBackend", "IngestReport", "chunk_videos", "encode_mp4", "stream_namespace"]

logger = logging.getLogger(__name__)

# Qwen-VL groups frames in pairs (temporal patch 2) and SGLang's video sampler refuses fewer
# than 2 frames, so a video always holds an even number of frames, at least 2.
FRAME_FACTOR = 2


def stream_namespace(stream_id: str) -> str:
    """The radix-tree namespace every request of a stream sends."""
    return f"stream/{stream_id}"


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
    """Prompt pieces (defaults: Qwen2.5-VL's ChatML). The memory prefix ends right after the
    last video so appended questions tokenize on their own."""

    system: str = "You are watching a live video stream. Answer questions about what it showed."
    header: str = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    video: str = "<|vision_start|><|video_pad|><|vision_end|>"
    question: str = "\n{question}<|im_end|>\n<|im_start|>assistant\n"
    answer_end: str = "<|im_end|>\n<|im_start|>user\n"

    def memory_prompt(self, num_videos: int) -> str:
        return self.header.format(system=self.system) + self.video * num_videos

    def question_suffix(self, history: Sequence[Turn], question: str) -> str:
        text = ""
        for turn in history:
            text += self.question.format(question=turn.question) + turn.answer + self.answer_end
        return text + self.question.format(question=question)


@dataclass(frozen=True)
class IngestReport:
    """The server's numbers for one ingest request (``meta_info`` and its ``flashcache`` entry).

    Attributes:
        chunk_index: the chunk this request appended.
        prompt_tokens: logical prompt length (the whole memory prefix, uncompressed).
        prompt_kv_slots: KV slots the prompt really holds after compression and the cap.
        video_tokens: visual tokens of the prompt (logical).
        cached_tokens: prompt tokens served from the radix cache (the reused memory prefix).
        candidate_tokens / kept_tokens: visual tokens this request compressed itself / kept.
        retention: the retention the request asked for.
        rebased: the backend did not know the prefix's token count before this request (the
            prompt window moved, or the memory was restored after a restart), so the chunk's
            logical size is taken from the previous chunk.
        media_kv_slots: KV slots held by visual tokens (the server's count).
        capped_kv_slots: what the server's memory cap counts after this request (visual
            tokens and their delimiters); None without a cap.
    """

    chunk_index: int
    prompt_tokens: int
    prompt_kv_slots: int
    video_tokens: int
    cached_tokens: int
    candidate_tokens: int
    kept_tokens: int
    retention: float
    rebased: bool = False
    media_kv_slots: Optional[int] = None
    capped_kv_slots: Optional[int] = None

    @property
    def text_tokens(self) -> int:
        return self.prompt_tokens - self.video_tokens

    @property
    def visual_kv_slots(self) -> int:
        """KV slots held by visual tokens (the server's count; older servers: estimated)."""
        if self.media_kv_slots is not None:
            return self.media_kv_slots
        return self.prompt_kv_slots - self.text_tokens


@dataclass
class _PromptChunk:
    index: int
    paths: tuple[str, ...]  # its videos, in order


@dataclass
class _SGLangStream:
    settings: BudgetSettings
    schedule: RetentionSchedule
    prompt_chunks: list[_PromptChunk] = field(default_factory=list)
    prefix_tokens: int = 0  # prompt tokens of the memory prefix as the server counted them (0: unknown)
    last_chunk_logical: int = 0
    logical_tokens: int = 0  # every chunk ever appended, header included (what vanilla would hold)
    kv_slots: int = 0  # the server's prompt_kv_slots after the last ingest
    chunks_seen: int = 0
    rebases: int = 0
    last_ingest: Optional[IngestReport] = None
    append_lock: threading.Lock = field(default_factory=threading.Lock)
    state_lock: threading.Lock = field(default_factory=threading.Lock)


class SGLangMemoryBackend:
    """Stream memories in an SGLang server launched with flashcache
    (``python -m flashcache_sglang.launch_server ... --enable-multimodal``).

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:30000``.
        chunk_dir: where chunk videos are kept (one folder per stream).
        fps: frame rate written into chunk videos (the sampling fps).
        frames_per_video: frames per video in the prompt (even; None: a chunk is one video).
            Keep 2 for Qwen2.5-VL on SGLang 0.5.23 (see the module docstring).
        template: prompt pieces of the served model.
        video_transport: ``"path"`` or ``"data_url"``.
        max_prompt_chunks: most chunks in the prompt (see module docstring).
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
        max_prompt_chunks: int = 64,
        max_answer_tokens: int = 64,
        timeout_s: float = 120.0,
        session: Optional[requests.Session] = None,
    ):
        if video_transport not in ("path", "data_url"):
            raise ValueError(f"video_transport={video_transport!r}; valid: ['path', 'data_url']")
        if frames_per_video is not None and (
            not isinstance(frames_per_video, int) or frames_per_video < FRAME_FACTOR or frames_per_video % FRAME_FACTOR
        ):
            raise ValueError(f"frames_per_video={frames_per_video!r} must be None or an even int >= {FRAME_FACTOR}")
        if max_prompt_chunks < 2:
            raise ValueError(f"max_prompt_chunks={max_prompt_chunks} must be >= 2")
        self.base_url = base_url.rstrip("/")
        self.chunk_dir = chunk_dir
        self.fps = fps
        self.frames_per_video = frames_per_video
        self.template = template
        self.video_transport = video_transport
        self.max_prompt_chunks = max_prompt_chunks
        self.max_answer_tokens = max_answer_tokens
        self.timeout_s = timeout_s
        self._http = session or requests.Session()
        self._streams: dict[str, _SGLangStream] = {}
        self._lock = threading.Lock()
        self._warned_no_flashcache = False

    # ----------------------------------------------------------------- protocol

    def open(self, stream_id: str, budget: BudgetSettings, restore: Sequence[ChunkRecord] = ()) -> None:
        state = _SGLangStream(budget, RetentionSchedule(budget))
        for record in restore:
            state.logical_tokens += record.logical_tokens
            state.last_chunk_logical = record.logical_tokens
            state.chunks_seen += 1
            paths = _artifact_videos(record.artifact)
            if paths:
                state.prompt_chunks.append(_PromptChunk(record.index, paths))
            else:
                logger.warning("stream %s: chunk %d has no video file left; it leaves the memory", stream_id, record.index)
        if restore:
            state.schedule.mean_energy = sum(r.outlier_energy for r in restore) / len(restore)
            state.schedule.num_chunks = len(restore)
            # Until the server counts the rebuilt prefix, the last stored count stands.
            state.kv_slots = max(0, restore[-1].memory_kept_tokens)
            if restore[-1].memory_logical_tokens >= 0:
                state.logical_tokens = restore[-1].memory_logical_tokens
        self._trim_prompt(state)
        with self._lock:
            self._streams[stream_id] = state

    def append_chunk(self, stream_id: str, chunk: Chunk) -> ChunkReceipt:
        state = self._state(stream_id)
        with state.append_lock:  # one ingest request per stream at a time
            folder, paths = self._write_chunk(stream_id, chunk)
            with state.state_lock:
                retention = state.schedule.next_retention(chunk.outlier_energy)
                videos = [p for c in state.prompt_chunks for p in c.paths] + list(paths)
                settings = state.settings
                rebased = state.prefix_tokens == 0 and bool(state.prompt_chunks)
            knob = {
                "namespace": stream_namespace(stream_id),
                "retention": retention,
                "memory_cap_tokens": settings.kv_cap_tokens,
                "keep_sink": settings.keep_sink,
                # The first chunk is several videos in the prompt: spare all of them.
                "sink_items": len(state.prompt_chunks[0].paths) if state.prompt_chunks else len(paths),
            }
            response = self._generate(
                self.template.memory_prompt(len(videos)),
                videos,
                {"max_new_tokens": 1, "temperature": 0.0, "custom_params": {"flashcache": knob}},
            )
            report = self._ingest_report(chunk.index, response.get("meta_info", {}), retention, rebased)
            with state.state_lock:
                if state.prefix_tokens:
                    logical = report.prompt_tokens - state.prefix_tokens
                elif rebased:  # the window was re-prefilled: same geometry as the last chunk
                    logical = state.last_chunk_logical
                else:  # header + first chunk
                    logical = report.prompt_tokens
                logical = max(1, logical)
                if rebased:
                    # The request compressed the whole window at once; this chunk's share.
                    kept = round(logical * report.kept_tokens / max(1, report.candidate_tokens))
                else:
                    # Its kept visual tokens plus the tokens that were never candidates
                    # (the vision wrappers; the prompt header for the first chunk).
                    kept = report.kept_tokens + max(0, logical - report.candidate_tokens)
                state.prompt_chunks.append(_PromptChunk(chunk.index, paths))
                state.prefix_tokens = report.prompt_tokens
                state.last_chunk_logical = logical
                state.logical_tokens += logical
                state.kv_slots = report.prompt_kv_slots
                state.last_ingest = report
                state.chunks_seen += 1
                self._trim_prompt(state)
                usage = self._usage(state)
        return ChunkReceipt(logical, min(kept, logical), retention, usage, artifact=folder)

    def ask(self, stream_id: str, question: str, history: Sequence[Turn]) -> Answer:
        state = self._state(stream_id)
        with state.state_lock:  # snapshot only: the request runs beside ingest
            videos = [p for c in state.prompt_chunks for p in c.paths]
            chunks_seen = state.chunks_seen
            settings = state.settings
            retention = settings.base_retention
            sink_items = len(state.prompt_chunks[0].paths) if state.prompt_chunks else 0
        if not videos:
            return Answer("The stream has no video in memory yet.", 0.0, 0, 0, self.name)
        prompt = self.template.memory_prompt(len(videos)) + self.template.question_suffix(history, question)
        # Same namespace as the ingests (so the memory prefix matches). The base retention and the
        # cap only matter if the server had evicted the memory and this question recomputes it:
        # it is then held to the stream's cap, as the next ingest would hold it.
        knob = {"namespace": stream_namespace(stream_id), "retention": retention,
                "memory_cap_tokens": settings.kv_cap_tokens, "keep_sink": settings.keep_sink,
                "sink_items": sink_items}
        started = time.perf_counter()
        text, meta, ttft = self._generate_streaming(
            prompt,
            videos,
            {"max_new_tokens": self.max_answer_tokens, "temperature": 0.0, "custom_params": {"flashcache": knob}},
            started,
        )
        extra: dict[str, Any] = {"prompt_tokens": int(meta.get("prompt_tokens", 0)), "e2e_s": time.perf_counter() - started}
        report = _flashcache_entry(meta)
        if report is not None:
            extra["prompt_kv_slots"] = int(report["prompt_kv_slots"])
        return Answer(
            text=text.strip(),
            ttft_s=ttft,
            cached_tokens=int(meta.get("cached_tokens", 0)),
            memory_chunks=chunks_seen,
            backend=self.name,
            extra=extra,
        )

    def memory_tokens(self, stream_id: str) -> MemoryUsage:
        state = self._state(stream_id)
        with state.state_lock:
            return self._usage(state)

    def release(self, stream_id: str) -> None:
        with self._lock:
            self._streams.pop(stream_id, None)

    def last_ingest(self, stream_id: str) -> Optional[IngestReport]:
        """The server's numbers for the stream's latest ingest (None before the first)."""
        state = self._state(stream_id)
        with state.state_lock:
            return state.last_ingest

    # ----------------------------------------------------------------- helpers

    def _state(self, stream_id: str) -> _SGLangStream:
        with self._lock:
            state = self._streams.get(stream_id)
        if state is None:
            raise UnknownMemoryError(f"no memory for stream {stream_id!r}")
        return state

    def _usage(self, state: _SGLangStream) -> MemoryUsage:
        return MemoryUsage(state.logical_tokens, state.kv_slots, state.settings.kv_cap_tokens, state.chunks_seen)

    def _ingest_report(self, index: int, meta: dict[str, Any], retention: float, rebased: bool) -> IngestReport:
        if "prompt_tokens" not in meta:
            raise MemoryBackendError(f"SGLang /generate answered without meta_info.prompt_tokens: {str(meta)[:300]}")
        prompt_tokens = int(meta["prompt_tokens"])
        video_tokens = int(meta.get("video_tokens") or 0)
        entry = _flashcache_entry(meta)
        if entry is None:
            # A server without flashcache (or a chunk below --flashcache-min-candidates): the
            # prompt holds every token.
            if not self._warned_no_flashcache:
                self._warned_no_flashcache = True
                logger.warning(
                    "SGLang at %s reports no meta_info.flashcache: nothing is compressed (is it started "
                    "with python -m flashcache_sglang.launch_server?); memory = logical tokens",
                    self.base_url,
                )
            entry = {"prompt_kv_slots": prompt_tokens, "candidate_tokens": 0, "kept_tokens": 0}
        return IngestReport(
            chunk_index=index,
            prompt_tokens=prompt_tokens,
            prompt_kv_slots=int(entry["prompt_kv_slots"]),
            video_tokens=video_tokens,
            cached_tokens=int(meta.get("cached_tokens") or 0),
            candidate_tokens=int(entry["candidate_tokens"]),
            kept_tokens=int(entry["kept_tokens"]),
            media_kv_slots=int(entry["media_kv_slots"]) if "media_kv_slots" in entry else None,
            capped_kv_slots=int(entry["capped_kv_slots"]) if "capped_kv_slots" in entry else None,
            retention=retention,
            rebased=rebased,
        )

    def _trim_prompt(self, state: _SGLangStream) -> None:
        """Rebase the prompt once it holds more than ``max_prompt_chunks`` chunks.

        The prompt then keeps the sink and the newest chunks, down to half the limit so
        rebases are rare. What the dropped chunks held in KV is freed by the server's LRU.
        """
        if len(state.prompt_chunks) <= self.max_prompt_chunks:
            return
        sink = state.prompt_chunks[0] if state.settings.keep_sink else None
        rest = state.prompt_chunks[1:] if sink is not None else state.prompt_chunks
        room = self.max_prompt_chunks // 2 - (1 if sink is not None else 0)
        tail = rest[-room:] if room > 0 else []
        state.prompt_chunks = ([sink] if sink is not None else []) + tail
        state.rebases += 1
        state.prefix_tokens = 0  # unknown until the server counts the rebased prefix
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

    def _request(self, prompt: str, paths: Sequence[str], sampling_params: dict[str, Any], stream: bool) -> dict[str, Any]:
        return {"text": prompt, "video_data": self._video_payload(paths), "sampling_params": sampling_params, "stream": stream}

    def _generate(self, prompt: str, paths: Sequence[str], sampling_params: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._http.post(
                f"{self.base_url}/generate", json=self._request(prompt, paths, sampling_params, False), timeout=self.timeout_s
            )
        except requests.RequestException as error:
            raise MemoryBackendError(f"SGLang server at {self.base_url} unreachable: {error}") from None
        if response.status_code != 200:
            raise MemoryBackendError(f"SGLang /generate returned {response.status_code}: {response.text[:300]}")
        return response.json()

    def _generate_streaming(
        self, prompt: str, paths: Sequence[str], sampling_params: dict[str, Any], started: float
    ) -> tuple[str, dict[str, Any], float]:
        ttft = None
        text, meta = "", {}
        try:
            with self._http.post(
                f"{self.base_url}/generate",
                json=self._request(prompt, paths, sampling_params, True),
                timeout=self.timeout_s,
                stream=True,
            ) as response:
                if response.status_code != 200:
                    raise MemoryBackendError(f"SGLang /generate returned {response.status_code}: {response.text[:300]}")
                for line in response.iter_lines(decode_unicode=True):
                    if not line or not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    text = event.get("text", text)  # SGLang streams the cumulative text
                    meta = event.get("meta_info", meta)
        except requests.RequestException as error:
            raise MemoryBackendError(f"SGLang server at {self.base_url} unreachable: {error}") from None
        return text, meta, ttft if ttft is not None else time.perf_counter() - started


def _flashcache_entry(meta: dict[str, Any]) -> Optional[dict[str, Any]]:
    """``meta_info["flashcache"][0]`` when the server reported one."""
    entries = meta.get("flashcache")
    if isinstance(entries, list) and entries and isinstance(entries[0], dict) and "prompt_kv_slots" in entries[0]:
        return entries[0]
    return None


def _artifact_videos(artifact: str) -> tuple[str, ...]:
    """The videos of a stored chunk: its folder's ``part_*.mp4`` (or a single video file)."""
    if artifact and os.path.isdir(artifact):
        return tuple(sorted(os.path.join(artifact, name) for name in os.listdir(artifact)
                            if name.startswith("part_") and name.endswith(".mp4")))
    if artifact and os.path.isfile(artifact):
        return (artifact,)
    return ()
