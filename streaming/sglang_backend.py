"""A stream's memory inside an SGLang server (native ``/generate`` API over HTTP).

The memory of a stream is a prompt prefix::

    <system> <user> <video chunk 0> <video chunk 1> ... <video chunk k>

- **Ingest** of chunk k+1 is one request over ``prefix + chunk k+1`` with ``max_new_tokens=1``:
  the radix cache matches the (already compressed) prefix, SGLang prefills only the new
  chunk, FlashCache compresses its visual tokens with the retention the rolling budget chose
  (``sampling_params["custom_params"]["flashcache"]``) and the compressed prefix is cached.
- **Asking** sends ``prefix + earlier turns + question``: the prefix is matched in the radix
  cache, only the question is computed, and nothing after the prefix is ever part of the
  memory (each question is a branch of the tree).

Chunks travel as small mp4 files (SGLang's Qwen-VL processor decodes ``video_data`` with
decord/torchcodec and samples ``fps`` from the server's ``--mm-process-config``). They are
kept under ``chunk_dir`` because every request resends the whole prefix (the radix key carries
a hash of each video's content, so the exact same bytes must come back) and because a
restarted service rebuilds the prefix from them. ``video_transport="path"`` sends file paths
(server on the same file system), ``"data_url"`` sends base64 (any server).

An endless stream's prompt cannot grow forever (context length, tokenizer work per request),
so the prompt holds at most ``max_prompt_chunks`` chunks: chunks the budget evicted leave it
first, then the oldest non-sink chunks. Leaving changes the prefix, so the next request
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

from .budget import BudgetSettings, MemoryEntry, RollingBudget
from .memory import MemoryBackendError, UnknownMemoryError
from .types import Answer, Chunk, ChunkReceipt, ChunkRecord, MemoryUsage, Turn

__all__ = ["PromptTemplate", "SGLangMemoryBackend", "encode_chunk_mp4"]

logger = logging.getLogger(__name__)


def encode_chunk_mp4(chunk: Chunk, fps: float) -> bytes:
    """The chunk's frames as an H.264 mp4 (``fps`` frames per second, yuv420p)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = chunk.width, chunk.height
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "18"}
        for frame in chunk.frames:
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


@dataclass
class _PromptChunk:
    index: int
    path: str


@dataclass
class _SGLangStream:
    budget: RollingBudget
    prompt_chunks: list[_PromptChunk] = field(default_factory=list)
    prefix_tokens: int = 0  # prompt tokens of the memory prefix as the server counted them
    server_kept_tokens: Optional[int] = None
    chunks_seen: int = 0
    rebases: int = 0
    append_lock: threading.Lock = field(default_factory=threading.Lock)
    state_lock: threading.Lock = field(default_factory=threading.Lock)


class SGLangMemoryBackend:
    """Stream memories in an SGLang server.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:30000``.
        chunk_dir: where chunk videos are kept (one folder per stream).
        fps: frame rate written into chunk videos (the sampling fps).
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
        template: PromptTemplate = PromptTemplate(),
        video_transport: str = "data_url",
        max_prompt_chunks: int = 64,
        max_answer_tokens: int = 64,
        timeout_s: float = 120.0,
        session: Optional[requests.Session] = None,
    ):
        if video_transport not in ("path", "data_url"):
            raise ValueError(f"video_transport={video_transport!r}; valid: ['path', 'data_url']")
        if max_prompt_chunks < 2:
            raise ValueError(f"max_prompt_chunks={max_prompt_chunks} must be >= 2")
        self.base_url = base_url.rstrip("/")
        self.chunk_dir = chunk_dir
        self.fps = fps
        self.template = template
        self.video_transport = video_transport
        self.max_prompt_chunks = max_prompt_chunks
        self.max_answer_tokens = max_answer_tokens
        self.timeout_s = timeout_s
        self._http = session or requests.Session()
        self._streams: dict[str, _SGLangStream] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- protocol

    def open(self, stream_id: str, budget: BudgetSettings, restore: Sequence[ChunkRecord] = ()) -> None:
        state = _SGLangStream(RollingBudget(budget))
        for record in restore:
            state.budget.total_logical_tokens += record.logical_tokens
            state.chunks_seen += 1
            if record.artifact and os.path.isfile(record.artifact):
                state.budget.entries.append(
                    MemoryEntry(record.index, record.logical_tokens, record.kept_tokens, record.outlier_energy)
                )
                state.prompt_chunks.append(_PromptChunk(record.index, record.artifact))
            else:
                logger.warning("stream %s: chunk %d has no video file left; it leaves the memory", stream_id, record.index)
        if restore:
            state.budget.mean_energy = sum(r.outlier_energy for r in restore) / len(restore)
        self._trim_prompt(state)
        with self._lock:
            self._streams[stream_id] = state

    def append_chunk(self, stream_id: str, chunk: Chunk) -> ChunkReceipt:
        state = self._state(stream_id)
        with state.append_lock:  # one ingest request per stream at a time
            path = self._write_chunk(stream_id, chunk)
            with state.state_lock:
                retention = state.budget.retention_for(chunk.outlier_energy)
                videos = [c.path for c in state.prompt_chunks] + [path]
                settings = state.budget.settings
            response = self._generate(
                self.template.memory_prompt(len(videos)),
                videos,
                {
                    "max_new_tokens": 1,
                    "temperature": 0.0,
                    "custom_params": {
                        "flashcache": {
                            "retention": retention,
                            "memory_cap_tokens": settings.kv_cap_tokens,
                            "keep_sink": settings.keep_sink,
                        }
                    },
                },
            )
            meta = response.get("meta_info", {})
            prompt_tokens = int(meta.get("prompt_tokens", 0))
            flashcache = meta.get("flashcache") or {}
            with state.state_lock:
                if state.prefix_tokens:
                    logical = max(1, prompt_tokens - state.prefix_tokens)
                elif state.budget.entries:  # right after a rebase: same geometry as the last chunk
                    logical = state.budget.entries[-1].logical_tokens
                else:  # header + first chunk; the header is a few text tokens
                    logical = max(1, prompt_tokens)
                kept = int(flashcache.get("kept_tokens", round(logical * retention)))
                plan = state.budget.admit(chunk.index, logical, kept, chunk.outlier_energy)
                state.prompt_chunks.append(_PromptChunk(chunk.index, path))
                state.prefix_tokens = prompt_tokens
                if "memory_kept_tokens" in flashcache:
                    state.server_kept_tokens = int(flashcache["memory_kept_tokens"])
                state.chunks_seen += 1
                self._trim_prompt(state)
                usage = self._usage(state)
        return ChunkReceipt(logical, plan.incoming_kept, retention, usage, artifact=path)

    def ask(self, stream_id: str, question: str, history: Sequence[Turn]) -> Answer:
        state = self._state(stream_id)
        with state.state_lock:  # snapshot only: the request runs beside ingest
            videos = [c.path for c in state.prompt_chunks]
            chunks_seen = state.chunks_seen
        if not videos:
            return Answer("The stream has no video in memory yet.", 0.0, 0, 0, self.name)
        prompt = self.template.memory_prompt(len(videos)) + self.template.question_suffix(history, question)
        started = time.perf_counter()
        text, meta, ttft = self._generate_streaming(
            prompt, videos, {"max_new_tokens": self.max_answer_tokens, "temperature": 0.0}, started
        )
        return Answer(
            text=text.strip(),
            ttft_s=ttft,
            cached_tokens=int(meta.get("cached_tokens", 0)),
            memory_chunks=chunks_seen,
            backend=self.name,
            extra={"prompt_tokens": int(meta.get("prompt_tokens", 0)), "e2e_s": time.perf_counter() - started},
        )

    def memory_tokens(self, stream_id: str) -> MemoryUsage:
        state = self._state(stream_id)
        with state.state_lock:
            return self._usage(state)

    def release(self, stream_id: str) -> None:
        with self._lock:
            self._streams.pop(stream_id, None)

    # ----------------------------------------------------------------- helpers

    def _state(self, stream_id: str) -> _SGLangStream:
        with self._lock:
            state = self._streams.get(stream_id)
        if state is None:
            raise UnknownMemoryError(f"no memory for stream {stream_id!r}")
        return state

    def _usage(self, state: _SGLangStream) -> MemoryUsage:
        kept = state.server_kept_tokens if state.server_kept_tokens is not None else state.budget.kept_tokens
        return MemoryUsage(state.budget.logical_tokens, kept, state.budget.settings.kv_cap_tokens, state.chunks_seen)

    def _trim_prompt(self, state: _SGLangStream) -> None:
        """Rebase the prompt once it holds more than ``max_prompt_chunks`` chunks.

        Evicted chunks stay in the prompt until then (their tokens are gone from the KV, but
        removing them changes the prefix and costs a prefill), after which the prompt keeps
        the sink and the newest surviving chunks, down to half the limit so rebases are rare.
        """
        if len(state.prompt_chunks) <= self.max_prompt_chunks:
            return
        alive = {entry.index for entry in state.budget.entries}
        sink = state.prompt_chunks[0] if state.budget.settings.keep_sink else None
        rest = [c for c in state.prompt_chunks if c is not sink and c.index in alive]
        room = self.max_prompt_chunks // 2 - (1 if sink is not None else 0)
        tail = rest[-room:] if room > 0 else []
        state.prompt_chunks = ([sink] if sink is not None else []) + tail
        state.rebases += 1
        state.prefix_tokens = 0  # unknown until the server counts the rebased prefix

    def _write_chunk(self, stream_id: str, chunk: Chunk) -> str:
        folder = os.path.join(self.chunk_dir, stream_id)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"chunk_{chunk.index:08d}.mp4")
        data = encode_chunk_mp4(chunk, self.fps)
        temporary = path + ".tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
        return path

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
