"""The resend baseline: a stream memory kept by the *client*, resent with every request.

This is what the product did before the server held stream memories (issue 13), kept here
only as the soak's baseline against vanilla SGLang (``sglang.launch_server``, no flashcache):

- the memory of a stream is a prompt ``<header> <chunk 0 videos> <chunk 1 videos> ... <chunk k>``;
- an **ingest** sends that whole prompt plus the new chunk with ``max_new_tokens=1``; SGLang's
  radix cache matches the cached prefix, but its tokenizer re-opens, decodes and processes every
  video of the prompt first (benchmarks/results/video_overhead_cpu.json measures that cost);
- a **question** sends the whole prompt plus the conversation and the question;
- the **horizon**: the prompt holds at most ``max_prompt_chunks`` chunks; past that it keeps the
  sink (first chunk) and the newest chunks, down to half the limit (a "rebase": the next request
  prefills the remaining window again). Same semantics as the old product backend, so old soak
  numbers stay comparable.

Vanilla SGLang compresses nothing, so the KV a stream's memory holds is every token of its
prompt (``meta_info.prompt_tokens`` of the latest ingest), and anything older than the horizon
is forgotten. It implements streaming.memory.MemoryBackend, so the product's StreamManager
drives it exactly as it drives SGLangMemoryBackend.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import requests

from flashcache_sglang.streaming.budget import BudgetSettings
from flashcache_sglang.streaming.memory import MemoryBackendError, UnknownMemoryError
from flashcache_sglang.streaming.sglang_backend import FRAME_FACTOR, PromptTemplate, VideoChunkClient, artifact_videos
from flashcache_sglang.streaming.types import Answer, Chunk, ChunkReceipt, ChunkRecord, MemoryUsage, Turn

__all__ = ["ResendBaselineBackend"]


@dataclass
class _PromptChunk:
    index: int
    paths: tuple[str, ...]  # its videos, in order


@dataclass
class _ResendStream:
    settings: BudgetSettings
    prompt_chunks: list[_PromptChunk] = field(default_factory=list)  # the window, sink first
    left_window: set[int] = field(default_factory=set)  # chunks the latest rebase dropped (files kept)
    prefix_tokens: int = 0  # prompt tokens of the window as the server counted them (0: unknown)
    held_tokens: int = 0  # prompt tokens of the latest ingest: what the window's KV holds (kept across a rebase)
    last_chunk_logical: int = 0
    logical_tokens: int = 0  # every token the stream ever appended, header included
    chunks_seen: int = 0
    rebases: int = 0
    last_report: dict = field(default_factory=dict)
    append_lock: threading.Lock = field(default_factory=threading.Lock)
    state_lock: threading.Lock = field(default_factory=threading.Lock)


class ResendBaselineBackend(VideoChunkClient):
    """Client-held stream memories resent to vanilla SGLang with every request.

    Args:
        base_url: a vanilla SGLang server started with ``--enable-multimodal``.
        chunk_dir: where chunk videos are written (one folder per chunk).
        fps: frame rate written into chunk videos (the sampling fps).
        frames_per_video: frames per video (even, >= 2; SGLang 0.5.23 gives each video of a
            multi-video prompt its own radix-cache identity only for one temporal patch, 2).
        template: prompt pieces of the served model.
        video_transport: ``"path"`` (server on this file system) or ``"data_url"`` (base64).
        max_prompt_chunks: the horizon, >= 2 (see the module docstring).
        max_answer_tokens: answer length.
        timeout_s: per request.
        session: HTTP session (benchmarks pass a recording one).
    """

    name = "resend-baseline"

    def __init__(self, base_url: str, chunk_dir: str, fps: float = 2.0, frames_per_video: int = FRAME_FACTOR,
                 template: PromptTemplate = PromptTemplate(), video_transport: str = "path",
                 max_prompt_chunks: int = 32, max_answer_tokens: int = 64, timeout_s: float = 120.0,
                 session: Optional[requests.Session] = None):
        if frames_per_video is None:
            raise ValueError("frames_per_video=None: the baseline needs whole videos of an even frame count")
        super().__init__(base_url, chunk_dir, fps, frames_per_video, video_transport, timeout_s, session)
        if not isinstance(max_prompt_chunks, int) or max_prompt_chunks < 2:
            raise ValueError(f"max_prompt_chunks={max_prompt_chunks!r} must be an int >= 2")
        self.template = template
        self.max_prompt_chunks = max_prompt_chunks
        self.max_answer_tokens = max_answer_tokens
        self._streams: dict[str, _ResendStream] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- MemoryBackend protocol

    def open(self, stream_id: str, budget: BudgetSettings, restore: Sequence[ChunkRecord] = ()) -> None:
        state = _ResendStream(budget)
        for record in restore:
            state.logical_tokens += record.logical_tokens
            state.last_chunk_logical = record.logical_tokens
            state.chunks_seen += 1
            paths = artifact_videos(record.artifact)
            if paths:
                state.prompt_chunks.append(_PromptChunk(record.index, paths))
        self._trim_prompt(state)
        with self._lock:
            self._streams[stream_id] = state

    def append_chunk(self, stream_id: str, chunk: Chunk) -> ChunkReceipt:
        state = self._state(stream_id)
        with state.append_lock:  # one ingest request per stream at a time
            folder, paths = self._write_chunk(stream_id, chunk)
            with state.state_lock:
                videos = [p for c in state.prompt_chunks for p in c.paths] + list(paths)
                rebased = state.prefix_tokens == 0 and bool(state.prompt_chunks)
            body = {"text": self._memory_prompt(len(videos)), "video_data": self._video_payload(videos),
                    "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
            meta = self._generate(body).get("meta_info", {})
            if not isinstance(meta.get("prompt_tokens"), int):
                raise MemoryBackendError(f"SGLang answered an ingest without meta_info.prompt_tokens: {str(meta)[:300]}")
            prompt_tokens = meta["prompt_tokens"]
            with state.state_lock:
                if state.prefix_tokens:
                    logical = prompt_tokens - state.prefix_tokens
                elif rebased:  # the window was re-prefilled: same geometry as the last chunk
                    logical = state.last_chunk_logical
                else:  # header + first chunk
                    logical = prompt_tokens
                logical = max(1, logical)
                state.prompt_chunks.append(_PromptChunk(chunk.index, paths))
                state.prefix_tokens = state.held_tokens = prompt_tokens
                state.last_chunk_logical = logical
                state.logical_tokens += logical
                state.chunks_seen += 1
                state.last_report = {"prompt_tokens": prompt_tokens, "cached_tokens": int(meta.get("cached_tokens") or 0),
                                     "window_chunks": len(state.prompt_chunks), "rebases": state.rebases,
                                     "chunks_appended": state.chunks_seen}
                self._trim_prompt(state)
                usage = self._usage(state)
        # Vanilla keeps every token of the chunk.
        return ChunkReceipt(logical, logical, 1.0, usage, artifact=folder)

    def ask(self, stream_id: str, question: str, history: Sequence[Turn]) -> Answer:
        state = self._state(stream_id)
        with state.state_lock:  # a snapshot: the question runs beside ingest
            videos = [p for c in state.prompt_chunks for p in c.paths]
            chunks_seen = state.chunks_seen
        if not videos:
            return Answer("The stream has no video in memory yet.", 0.0, 0, 0, self.name)
        prompt = self._memory_prompt(len(videos)) + self.template.question_suffix(history, question)
        body = {"text": prompt, "video_data": self._video_payload(videos)}
        started = time.perf_counter()
        text, meta, ttft = self._generate_streaming(
            body, {"max_new_tokens": self.max_answer_tokens, "temperature": 0.0}, started)
        extra = {"prompt_tokens": int(meta.get("prompt_tokens", 0)), "e2e_s": time.perf_counter() - started}
        return Answer(text=text.strip(), ttft_s=ttft, cached_tokens=int(meta.get("cached_tokens", 0)),
                      memory_chunks=chunks_seen, backend=self.name, extra=extra)

    def memory_tokens(self, stream_id: str) -> MemoryUsage:
        state = self._state(stream_id)
        with state.state_lock:
            return self._usage(state)

    def release(self, stream_id: str) -> None:
        with self._lock:
            self._streams.pop(stream_id, None)

    def needed_artifacts(self, stream_id: str) -> Optional[set[int]]:
        """The chunks of the prompt window and those the latest rebase dropped (the service
        deletes the other chunk files): a question that took its snapshot of the window just
        before the rebase still sends their files, so they must outlive it by one rebase."""
        state = self._state(stream_id)
        with state.state_lock:
            return {c.index for c in state.prompt_chunks} | state.left_window

    def last_report(self, stream_id: str) -> dict:
        """The latest ingest's numbers: prompt/cached tokens, window size, rebases so far."""
        state = self._state(stream_id)
        with state.state_lock:
            return dict(state.last_report)

    # ----------------------------------------------------------------- helpers

    def _state(self, stream_id: str) -> _ResendStream:
        with self._lock:
            state = self._streams.get(stream_id)
        if state is None:
            raise UnknownMemoryError(f"no memory for stream {stream_id!r}")
        return state

    def _usage(self, state: _ResendStream) -> MemoryUsage:
        # Vanilla holds every prompt token: KV slots = the latest ingest's prompt tokens (until the
        # next ingest after a rebase re-counts the shorter window); there is no cap.
        held = state.held_tokens
        return MemoryUsage(state.logical_tokens, held, state.settings.kv_cap_tokens, state.chunks_seen,
                           total_kv_slots=held)

    def _memory_prompt(self, num_videos: int) -> str:
        return self.template.header.format(system=self.template.system) + self.template.video * num_videos

    def _trim_prompt(self, state: _ResendStream) -> None:
        """Past ``max_prompt_chunks``: keep the sink and the newest chunks, down to half."""
        if len(state.prompt_chunks) <= self.max_prompt_chunks:
            return
        sink = state.prompt_chunks[0] if state.settings.keep_sink else None
        rest = state.prompt_chunks[1:] if sink is not None else state.prompt_chunks
        room = self.max_prompt_chunks // 2 - (1 if sink is not None else 0)
        tail = rest[-room:] if room > 0 else []
        kept = ([sink] if sink is not None else []) + tail
        state.left_window = {c.index for c in state.prompt_chunks} - {c.index for c in kept}
        state.prompt_chunks = kept
        state.rebases += 1
        state.prefix_tokens = 0  # unknown until the server counts the rebased window


