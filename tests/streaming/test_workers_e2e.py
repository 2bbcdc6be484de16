"""Acceptance of the scale-out over SGLang workers, with real processes on loopback: Redis, two
tiny-Qwen2.5-VL flashcache workers (``python -m flashcache_sglang.launch_server``) and two
``flashcache-stream serve`` replicas started with both ``--sglang-url``, as the README's
"Several machines" section says.

Eight live streams (local files replayed at real time, 4 s chunks) are created through both
replicas. Checked, in order (the tests share the processes and run in file order):

1. the placement puts four streams on each worker and the KV memory the servers report for
   them is within 20% between the workers; each stream's chunk folders stay bounded by the
   sink and the rebuild set;
2. one worker's process group is killed: its streams continue on the other worker, their
   memories rebuilt (a replica logs each rebuild) and kept under the cap, no stream
   fails, questions through either replica are answered; once every stream is stopped, a
   flush of the surviving worker gets every KV slot back; deleting the streams deletes their
   chunk folders.

The tiny model has random weights: answers are checked for existence, not meaning.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from flashcache_sglang.testing.server import free_port

from .test_ha import Replica

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

CLI = [sys.executable, "-m", "flashcache_sglang.streaming.cli"]
STREAMS = 8
CAP = 40  # visual KV slots per stream; a 4-frame chunk keeps 12 of its 24 visual tokens
REBUILD_CHUNKS = 3
STREAM_SETTINGS = {"fps": 1.0, "chunk_frames": 4, "max_pixels": 112 * 112, "pace": 1.0,
                   "budget": {"kv_cap_tokens": CAP, "base_retention": 0.5, "energy_exponent": 0.0}}
MM_PROCESS_CONFIG = {"video": {"fps": 1.0, "min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}}


def start_workers(count: int, log_dir) -> list:
    """``count`` tiny-VL flashcache servers, started at the same time (each takes ~60 s here)."""
    from flashcache_sglang.testing.models import tiny_qwen2_5_vl_dir
    from flashcache_sglang.testing.server import SGLangServer

    servers = [SGLangServer(tiny_qwen2_5_vl_dir(),
                            flashcache={"retention": 0.25, "candidates": "multimodal", "min_candidates": 8},
                            extra_args=["--enable-multimodal", "--mm-process-config", json.dumps(MM_PROCESS_CONFIG)],
                            max_total_tokens=8192, log_dir=log_dir) for _ in range(count)]
    errors = []

    def start(server):
        try:
            server.start()
        except Exception as error:  # reported below, after every start has ended
            errors.append(error)

    threads = [threading.Thread(target=start, args=(server,)) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        for server in servers:
            server.stop()
        raise errors[0]
    return servers


def make_clip(path: Path, seconds: float, hue: int) -> Path:
    """A test pattern clip; each stream gets its own hue, so no two memories share a prefix."""
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=4",
                    "-vf", f"hue=h={hue}", "-t", str(seconds), "-pix_fmt", "yuv420p", "-c:v", "libx264", str(path)],
                   check=True, timeout=120)
    return path


@pytest.fixture(scope="module")
def cluster(redis_url, tmp_path_factory):
    if subprocess.run(["which", "ffmpeg"], capture_output=True).returncode != 0:
        pytest.skip("ffmpeg is not installed (apt-get install ffmpeg)")
    folder = tmp_path_factory.mktemp("workers")
    media = folder / "media"
    media.mkdir()
    clips = [make_clip(media / f"cam{i}.mp4", 300, 45 * i) for i in range(STREAMS)]
    chunk_dir = folder / "chunks"
    namespace = "workers-" + uuid.uuid4().hex[:12]
    keys_file = folder / "keys.jsonl"
    created = subprocess.run(CLI + ["keys", "create", "--tenant", "acme", "--file", str(keys_file)],
                             capture_output=True, text=True, timeout=60)
    assert created.returncode == 0 and created.stdout.startswith("fck_"), created.stderr
    key = created.stdout.strip()
    workers = start_workers(2, folder)
    replicas = []
    try:
        for name in ("replica-a", "replica-b"):
            port = free_port()
            command = CLI + [
                "serve", "--port", str(port), "--redis-url", redis_url, "--namespace", namespace,
                "--replica-id", name, "--api-keys", str(keys_file), "--media-root", str(media),
                "--sglang-url", workers[0].url, "--sglang-url", workers[1].url,
                "--chunk-dir", str(chunk_dir), "--video-transport", "path", "--rebuild-chunks", str(REBUILD_CHUNKS),
                "--max-answer-tokens", "8",
                # A lease long enough that a replica stalled by this 2-core machine keeps its streams.
                "--worker-health-every", "0.5", "--lease-ttl", "10", "--takeover-scan", "1", "--ask-rate", "0",
                "--log-level", "info",
            ]
            replicas.append(Replica(name, port, command, folder / f"{name}.log"))
        yield {"workers": workers, "replicas": replicas, "key": key, "clips": clips, "chunk_dir": chunk_dir,
               "streams": {}}
    finally:
        for replica in replicas:
            replica.kill()
        for worker in workers:
            worker.stop()


def _wait(predicate, timeout_s, what, every_s=0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(every_s)


def _info(replica, key, stream_id):
    response = replica.get(f"/streams/{stream_id}", key)
    assert response.status_code == 200, response.text
    return response.json()


def _chunk_folders(chunk_dir: Path, stream_id: str) -> int:
    folder = chunk_dir / stream_id
    return len(os.listdir(folder)) if folder.is_dir() else 0


def _allocator_used(workers, samples: int = 10, every_s: float = 0.5) -> dict[str, int]:
    """KV slots the allocator of each worker has handed out, the least of ``samples`` reads of
    its stats file. The file is written at each compression, i.e. while an append holds its
    chunk and the memory's previous version besides the new one; the least read is the closest
    to what the memories alone hold. Reported, not asserted (it moves with the appends)."""
    least = {worker.url: None for worker in workers}
    for _ in range(samples):
        for worker in workers:
            stats = worker.stats()
            used = stats["allocator_size"] - stats["allocator_available"]
            least[worker.url] = used if least[worker.url] is None else min(least[worker.url], used)
        time.sleep(every_s)
    return least


def test_streams_spread_evenly_over_the_workers(cluster):
    key, (a, b), workers = cluster["key"], cluster["replicas"], cluster["workers"]
    streams = cluster["streams"]
    for i, clip in enumerate(cluster["clips"]):
        replica = (a, b)[i % 2]
        response = replica.post("/streams", key, json={"source": str(clip), **STREAM_SETTINGS})
        assert response.status_code == 201, response.text
        streams[response.json()["stream_id"]] = {"token": response.json()["token"]}

    most_folders = 0

    def all_at_cap():
        nonlocal most_folders
        infos = {s: _info(a, key, s) for s in streams}
        for stream_id, info in infos.items():
            assert info["status"] in ("starting", "running"), info
            most_folders = max(most_folders, _chunk_folders(cluster["chunk_dir"], stream_id))
        return all(info["chunks_ingested"] >= 4 for info in infos.values()) and infos

    infos = _wait(all_at_cap, 300, "every stream to ingest 4 chunks")
    placed = {s: info["worker"] for s, info in infos.items()}
    assert sorted(placed.values()) == sorted([workers[0].url, workers[1].url] * (STREAMS // 2)), placed
    for stream_id, entry in streams.items():
        entry["worker"] = placed[stream_id]
        assert _info(b, key, stream_id)["worker"] == placed[stream_id]  # every replica sees one placement

    # KV memory per worker, from the servers: what each stream's memory holds (the server's
    # capped_kv_slots, as stored by the owner replica), summed per worker.
    kv = {worker.url: 0 for worker in workers}
    for stream_id in streams:
        memory = a.get(f"/streams/{stream_id}/memory", key).json()
        assert 0 < memory["kept_tokens"] <= CAP, memory
        kv[placed[stream_id]] += memory["kept_tokens"]
    used = _allocator_used(workers)
    print(f"\nKV per worker (streams' capped KV slots, as the servers reported them): {kv}; "
          f"allocator slots in use (least of 10 reads): {used}; most chunk folders of a stream: {most_folders}")
    for numbers in (kv, used):
        low, high = min(numbers.values()), max(numbers.values())
        assert high - low <= 0.2 * high, numbers
    # The sink and the rebuild set, plus the chunk being appended before the rotation.
    assert most_folders <= 2 + REBUILD_CHUNKS


def _logs(replicas) -> str:
    return "".join(replica.log.read_text(errors="replace") for replica in replicas)


def test_a_dead_workers_streams_move_and_are_rebuilt(cluster):
    key, (a, b), workers = cluster["key"], cluster["replicas"], cluster["workers"]
    streams = cluster["streams"]
    assert len(streams) == STREAMS, "runs after test_streams_spread_evenly_over_the_workers"
    victim, survivor = workers
    moved = [s for s, entry in streams.items() if entry["worker"] == victim.url]
    assert len(moved) == STREAMS // 2
    before = {s: _info(a, key, s)["chunks_ingested"] for s in streams}

    os.killpg(victim.process.pid, signal.SIGKILL)  # the whole worker, scheduler included
    victim.process.wait(30)
    killed_at = time.monotonic()

    most_folders = 0

    def continued():
        nonlocal most_folders
        infos = {s: _info(b, key, s) for s in streams}
        for stream_id, info in infos.items():
            assert info["status"] == "running", info  # no stream failed
            most_folders = max(most_folders, _chunk_folders(cluster["chunk_dir"], stream_id))
        done = all(info["worker"] == survivor.url and info["chunks_ingested"] >= before[s] + 2
                   for s, info in infos.items())
        return done and infos

    _wait(continued, 240, "every stream to ingest 2 more chunks on the surviving worker")
    print(f"\nworker killed: all {len(moved)} moved streams ingested 2 more chunks on the other worker after "
          f"{time.monotonic() - killed_at:.1f} s")
    for stream_id in moved:
        assert f"stream {stream_id}: the server lost its memory; rebuilding" in _logs((a, b))
        chunks = b.get(f"/streams/{stream_id}/chunks", key).json()
        assert [c["index"] for c in chunks] == list(range(len(chunks))), "chunk indices contiguous"
        # The cap counts kept visual tokens after the sink (the sink chunk's own record shows 0).
        assert all(0 <= c["memory_kept_tokens"] <= CAP for c in chunks), [c["memory_kept_tokens"] for c in chunks]
        assert chunks[-1]["memory_kept_tokens"] > 0
    assert most_folders <= 2 + REBUILD_CHUNKS

    # Questions through either replica, with the stream token, all at once while the eight
    # streams keep ingesting: answered from the survivor's memories (a CPU worker decodes
    # between prefills of the appends, hence the generous timeout).
    def ask(i, stream_id):
        replica = (a, b)[i % 2]
        return requests.post(f"{replica.url}/streams/{stream_id}/ask", json={"question": "What is on screen?"},
                             headers={"Authorization": f"Bearer {streams[stream_id]['token']}"}, timeout=300)

    with ThreadPoolExecutor(STREAMS) as pool:
        answers = dict(zip(streams, pool.map(ask, range(STREAMS), streams)))
    for stream_id, answer in answers.items():
        assert answer.status_code == 200 and answer.json()["text"], answer.text
        assert answer.json()["backend"] == "sglang" and answer.json()["memory_chunks"] >= before[stream_id]

    # Stop every stream through the replica that owns it now: the memories are closed; then a
    # flush of the survivor must get every KV slot back.
    for stream_id, entry in streams.items():
        owner = {replica.name: replica for replica in (a, b)}[_info(a, key, stream_id)["owner"]]
        response = owner.post(f"/streams/{stream_id}/stop", entry["token"])
        assert response.status_code == 200, response.text

    def flushed():
        return requests.post(f"{survivor.url}/flush_cache", timeout=60).status_code == 200

    _wait(flushed, 60, "the surviving worker to accept a flush")
    flush = survivor.stats()["last_flush"]
    assert flush and flush["available_after_evict"] == flush["allocator_size"], flush
    assert survivor.alive(), survivor.log_tail()

    # Deleting the streams deletes their chunk folders.
    for stream_id, entry in streams.items():
        response = requests.delete(f"{a.url}/streams/{stream_id}",
                                   headers={"Authorization": f"Bearer {entry['token']}"}, timeout=30)
        assert response.status_code == 200, response.text
    assert not any((cluster["chunk_dir"] / s).exists() for s in streams)
