"""A live RTSP stream from GStreamer's server on 127.0.0.1, end to end, with faults."""

import subprocess
import sys
import time

from flashcache_sglang.streaming.budget import BudgetSettings
from flashcache_sglang.streaming.memory import IN_PROCESS_LABEL, InProcessMemoryBackend
from flashcache_sglang.streaming.service import StreamConfig, StreamManager
from flashcache_sglang.streaming.sources import BackoffSettings, SamplingSettings
from flashcache_sglang.streaming.store import RedisStore

LIVE = StreamConfig(
    sampling=SamplingSettings(fps=4.0, max_pixels=112 * 140),
    budget=BudgetSettings(kv_cap_tokens=60),
    backoff=BackoffSettings(initial_s=0.2, max_s=1.0, open_attempts=3),
)


def wait_for_chunks(manager, stream_id, count, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while manager.progress(stream_id).chunks < count:
        assert time.monotonic() < deadline, f"only {manager.progress(stream_id).chunks} chunks after {timeout_s} s"
        assert manager.is_running(stream_id), manager.progress(stream_id).error
        time.sleep(0.05)


def test_live_stream_end_to_end(rtsp_server, redis_url, namespace):
    manager = StreamManager(RedisStore(redis_url, namespace=namespace), InProcessMemoryBackend())
    stream_id, token = manager.start_stream(rtsp_server.url.replace("rtsp://", "rtsp://viewer:pw123@"), LIVE)
    try:
        wait_for_chunks(manager, stream_id, 3)
        answer = manager.ask(stream_id, token, "what is on screen?")
        assert answer.text.startswith(IN_PROCESS_LABEL) and answer.memory_chunks >= 3

        wait_for_chunks(manager, stream_id, 8)
        record = manager.store.get_stream(stream_id)
        assert record.status == "running" and record.is_live
        assert record.logical_tokens > record.cap_tokens, "the stream ran past the cap"
        assert record.kept_tokens <= record.cap_tokens
        assert "pw123" not in record.source and "viewer" not in record.source

        code = (
            "from flashcache_sglang.streaming.store import RedisStore;"
            f"s = RedisStore({redis_url!r}, namespace={namespace!r});"
            f"r = s.get_stream({stream_id!r}); print(r.status, r.chunks_ingested, len(s.chunks({stream_id!r})))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        status, ingested, stored = out.stdout.split()
        assert status == "running" and int(ingested) >= 8 and int(stored) >= 8, out.stderr
    finally:
        manager.stop_stream(stream_id, token)
    assert manager.store.get_stream(stream_id).status == "stopped"


def test_rtsp_server_restart_and_service_restart(rtsp_server, redis_url, namespace):
    manager = StreamManager(RedisStore(redis_url, namespace=namespace), InProcessMemoryBackend())
    stream_id, token = manager.start_stream(rtsp_server.url, LIVE)
    wait_for_chunks(manager, stream_id, 3)

    rtsp_server.stop()  # the camera goes away mid-stream ...
    deadline = time.monotonic() + 15
    while manager.store.get_stream(stream_id).status != "reconnecting":
        assert time.monotonic() < deadline, "the drop was not noticed"
        time.sleep(0.05)
    before = manager.progress(stream_id).chunks
    rtsp_server.start()  # ... and comes back
    wait_for_chunks(manager, stream_id, before + 3)
    assert manager.progress(stream_id).reconnects >= 1
    assert manager.store.get_stream(stream_id).status == "running"

    manager.shutdown()  # the service restarts
    resumed_at = manager.store.get_stream(stream_id).last_chunk_index + 1
    second = StreamManager(RedisStore(redis_url, namespace=namespace), InProcessMemoryBackend())
    assert second.resume_all() == [stream_id]
    try:
        wait_for_chunks(second, stream_id, 2)
        assert second.ask(stream_id, token, "still there?").memory_chunks >= resumed_at + 2
    finally:
        second.stop_stream(stream_id, token)
    chunks = second.store.chunks(stream_id)
    assert [c.index for c in chunks] == list(range(len(chunks))), "no gap, no duplicate"
    starts = [c.start_s for c in chunks]
    assert starts == sorted(starts) and all(c.end_s < n.start_s for c, n in zip(chunks, chunks[1:]))


def test_bad_rtsp_url_fails_that_stream_only(redis_url, namespace):
    from flashcache_sglang.testing.server import free_port

    manager = StreamManager(RedisStore(redis_url, namespace=namespace), InProcessMemoryBackend())
    config = StreamConfig(backoff=BackoffSettings(initial_s=0.1, max_s=0.2, open_attempts=2))
    stream_id, _ = manager.start_stream(f"rtsp://127.0.0.1:{free_port()}/nothing", config)
    assert manager.wait(stream_id, 30)
    record = manager.store.get_stream(stream_id)
    assert record.status == "failed" and "giving up" in record.error
