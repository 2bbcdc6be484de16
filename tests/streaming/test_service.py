"""The stream manager with the in-process backend: files, budgets, questions, faults, resume."""

import time

import pytest

from flashcache_sglang.streaming.budget import BudgetSettings
from flashcache_sglang.streaming.memory import IN_PROCESS_LABEL, InProcessMemoryBackend
from flashcache_sglang.streaming.service import AccessDenied, StreamConfig, StreamManager
from flashcache_sglang.streaming.sources import BadSourceError, SamplingSettings
from flashcache_sglang.streaming.store import InMemoryStore, RedisStore, StoreUnavailable, UnknownStreamError

SMALL = StreamConfig(sampling=SamplingSettings(fps=4.0, max_pixels=112 * 112), budget=BudgetSettings(kv_cap_tokens=60))


def manager(store=None):
    return StreamManager(store or InMemoryStore(), InProcessMemoryBackend())


def test_file_is_ingested_under_the_cap(videos):
    m = manager()
    stream_id, token = m.start_stream(str(videos["long"]), SMALL)
    assert m.wait(stream_id, 60)
    record = m.store.get_stream(stream_id)
    assert record.status == "finished", record.error
    chunks = m.store.chunks(stream_id)
    assert [c.index for c in chunks] == list(range(20))  # 20 s * 4 fps / 4 frames
    assert record.logical_tokens > 3 * record.cap_tokens
    assert record.kept_tokens <= record.cap_tokens == 60
    assert chunks[1].start_s == pytest.approx(1.0)


def test_questions_mid_stream_do_not_block_and_keep_history(videos):
    class SlowBackend(InProcessMemoryBackend):
        def append_chunk(self, stream_id, chunk):
            time.sleep(0.05)
            return super().append_chunk(stream_id, chunk)

    m = StreamManager(InMemoryStore(), SlowBackend())
    stream_id, token = m.start_stream(str(videos["long"]), SMALL)
    while m.progress(stream_id).chunks < 3:
        time.sleep(0.02)
    started = time.perf_counter()
    first = m.ask(stream_id, token, "what moved?", conversation_id="alice")
    assert time.perf_counter() - started < 0.5
    assert first.text.startswith(IN_PROCESS_LABEL) and "Question 1" in first.text
    second = m.ask(stream_id, token, "and then?", conversation_id="alice")
    assert "Question 2" in second.text
    assert "Question 1" in m.ask(stream_id, token, "hi", conversation_id="bob").text
    assert m.wait(stream_id, 60)
    assert [t.question for t in m.store.turns(stream_id, "alice")] == ["what moved?", "and then?"]
    # Questions never enter the memory: its chunk count is the ingested chunks only.
    assert m.backend.memory_tokens(stream_id).num_chunks == 20


def test_bad_input_errors(videos):
    m = manager()
    with pytest.raises(BadSourceError):
        m.start_stream("/no/such.mp4")
    with pytest.raises(BadSourceError):
        m.start_stream("gopher://x/y")
    good, good_token = m.start_stream(str(videos["short"]), SMALL)
    bad, bad_token = m.start_stream(str(videos["corrupt"]), SMALL)
    assert m.wait(bad, 30) and m.wait(good, 60)
    assert m.store.get_stream(bad).status == "failed"
    assert "cannot decode video file" in m.store.get_stream(bad).error
    assert m.store.get_stream(good).status == "finished"
    with pytest.raises(AccessDenied):
        m.ask(good, bad_token, "q")
    with pytest.raises(AccessDenied):
        m.ask(good, None, "q")
    with pytest.raises(UnknownStreamError):
        m.ask("st_unknown", good_token, "q")


def test_stream_ids_and_tokens_are_unguessable(videos):
    m = manager()
    ids = [m.start_stream(str(videos["short"]), SMALL) for _ in range(3)]
    assert len({i for i, _ in ids}) == 3 and all(len(i) >= 20 and len(t) >= 40 for i, t in ids)
    for stream_id, _ in ids:
        m.wait(stream_id, 60)


def test_service_restart_resumes_file_from_next_chunk(videos, redis_url, namespace):
    slow = StreamConfig(sampling=SamplingSettings(fps=4.0, max_pixels=112 * 112), budget=BudgetSettings(kv_cap_tokens=60))

    class SlowBackend(InProcessMemoryBackend):
        def append_chunk(self, stream_id, chunk):
            time.sleep(0.1)
            return super().append_chunk(stream_id, chunk)

    first = StreamManager(RedisStore(redis_url, namespace=namespace), SlowBackend())
    stream_id, token = first.start_stream(str(videos["long"]), slow)
    while first.progress(stream_id).chunks < 5:
        time.sleep(0.02)
    first.shutdown()  # the service process goes away mid-stream
    done = first.store.get_stream(stream_id).last_chunk_index
    assert first.store.get_stream(stream_id).status == "running"

    second = StreamManager(RedisStore(redis_url, namespace=namespace), InProcessMemoryBackend())
    assert second.resume_all() == [stream_id]
    assert second.wait(stream_id, 60)
    record = second.store.get_stream(stream_id)
    assert record.status == "finished", record.error
    chunks = second.store.chunks(stream_id)
    assert [c.index for c in chunks] == list(range(20)), "no gap, no duplicate"
    gap = chunks[done + 1].start_s - chunks[done].end_s
    assert 0.0 < gap <= 0.25 + 0.1, "the next chunk starts at the next sample"
    answer = second.ask(stream_id, token, "summary?")
    assert "Memory of 20 chunks" in answer.text


def test_store_outage_during_ingest_keeps_the_stream_running(videos):
    class FlakyStore(InMemoryStore):
        down = False

        def add_chunk(self, stream_id, record, fence):
            if self.down:
                raise StoreUnavailable("redis down (test)")
            return super().add_chunk(stream_id, record, fence)

    store = FlakyStore()
    m = StreamManager(store, InProcessMemoryBackend())
    stream_id, _ = m.start_stream(str(videos["long"]), SMALL)
    while m.progress(stream_id).chunks < 2:
        time.sleep(0.01)
    store.down = True
    while m.progress(stream_id).chunks < 8 and m.is_running(stream_id):
        time.sleep(0.01)
    store.down = False
    assert m.wait(stream_id, 60)
    assert m.progress(stream_id).store_errors > 0
    assert [c.index for c in store.chunks(stream_id)] == list(range(20))
    assert store.get_stream(stream_id).status == "finished"


def test_stop_and_delete(videos):
    m = manager()
    stream_id, token = m.start_stream(str(videos["long"]), StreamConfig(sampling=SamplingSettings(fps=10.0)))
    while m.progress(stream_id).chunks < 2:
        time.sleep(0.01)
    with pytest.raises(AccessDenied):
        m.stop_stream(stream_id, "wrong")
    m.stop_stream(stream_id, token)
    assert m.store.get_stream(stream_id).status == "stopped"
    assert "Memory of" in m.ask(stream_id, token, "after stop?").text  # rebuilt from records
    m.delete_stream(stream_id, token)
    with pytest.raises(UnknownStreamError):
        m.ask(stream_id, token, "gone?")
