"""Streaming video memory: compressed, reusable KV memories of endless video streams.

Installed as ``flashcache_sglang.streaming`` (a top-level ``streaming`` is MosaicML's package).
Layers, each behind a small protocol injected at construction:

- sources (sources.py): decord for files, PyAV for rtsp/http/file URLs; sampled at a target fps,
  resized, timestamped; live sources reconnect with backoff.
- chunking and budgets (chunker.py, energy.py, budget.py): frames -> numbered chunks; each
  chunk's retention follows its outlier energy; older memory shrinks at the per-stream cap.
- memory (memory.py, sglang_backend.py): the MemoryBackend protocol; an in-process backend
  (accounting only, labelled summary answers) and SGLangMemoryBackend (a growing prompt
  prefix in an SGLang server's radix cache, compressed by FlashCache).
- metadata (store.py): MetadataStore, embedded or Redis, namespaced per deployment.
- service (service.py, backpressure.py, api.py, cli.py): ingest threads with bounded queues,
  questions, resume after restarts, the HTTP API and ``flashcache-stream``.
- demo (demo.py): ``python -m flashcache_sglang.streaming.demo`` (scripts/demo.sh), a stream's
  memory in SGLang end to end, with a plot of KV memory over stream time.
"""

from .budget import BudgetSettings, RollingBudget
from .chunker import ChunkSettings
from .memory import InProcessMemoryBackend, MemoryBackend
from .service import StreamConfig, StreamManager
from .sources import BackoffSettings, SamplingSettings
from .store import InMemoryStore, MetadataStore, RedisStore, open_store

__all__ = [
    "BackoffSettings",
    "BudgetSettings",
    "ChunkSettings",
    "InMemoryStore",
    "InProcessMemoryBackend",
    "MemoryBackend",
    "MetadataStore",
    "RedisStore",
    "RollingBudget",
    "SamplingSettings",
    "StreamConfig",
    "StreamManager",
    "open_store",
]
