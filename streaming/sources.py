"""Video sources: sampled, resized, timestamped frames from files and live URLs.

- Plain paths go through decord (random access, so a restarted service resumes a file from
  the next chunk's timestamp).
- ``rtsp://``, ``rtsps://``, ``http(s)://`` and ``file://`` URLs go through PyAV. RTSP is live:
  a drop raises :class:`SourceDisconnected` and :class:`ReconnectingSource` reopens it with
  backoff; frames are stamped on the stream's own clock so timestamps stay continuous.

A source URL may carry credentials (``rtsp://user:pass@cam/...``). The raw URL lives only in
the source objects of the running process; everything logged, stored or returned uses
:func:`sanitize_url`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
from PIL import Image

from .types import Frame

__all__ = [
    "SamplingSettings",
    "SourceSpec",
    "SourceError",
    "BadSourceError",
    "SourceOpenError",
    "SourceDisconnected",
    "FrameSource",
    "DecordFileSource",
    "PyAVSource",
    "ReconnectingSource",
    "BackoffSettings",
    "parse_source",
    "open_source",
    "ffmpeg_input_options",
    "sanitize_url",
    "target_size",
]

logger = logging.getLogger(__name__)

LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp")
PYAV_SCHEMES = LIVE_SCHEMES + ("http", "https", "file")
_SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "key", "secret", "auth", "signature", "sig", "credential")


class SourceError(Exception):
    """A video source cannot deliver frames. The message never contains credentials."""


class BadSourceError(SourceError, ValueError):
    """The source string is malformed, of an unsupported scheme, or names a missing file."""


class SourceOpenError(SourceError):
    """The source exists but cannot be opened or decoded (corrupt file, unsupported codec)."""


class SourceDisconnected(SourceError):
    """A live source dropped; reconnecting may help."""


def sanitize_url(url: str) -> str:
    """``url`` without user info and with secret-looking query values masked."""
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:  # a plain path (or a Windows drive letter)
        return url
    # Everything after the last '@' of the authority: what ffmpeg and redis-py treat as the host
    # part. Kept as written (not re-parsed) so a bad port or a Sentinel host list survives.
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = urlencode(
        [
            (key, "***" if any(secret in key.lower() for secret in _SECRET_QUERY_KEYS) else value)
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


@dataclass(frozen=True)
class SamplingSettings:
    """How frames are sampled from a source.

    Attributes:
        fps: frames per second kept (default 2.0, Qwen2.5-VL's video default).
        max_pixels: most pixels per resized frame (default 224 * 224).
        size_multiple: resized height and width are multiples of this (28 = Qwen2.5-VL's
            patch 14 x spatial merge 2).
        pace: replay speed of a file (0: as fast as it decodes; 1.0: real time, like
            ``ffmpeg -re``, so a file stands in for a live camera; 2.0: twice real time).
            Live sources arrive in real time anyway and ignore it.
    """

    fps: float = 2.0
    max_pixels: int = 224 * 224
    size_multiple: int = 28
    pace: float = 0.0

    def __post_init__(self) -> None:
        if not (0 < self.fps <= 120):
            raise ValueError(f"SamplingSettings.fps={self.fps!r} is outside (0, 120]")
        if self.size_multiple < 1:
            raise ValueError(f"SamplingSettings.size_multiple={self.size_multiple!r} must be >= 1")
        if not (0 <= self.pace <= 1000):
            raise ValueError(f"SamplingSettings.pace={self.pace!r} is outside [0, 1000] (0: no pacing, 1.0: real time)")
        if self.max_pixels < self.size_multiple**2:
            raise ValueError(
                f"SamplingSettings.max_pixels={self.max_pixels!r} must be >= size_multiple**2={self.size_multiple**2}"
            )


def target_size(height: int, width: int, max_pixels: int, size_multiple: int) -> tuple[int, int]:
    """Resized ``(height, width)``: aspect kept, multiples of ``size_multiple``, at most
    ``max_pixels`` pixels (Qwen2.5-VL's smart_resize without the minimum)."""
    if height < 1 or width < 1:
        raise ValueError(f"frame size {height}x{width} must be positive")
    scale = min(1.0, math.sqrt(max_pixels / (height * width)))
    new_height = max(size_multiple, int(height * scale) // size_multiple * size_multiple)
    new_width = max(size_multiple, int(width * scale) // size_multiple * size_multiple)
    while new_height * new_width > max_pixels and max(new_height, new_width) > size_multiple:
        if new_height >= new_width:
            new_height -= size_multiple
        else:
            new_width -= size_multiple
    return new_height, new_width


def _resize(pixels: np.ndarray, settings: SamplingSettings) -> np.ndarray:
    height, width = target_size(pixels.shape[0], pixels.shape[1], settings.max_pixels, settings.size_multiple)
    if (height, width) == pixels.shape[:2]:
        return np.ascontiguousarray(pixels)
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.BICUBIC))


# Demuxers a network source may be read with: none that fetches further URLs named inside the
# stream (hls, dash, concat, image2 playlists), which the source policy could not check.
_NETWORK_FORMATS = "mov,matroska,mpegts,flv,live_flv,avi,h264,hevc,mjpeg,mpjpeg,ivf,mpeg,m4v,ogg,asf,nut"


def ffmpeg_input_options(url: str) -> dict[str, str]:
    """ffmpeg input options for a network URL: the transport, and whitelists that keep ffmpeg
    on the protocols and containers of that scheme (no playlists, no redirects of its own)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("rtsp", "rtsps"):
        # analyzeduration: ffmpeg's default probe (5 s budget) held every open and reconnect
        # for ~3 s on a loopback camera; the session description already names the codec, so
        # 1 s of probing finds the geometry (measured: open in 1.2 s instead of 2.9 s).
        return {"rtsp_transport": "tcp", "analyzeduration": "1000000",
                "protocol_whitelist": "rtsp,rtsps,rtp,srtp,tcp,udp,tls", "format_whitelist": "rtsp"}
    if scheme in ("http", "https"):
        return {"max_redirects": "0", "protocol_whitelist": "http,https,tcp,tls", "format_whitelist": _NETWORK_FORMATS}
    if scheme == "rtmp":
        return {"protocol_whitelist": "rtmp,tcp", "format_whitelist": "flv,live_flv"}
    return {}


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source. ``url`` is the raw string (may hold credentials: never log it)."""

    url: str
    kind: str  # "file" (decord), "pyav" (URL read by PyAV)
    is_live: bool

    @property
    def sanitized(self) -> str:
        return sanitize_url(self.url)

    def __repr__(self) -> str:  # keeps credentials out of tracebacks and logs
        return f"SourceSpec(url={self.sanitized!r}, kind={self.kind!r}, is_live={self.is_live})"


def parse_source(url: str) -> SourceSpec:
    """Classify a source string; raises :class:`BadSourceError` for what can never work."""
    if not isinstance(url, str) or not url.strip():
        raise BadSourceError("source must be a non-empty string (a file path or an rtsp/http/file URL)")
    scheme = urlsplit(url).scheme.lower()
    if scheme and len(scheme) > 1:
        if scheme not in PYAV_SCHEMES:
            raise BadSourceError(
                f"unsupported source scheme {scheme!r} in {sanitize_url(url)!r}; valid: a file path or {list(PYAV_SCHEMES)}"
            )
        if scheme == "file":
            path = urlsplit(url).path
            if not os.path.isfile(path):
                raise BadSourceError(f"video file {path!r} does not exist")
        elif not urlsplit(url).hostname:
            raise BadSourceError(f"source URL {sanitize_url(url)!r} has no host")
        return SourceSpec(url=url, kind="pyav", is_live=scheme in LIVE_SCHEMES)
    if not os.path.isfile(url):
        raise BadSourceError(f"video file {url!r} does not exist")
    return SourceSpec(url=url, kind="file", is_live=False)


class FrameSource(Protocol):
    """Yields sampled, resized frames in time order; ``close()`` releases the source."""

    def frames(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...


class DecordFileSource:
    """A local video file read with decord, sampled at ``settings.fps`` from ``start_s``."""

    def __init__(self, path: str, settings: SamplingSettings, start_s: float = 0.0, batch_frames: int = 16):
        import decord

        self.path = path
        self.settings = settings
        self.start_s = start_s
        self.batch_frames = batch_frames
        try:
            self._reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
            num_frames = len(self._reader)
            source_fps = float(self._reader.get_avg_fps())
        except Exception as error:  # decord raises its own DECORDError and RuntimeError
            raise SourceOpenError(f"cannot decode video file {path!r}: {_first_line(error)}") from error
        if num_frames == 0 or not source_fps > 0:
            raise SourceOpenError(f"video file {path!r} has no decodable frames (frames={num_frames}, fps={source_fps})")
        self.num_frames = num_frames
        self.source_fps = source_fps
        self.duration_s = num_frames / source_fps

    def _indices(self) -> list[int]:
        step = 1.0 / self.settings.fps
        indices, last = [], -1
        sample_time = self.start_s
        while sample_time < self.duration_s:
            index = min(self.num_frames - 1, int(round(sample_time * self.source_fps)))
            if index != last:
                indices.append(index)
                last = index
            sample_time += step
        return indices

    def frames(self) -> Iterator[Frame]:
        indices = self._indices()
        for begin in range(0, len(indices), self.batch_frames):
            batch = indices[begin : begin + self.batch_frames]
            try:
                pixels = self._reader.get_batch(batch).asnumpy()
            except Exception as error:
                raise SourceOpenError(f"cannot decode frames {batch[0]}..{batch[-1]} of {self.path!r}: {_first_line(error)}") from error
            for index, frame_pixels in zip(batch, pixels):
                yield Frame(pixels=_resize(frame_pixels, self.settings), timestamp_s=index / self.source_fps)

    def close(self) -> None:
        self._reader = None


class PyAVSource:
    """A URL read with PyAV. Live sources stamp frames with ``clock_offset_s`` plus the time
    since this connection opened (the stream's own clock); others use presentation time."""

    def __init__(
        self,
        spec: SourceSpec,
        settings: SamplingSettings,
        start_s: float = 0.0,
        clock_offset_s: float = 0.0,
        timeout_s: float = 5.0,
    ):
        import av

        self.spec = spec
        self.settings = settings
        self.start_s = start_s
        self.clock_offset_s = clock_offset_s
        self._closing = False
        self._decoding = False
        try:
            self._container = av.open(spec.url, options=ffmpeg_input_options(spec.url), timeout=(timeout_s, timeout_s))
            self._stream = self._container.streams.video[0]
        except IndexError as error:
            raise SourceOpenError(f"source {spec.sanitized!r} has no video stream") from error
        except Exception as error:
            message = _first_line(error).replace(spec.url, spec.sanitized)
            if spec.is_live:
                raise SourceDisconnected(f"cannot open {spec.sanitized!r}: {message}") from error
            raise SourceOpenError(f"cannot open {spec.sanitized!r}: {message}") from error
        if not spec.is_live and start_s > 0:
            try:
                self._container.seek(int(start_s / self._stream.time_base), stream=self._stream, backward=True)
            except Exception:
                logger.warning("cannot seek %s to %.2f s; decoding from the start", spec.sanitized, start_s)

    def frames(self) -> Iterator[Frame]:
        self._decoding = True
        try:
            yield from self._decode()
        finally:
            self._decoding = False
            self._close_container()

    def _decode(self) -> Iterator[Frame]:
        import av

        step = 1.0 / self.settings.fps
        opened_at = time.monotonic()
        next_sample = self.start_s if not self.spec.is_live else self.clock_offset_s
        try:
            for frame in self._container.decode(self._stream):
                if self._closing:
                    return
                if self.spec.is_live:
                    timestamp = self.clock_offset_s + (time.monotonic() - opened_at)
                elif frame.time is not None:
                    timestamp = float(frame.time)
                else:
                    continue
                if timestamp + 1e-6 < next_sample:
                    continue
                next_sample += step
                if next_sample <= timestamp:  # behind after a gap: no burst of catch-up samples
                    next_sample = timestamp + step
                yield Frame(pixels=_resize(frame.to_ndarray(format="rgb24"), self.settings), timestamp_s=timestamp)
        except (av.error.FFmpegError, OSError, EOFError) as error:
            message = _first_line(error).replace(self.spec.url, self.spec.sanitized)
            if self.spec.is_live:
                raise SourceDisconnected(f"{self.spec.sanitized!r} dropped: {message}") from error
            raise SourceOpenError(f"cannot decode {self.spec.sanitized!r}: {message}") from error
        if self.spec.is_live:
            # A live source never ends on its own: an end of stream is a drop.
            raise SourceDisconnected(f"{self.spec.sanitized!r} ended the stream")

    def close(self) -> None:
        """Safe from any thread: PyAV must not close a container another thread decodes from
        (that crashes the process), so a decoding thread closes it itself at its next frame."""
        self._closing = True
        if not self._decoding:
            self._close_container()

    def _close_container(self) -> None:
        container, self._container = getattr(self, "_container", None), None
        if container is not None:
            try:
                container.close()
            except Exception:
                pass


@dataclass(frozen=True)
class BackoffSettings:
    """Reconnect backoff for live sources: ``initial_s * 2**attempt`` capped at ``max_s``.

    ``max_attempts`` consecutive failed reconnects end the stream with an error (0 = retry
    forever, the default for a service). ``open_attempts`` bounds the very first connect so a
    bad URL fails fast.
    """

    initial_s: float = 0.5
    max_s: float = 10.0
    max_attempts: int = 0
    open_attempts: int = 3


class ReconnectingSource:
    """A live source that reopens itself after a drop.

    Frames keep flowing on one clock: after a drop the clock continues from the last frame's
    timestamp plus the time spent reconnecting, so a chunk being filled when the drop happened
    is completed with the frames after the reconnect (nothing lost, nothing repeated).
    """

    def __init__(
        self,
        open_fn: Callable[[float], FrameSource],
        backoff: BackoffSettings,
        name: str,
        on_state: Optional[Callable[[str, str], None]] = None,
        sleep: Callable[[float], None] = time.sleep,
        clock_offset_s: float = 0.0,
    ):
        self._open_fn = open_fn
        self.backoff = backoff
        self.name = name
        self._on_state = on_state or (lambda state, message: None)
        self._sleep = sleep
        self._clock_offset_s = clock_offset_s
        self._source: Optional[FrameSource] = None
        self._closed = False
        self._last_frame_at: Optional[float] = None
        self.reconnects = 0

    def _connect(self, first: bool) -> FrameSource:
        attempt = 0
        while True:
            if self._closed:
                raise SourceDisconnected(f"{self.name!r} closed")
            try:
                # The stream clock keeps running while disconnected (a live stream resumes "from now").
                offset = self._clock_offset_s
                if self._last_frame_at is not None:
                    offset += time.monotonic() - self._last_frame_at
                return self._open_fn(offset)
            except SourceDisconnected as error:
                attempt += 1
                limit = self.backoff.open_attempts if first else self.backoff.max_attempts
                if limit and attempt >= limit:
                    raise SourceOpenError(f"giving up on {self.name!r} after {attempt} attempts: {error}") from error
                delay = min(self.backoff.max_s, self.backoff.initial_s * 2 ** (attempt - 1))
                self._on_state("reconnecting", f"{error}; retry {attempt} in {delay:.1f} s")
                logger.warning("%s; retry %d in %.1f s", error, attempt, delay)
                self._sleep(delay)

    def frames(self) -> Iterator[Frame]:
        first = True
        while not self._closed:
            self._source = self._connect(first)
            if not first:
                self.reconnects += 1
                self._on_state("running", f"reconnected to {self.name!r}")
            first = False
            try:
                for frame in self._source.frames():
                    self._clock_offset_s = frame.timestamp_s
                    self._last_frame_at = time.monotonic()
                    yield frame
            except SourceDisconnected as error:
                if self._closed:
                    return
                self._on_state("reconnecting", str(error))
                logger.warning("%s; reconnecting", error)
            finally:
                self._source.close()

    def close(self) -> None:
        self._closed = True
        if self._source is not None:
            self._source.close()


class PacedSource:
    """Releases a file source's frames on the wall clock: frame ``t`` seconds into the file
    comes ``t / pace`` seconds after the first one (``ffmpeg -re``). A consumer that falls
    behind gets the late frames at once (the reader does not skip them; the queue's drop
    policy decides)."""

    def __init__(self, source: FrameSource, pace: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if not pace > 0:
            raise ValueError(f"pace={pace!r} must be > 0")
        self.source = source
        self.pace = pace
        self._clock = clock
        self._sleep = sleep

    def frames(self) -> Iterator[Frame]:
        origin = None
        for frame in self.source.frames():
            if origin is None:
                origin = (self._clock(), frame.timestamp_s)
            due = origin[0] + (frame.timestamp_s - origin[1]) / self.pace
            wait = due - self._clock()
            if wait > 0:
                self._sleep(wait)
            yield frame

    def close(self) -> None:
        self.source.close()


class CheckedSource(Protocol):
    """What :func:`open_source` needs of a source policy (streaming.source_policy.SourcePolicy)."""

    def check(self, source: str) -> SourceSpec: ...


def open_source(
    spec: SourceSpec,
    settings: SamplingSettings,
    start_s: float = 0.0,
    backoff: Optional[BackoffSettings] = None,
    on_state: Optional[Callable[[str, str], None]] = None,
    policy: Optional[CheckedSource] = None,
) -> FrameSource:
    """Open ``spec``: a file from ``start_s`` (paced by ``settings.pace``); a live URL on a
    clock starting at ``start_s``.

    With ``policy`` the source is checked again right before every open and reconnect (a host
    name may resolve elsewhere by then; a refused reconnect counts as a failed attempt), and
    http(s) redirects are followed here, each hop checked, never by ffmpeg.
    """

    def checked() -> SourceSpec:
        if policy is None:
            return spec
        checked_spec = policy.check(spec.url)
        if urlsplit(checked_spec.url).scheme.lower() in ("http", "https"):
            from .source_policy import follow_redirects

            checked_spec = SourceSpec(url=follow_redirects(checked_spec.url, policy), kind="pyav", is_live=checked_spec.is_live)
        return checked_spec

    if not spec.is_live:
        current = checked()
        if current.kind == "file":
            source: FrameSource = DecordFileSource(current.url, settings, start_s=start_s)
        else:
            source = PyAVSource(current, settings, start_s=start_s)
        return PacedSource(source, settings.pace) if settings.pace > 0 else source

    def reopen(clock_offset_s: float) -> FrameSource:
        try:
            current = checked()
        except BadSourceError as error:  # e.g. the camera's name now resolves to a refused address
            raise SourceDisconnected(str(error)) from None
        return PyAVSource(current, settings, clock_offset_s=clock_offset_s)

    return ReconnectingSource(
        reopen,
        backoff or BackoffSettings(),
        name=spec.sanitized,
        on_state=on_state,
        clock_offset_s=start_s,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
