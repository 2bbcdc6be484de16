"""Two stream managers (replicas) sharing one Redis: takeover, fencing, stop and delete across them."""

import dataclasses
import os
import time

import pytest

from flashcache_sglang.streaming.budget import BudgetSettings
from flashcache_sglang.streaming.lease import LeaseSettings
from flashcache_sglang.streaming.memory import InProcessMemoryBackend, UnknownMemoryError
from flashcache_sglang.streaming.service import StreamConfig, StreamManager
from flashcache_sglang.streaming.sources import SamplingSettings
from flashcache_sglang.streaming.store import RedisStore

SMALL = StreamConfig(sampling=SamplingSettings(fps=4.0, max_pixels=112 * 112), budget=BudgetSettings(kv_cap_tokens=60))


class SlowBackend(InProcessMemoryBackend):
    """Ingests at a known pace; writes a small file per chunk under chunk_dir when given one."""

    def __init__(self, delay_s=0.15, chunk_dir=None):
        super().__init__()
        self.delay_s = delay_s
        self.chunk_dir = chunk_dir

    def append_chunk(self, stream_id, chunk):
        time.sleep(self.delay_s)
        receipt = super().append_chunk(stream_id, chunk)
        if self.chunk_dir is None:
            return receipt
        folder = os.path.join(self.chunk_dir, stream_id, f"chunk_{chunk.index:08d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "part_000.mp4"), "wb") as handle:
            handle.write(b"\0" * 100)
        return dataclasses.replace(receipt, artifact=folder)


def replica(redis_url, namespace, name, backend=None, ttl_s=1.0):
    return StreamManager(RedisStore(redis_url, namespace=namespace), backend or InProcessMemoryBackend(),
                         leases=LeaseSettings(ttl_s=ttl_s), replica_id=name)


def wait_chunks(manager, stream_id, count, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while manager.progress(stream_id).chunks < count:
        assert time.monotonic() < deadline and manager.is_running(stream_id), manager.progress(stream_id)
        time.sleep(0.02)


def assert_contiguous(chunks, count):
    assert [c.index for c in chunks] == list(range(count)), "no gap, no duplicate"
    assert all(c.end_s < n.start_s for c, n in zip(chunks, chunks[1:])), "each chunk starts after the previous one"


def test_a_paused_owner_is_fenced_out(videos, redis_url, namespace):
    a = replica(redis_url, namespace, "replica-a", SlowBackend())
    b = replica(redis_url, namespace, "replica-b")
    stream_id, token = a.start_stream(str(videos["long"]), SMALL)
    wait_chunks(a, stream_id, 3)
    a.leases.stop()  # replica-a stops renewing (a long pause, a partition) but keeps ingesting
    deadline = time.monotonic() + 5
    while not b.resume_all():
        assert time.monotonic() < deadline, "the expired lease was not taken over"
        time.sleep(0.05)
    assert b.owner(stream_id) == "replica-b"
    assert b.wait(stream_id, 60) and a.wait(stream_id, 10)
    lost = a._runtimes[stream_id].lease_lost
    assert "fence" in lost, f"replica-a should have been refused by the fence, got {lost!r}"
    assert a.progress(stream_id).chunks < 20
    with pytest.raises(UnknownMemoryError):  # its stale memory is dropped
        a.backend.memory_tokens(stream_id)
    record = b.store.get_stream(stream_id)
    assert record.status == "finished" and record.chunks_ingested == 20, record
    assert_contiguous(b.store.chunks(stream_id), 20)
    assert "Memory of 20 chunks" in b.ask(stream_id, token, "all there?").text
    assert "Memory of 20 chunks" in a.ask(stream_id, token, "and from the old owner?").text  # rebuilt from records
    a.shutdown()
    b.shutdown()


def test_stop_and_delete_from_another_replica(videos, redis_url, namespace, tmp_path):
    a = replica(redis_url, namespace, "replica-a", SlowBackend(chunk_dir=str(tmp_path / "a")), ttl_s=1.5)
    b = replica(redis_url, namespace, "replica-b")
    stopped, stopped_token = a.start_stream(str(videos["long"]), SMALL)
    deleted, deleted_token = a.start_stream(str(videos["long"]), SMALL)
    wait_chunks(a, stopped, 2)
    wait_chunks(a, deleted, 2)
    assert (tmp_path / "a" / deleted).is_dir()
    started = time.monotonic()
    b.stop_stream(stopped, stopped_token)
    b.delete_stream(deleted, deleted_token)
    assert a.wait(stopped, 5) and a.wait(deleted, 5)
    assert time.monotonic() - started < 1.5 + 1.0, "the owner noticed within about one renewal period"
    time.sleep(0.3)
    assert a.store.get_stream(stopped).status == "stopped", "the old owner must not overwrite the stop"
    assert a.store.get_stream(deleted) is None
    assert not (tmp_path / "a" / deleted).exists(), "the owner deletes its chunk files of a deleted stream"
    assert (tmp_path / "a" / stopped).is_dir(), "a stopped stream keeps its chunk files"
    assert b.resume_all() == [] and a.resume_all() == []
    a.shutdown()
    b.shutdown()


def test_shutdown_hands_streams_over_at_once(videos, redis_url, namespace):
    a = replica(redis_url, namespace, "replica-a", SlowBackend(), ttl_s=30)  # expiry alone would take 30 s
    stream_id, token = a.start_stream(str(videos["long"]), SMALL)
    wait_chunks(a, stream_id, 2)
    a.shutdown()
    b = replica(redis_url, namespace, "replica-b", ttl_s=30)
    assert b.resume_all() == [stream_id] and b.wait(stream_id, 60)
    assert_contiguous(b.store.chunks(stream_id), 20)
    b.shutdown()


def test_a_lease_not_renewed_within_its_ttl_counts_as_lost():
    """Redis unreachable: this replica must assume another one owns the stream after one TTL."""
    from flashcache_sglang.streaming.lease import LeaseKeeper
    from flashcache_sglang.streaming.store import InMemoryStore, StoreUnavailable, StreamRecord

    class FlakyStore(InMemoryStore):
        down = False

        def renew_leases(self, leases, ttl_s):
            if self.down:
                raise StoreUnavailable("redis down (test)")
            return super().renew_leases(leases, ttl_s)

    now = [100.0]
    store = FlakyStore(clock=lambda: now[0])
    store.create_stream(StreamRecord("st_a", "rtsp://cam/x", "h", status="running"))
    lost = []
    keeper = LeaseKeeper(store, "replica-a", LeaseSettings(ttl_s=5.0), on_lost=lambda lease, why: lost.append(why),
                         clock=lambda: now[0])
    keeper._ensure_thread = lambda: None  # driven by hand below
    lease = keeper.acquire("st_a")
    now[0] += 3.0
    keeper.renew_now()  # renewed: valid until 108
    store.down = True
    now[0] += 4.9
    keeper.renew_now()
    assert lost == [] and keeper.held() == [lease]
    now[0] += 0.2
    keeper.renew_now()
    assert lost == ["not renewed within its TTL (store unreachable)"] and keeper.held() == []
