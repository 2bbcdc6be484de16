"""Chunk files: rotated once the memory no longer needs them, bounded per stream, deleted with it."""

import dataclasses
import os

from flashcache_sglang.streaming.artifacts import ArtifactKeeper
from flashcache_sglang.streaming.budget import BudgetSettings
from flashcache_sglang.streaming.limits import Limits
from flashcache_sglang.streaming.memory import InProcessMemoryBackend
from flashcache_sglang.streaming.service import StreamConfig, StreamManager
from flashcache_sglang.streaming.sources import SamplingSettings
from flashcache_sglang.streaming.store import InMemoryStore
from flashcache_sglang.streaming.types import ChunkRecord

SMALL = StreamConfig(sampling=SamplingSettings(fps=4.0, max_pixels=112 * 112), budget=BudgetSettings(kv_cap_tokens=60))
CHUNK_BYTES = 1000


class FileBackend(InProcessMemoryBackend):
    """Writes one file per chunk (as SGLangMemoryBackend does) and needs only the last
    ``keep_last`` chunks' files (None: all of them, the protocol's default)."""

    def __init__(self, chunk_dir, keep_last=None):
        super().__init__()
        self.chunk_dir = chunk_dir
        self.keep_last = keep_last
        self.seen = {}

    def append_chunk(self, stream_id, chunk):
        receipt = super().append_chunk(stream_id, chunk)
        folder = os.path.join(self.chunk_dir, stream_id, f"chunk_{chunk.index:08d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "part_000.mp4"), "wb") as handle:
            handle.write(b"\0" * CHUNK_BYTES)
        self.seen[stream_id] = chunk.index
        return dataclasses.replace(receipt, artifact=folder)

    def needed_artifacts(self, stream_id):
        if self.keep_last is None:
            return None
        last = self.seen.get(stream_id, -1)
        return set(range(max(0, last - self.keep_last + 1), last + 1))


def folders(root, stream_id):
    path = os.path.join(root, stream_id)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def test_unneeded_files_are_deleted_and_the_rest_go_with_the_stream(videos, tmp_path):
    manager = StreamManager(InMemoryStore(), FileBackend(str(tmp_path), keep_last=3))
    stream_id, token = manager.start_stream(str(videos["long"]), SMALL)
    assert manager.wait(stream_id, 60)
    assert folders(tmp_path, stream_id) == [f"chunk_{i:08d}" for i in (17, 18, 19)]
    record = manager.store.get_stream(stream_id)
    assert record.status == "finished" and record.artifact_bytes == 3 * CHUNK_BYTES and record.warning == ""
    manager.delete_stream(stream_id, token)
    assert not (tmp_path / stream_id).exists()


def test_needed_files_above_the_limit_are_kept_and_reported(videos, tmp_path):
    manager = StreamManager(InMemoryStore(), FileBackend(str(tmp_path)), limits=Limits(max_stream_disk_bytes=5 * CHUNK_BYTES))
    stream_id, token = manager.start_stream(str(videos["long"]), SMALL)
    assert manager.wait(stream_id, 60)
    assert len(folders(tmp_path, stream_id)) == 20
    record = manager.store.get_stream(stream_id)
    assert record.artifact_bytes == 20 * CHUNK_BYTES
    assert "above the per-stream disk limit of 5000 bytes" in record.warning and "still needs 20" in record.warning
    manager.delete_stream(stream_id, token)
    assert not (tmp_path / stream_id).exists()


def record(index, artifact):
    return ChunkRecord(index, index, index + 0.5, 4, 10, 5, 0.5, 0.1, 0.0, artifact=artifact)


def test_nothing_outside_the_chunk_folder_is_deleted(tmp_path):
    chunk_dir, outside = tmp_path / "chunks", tmp_path / "precious"
    (chunk_dir / "st_x").mkdir(parents=True)
    outside.mkdir()
    (outside / "keep.mp4").write_bytes(b"1" * 10)
    inside = chunk_dir / "st_x" / "chunk_00000001"
    inside.mkdir()
    (inside / "part.mp4").write_bytes(b"2" * 10)
    (chunk_dir / "st_x" / "chunk_00000002").symlink_to(outside)  # a link out of the chunk folder
    keeper = ArtifactKeeper(str(chunk_dir))
    keeper.track("st_x", [record(0, str(outside)), record(1, str(inside)), record(2, str(chunk_dir / "st_x" / "chunk_00000002"))])
    report = keeper.rotate("st_x", needed=set())
    assert report.deleted == (1,) and (outside / "keep.mp4").exists() and not inside.exists()
    keeper.delete_stream("../precious")  # not a stream id
    keeper.delete_stream("st_x", [record(0, str(outside))])
    assert (outside / "keep.mp4").exists() and not (chunk_dir / "st_x").exists()
    assert ArtifactKeeper(None).rotate("st_y", needed=set()).deleted == ()  # no chunk folder: never deletes
