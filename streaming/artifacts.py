"""Chunk files on disk: accounting, rotation and deletion for the streams a replica owns.

A memory backend may keep files per chunk to rebuild a memory later (ChunkRecord.artifact,
e.g. SGLangMemoryBackend's ``chunk_dir/<stream id>/chunk_00000042/``). Without care an
endless stream fills the disk. The service (the lease holder only) therefore, after every
chunk record it writes:

1. asks the backend which chunks' files it still needs, through the optional method
   ``backend.needed_artifacts(stream_id) -> Optional[set[int]]`` (None or no such method:
   every file is needed);
2. deletes the files of chunks not needed, oldest first;
3. reports the stream's bytes on disk and, when the needed files alone exceed the
   per-stream limit, a warning in the stream's status; needed files are never deleted.

Deleting a stream deletes its folder ``chunk_dir/<stream id>``. Every path is resolved
(symlinks included) and must lie strictly inside ``chunk_dir`` before anything is deleted;
anything else is logged and left alone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

from .types import ChunkRecord

__all__ = ["ArtifactKeeper", "ArtifactReport", "path_size"]

logger = logging.getLogger(__name__)
_STREAM_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def path_size(path: str) -> int:
    """Bytes of a file, or of the files under a folder (symlinks not followed); 0 if missing."""
    if os.path.islink(path):
        return 0
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            if not os.path.islink(full):
                try:
                    total += os.path.getsize(full)
                except OSError:
                    pass  # deleted meanwhile
    return total


@dataclass(frozen=True)
class ArtifactReport:
    """One stream's chunk files after a rotation.

    Attributes:
        bytes_on_disk: bytes of the stream's chunk files still on disk.
        deleted: chunk indices whose files were deleted by this rotation (oldest first).
        warning: non-empty when the files the memory needs exceed the per-stream limit.
    """

    bytes_on_disk: int
    deleted: tuple[int, ...]
    warning: str


class ArtifactKeeper:
    """Tracks the chunk files of the streams this replica owns.

    Args:
        chunk_dir: the only folder deletions may touch; None disables deletion (sizes are
            still reported).
        max_stream_disk_bytes: per-stream limit for the warning (0: none).
    """

    def __init__(self, chunk_dir: Optional[str], max_stream_disk_bytes: int = 0):
        self.chunk_dir = os.path.realpath(chunk_dir) if chunk_dir else None
        self.max_stream_disk_bytes = max_stream_disk_bytes
        self._lock = threading.Lock()
        self._files: dict[str, dict[int, tuple[str, int]]] = {}  # stream -> index -> (path, bytes), in index order

    def inside(self, path: str) -> bool:
        """``path`` resolves to something strictly inside ``chunk_dir``."""
        if self.chunk_dir is None or not path:
            return False
        real = os.path.realpath(path)
        return real != self.chunk_dir and os.path.commonpath([self.chunk_dir, real]) == self.chunk_dir

    def track(self, stream_id: str, records: Sequence[ChunkRecord]) -> None:
        """Start tracking a stream from its stored chunk records (files already deleted are skipped)."""
        files = {}
        for record in sorted(records, key=lambda r: r.index):
            if record.artifact and os.path.exists(record.artifact):
                files[record.index] = (record.artifact, path_size(record.artifact))
        with self._lock:
            self._files[stream_id] = files

    def added(self, stream_id: str, record: ChunkRecord) -> None:
        if not record.artifact:
            return
        size = path_size(record.artifact)
        with self._lock:
            self._files.setdefault(stream_id, {})[record.index] = (record.artifact, size)

    def forget(self, stream_id: str) -> None:
        with self._lock:
            self._files.pop(stream_id, None)

    def rotate(self, stream_id: str, needed: Optional[set[int]]) -> ArtifactReport:
        """Delete the files of chunks not in ``needed`` (None: all needed); report the rest."""
        with self._lock:
            files = dict(self._files.get(stream_id, {}))
        deleted = []
        if needed is not None:
            for index in sorted(files):
                if index in needed:
                    continue
                path, _ = files[index]
                if self._delete(path, stream_id):
                    deleted.append(index)
                    del files[index]
        with self._lock:
            current = self._files.get(stream_id)
            if current is not None:
                for index in deleted:
                    current.pop(index, None)
        total = sum(size for _, size in files.values())
        warning = ""
        if self.max_stream_disk_bytes and total > self.max_stream_disk_bytes:
            warning = (f"chunk files take {total} bytes, above the per-stream disk limit of {self.max_stream_disk_bytes} "
                       f"bytes; kept because the memory still needs {len(files)} of them to rebuild")
        return ArtifactReport(bytes_on_disk=total, deleted=tuple(deleted), warning=warning)

    def delete_stream(self, stream_id: str, records: Sequence[ChunkRecord] = ()) -> None:
        """Delete the stream's folder and any of its chunk files elsewhere inside ``chunk_dir``."""
        self.forget(stream_id)
        if self.chunk_dir is None:
            return
        if not _STREAM_ID.match(stream_id):
            logger.error("not deleting chunk files of stream id %r: not a valid stream id", stream_id)
            return
        for record in records:
            if record.artifact and os.path.exists(record.artifact):
                self._delete(record.artifact, stream_id)
        folder = os.path.join(self.chunk_dir, stream_id)
        if os.path.lexists(folder):
            self._delete(folder, stream_id)

    def _delete(self, path: str, stream_id: str) -> bool:
        if not self.inside(path):
            logger.error("stream %s: not deleting %r: it does not lie inside the chunk folder %r",
                         stream_id, path, self.chunk_dir)
            return False
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as error:
            logger.error("stream %s: cannot delete %r: %s", stream_id, path, error)
            return False
