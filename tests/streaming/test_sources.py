"""Sources, sampling, URL sanitising and chunking."""

import numpy as np
import pytest

from flashcache_sglang.streaming.chunker import Chunker, ChunkSettings
from flashcache_sglang.streaming.energy import chunk_outlier_energy
from flashcache_sglang.streaming.sources import (
    BadSourceError,
    DecordFileSource,
    PacedSource,
    PyAVSource,
    SamplingSettings,
    SourceOpenError,
    open_source,
    parse_source,
    sanitize_url,
    target_size,
)
from flashcache_sglang.streaming.types import Frame


@pytest.mark.parametrize(
    "url, expected",
    [
        ("rtsp://admin:hunter2@10.0.0.5:554/live?channel=1", "rtsp://10.0.0.5:554/live?channel=1"),
        ("http://cam/x.mp4?token=abc&size=2", "http://cam/x.mp4?token=%2A%2A%2A&size=2"),
        ("/data/video.mp4", "/data/video.mp4"),
    ],
    ids=["userinfo", "query-secret", "path"],
)
def test_sanitize_url(url, expected):
    assert sanitize_url(url) == expected


def test_spec_repr_hides_credentials():
    spec = parse_source("rtsp://admin:hunter2@127.0.0.1:554/live")
    assert "hunter2" not in repr(spec) and spec.is_live


@pytest.mark.parametrize(
    "source, message",
    [("ftp://host/x.mp4", "unsupported source scheme"), ("/no/such/file.mp4", "does not exist"), ("rtsp:///x", "no host"), ("", "non-empty")],
    ids=["scheme", "missing", "nohost", "empty"],
)
def test_bad_sources(source, message):
    with pytest.raises(BadSourceError, match=message):
        parse_source(source)


@pytest.mark.parametrize("height, width", [(240, 320), (1080, 1920), (97, 63), (20, 20)])
def test_target_size(height, width):
    new_height, new_width = target_size(height, width, 224 * 224, 28)
    assert new_height % 28 == 0 and new_width % 28 == 0
    assert new_height * new_width <= 224 * 224


def test_decord_samples_at_fps_from_start(videos):
    source = DecordFileSource(str(videos["short"]), SamplingSettings(fps=2.0, max_pixels=112 * 112), start_s=2.0)
    frames = list(source.frames())
    assert [round(f.timestamp_s, 2) for f in frames] == [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5]
    assert frames[0].pixels.dtype == np.uint8 and frames[0].pixels.shape[0] % 28 == 0


def test_pyav_reads_file_urls(videos):
    source = PyAVSource(parse_source(f"file://{videos['short']}"), SamplingSettings(fps=1.0))
    assert [round(f.timestamp_s, 1) for f in source.frames()] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


class ListSource:
    def __init__(self, timestamps):
        self.timestamps = timestamps
        self.closed = False

    def frames(self):
        for t in self.timestamps:
            yield Frame(np.zeros((28, 28, 3), np.uint8), t)

    def close(self):
        self.closed = True


def test_paced_source_releases_frames_on_the_wall_clock():
    clock = FakeClock()
    source = PacedSource(ListSource([3.0, 3.5, 4.0, 5.0]), pace=2.0, clock=clock, sleep=clock.sleep)
    released = []
    for frame in source.frames():
        released.append((round(clock.now - 100.0, 6), frame.timestamp_s))
        if frame.timestamp_s == 3.5:
            clock.now += 1.0  # a slow consumer: the next frames are already due
    # Frame t is due (t - 3.0) / 2 s after the first; late frames are not delayed further.
    assert released == [(0.0, 3.0), (0.25, 3.5), (1.25, 4.0), (1.25, 5.0)]
    assert clock.sleeps == [0.25]
    source.close()
    assert source.source.closed


def test_pace_is_validated_and_only_wraps_files(videos):
    with pytest.raises(ValueError, match="pace=-1"):
        SamplingSettings(pace=-1)
    with pytest.raises(ValueError, match="pace=0"):
        PacedSource(ListSource([]), pace=0)
    spec = parse_source(str(videos["short"]))
    assert isinstance(open_source(spec, SamplingSettings(pace=1.0)), PacedSource)
    assert isinstance(open_source(spec, SamplingSettings()), DecordFileSource)


def test_paced_file_takes_real_time(videos):
    import time

    source = open_source(parse_source(str(videos["short"])), SamplingSettings(fps=2.0, max_pixels=112 * 112, pace=8.0))
    started = time.monotonic()
    frames = list(source.frames())
    elapsed = time.monotonic() - started
    # 12 frames spanning 5.5 s of video at 8x: at least 5.5 / 8 s.
    assert len(frames) == 12 and elapsed >= 5.5 / 8 - 0.01


@pytest.mark.parametrize("name", ["corrupt", "garbage"])
def test_unreadable_files_raise_open_errors(videos, name):
    with pytest.raises(SourceOpenError, match="cannot decode video file"):
        DecordFileSource(str(videos[name]), SamplingSettings())


def frame(t, value=0):
    return Frame(np.full((56, 56, 3), value, np.uint8), t)


def test_chunker_by_frames_and_seconds():
    chunker = Chunker(ChunkSettings(frames=3), next_index=5)
    out = [chunker.push(frame(t * 0.5)) for t in range(7)]
    chunks = [c for c in out if c is not None] + [chunker.flush()]
    assert [c.index for c in chunks] == [5, 6, 7]
    assert [len(c.frames) for c in chunks] == [3, 3, 1]
    timed = Chunker(ChunkSettings(frames=100, seconds=1.0))
    closed = [timed.push(frame(t * 0.4)) for t in range(6)]
    assert [len(c.frames) for c in closed if c is not None] == [4]
    with pytest.raises(ValueError, match="arrived after"):
        timed.push(frame(0.0))


def test_energy_is_zero_for_static_flat_video_and_higher_for_change():
    flat = [frame(t, 100) for t in range(4)]
    assert chunk_outlier_energy(flat) == 0.0
    rng = np.random.default_rng(0)
    noisy = [Frame(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8), t) for t in range(4)]
    assert 0.3 < chunk_outlier_energy(noisy) <= 1.0
