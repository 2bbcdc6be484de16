"""Group frames into chunks of N frames or T seconds, numbered without gaps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .energy import chunk_outlier_energy
from .types import Chunk, Frame

__all__ = ["ChunkSettings", "Chunker"]


@dataclass(frozen=True)
class ChunkSettings:
    """When a chunk closes: after ``frames`` frames, or once it spans ``seconds`` (if set),
    whichever comes first. Defaults: 4 frames (2 s at 2 fps; SGLang's Qwen2.5-VL video
    processor needs at least 4 frames, an even count)."""

    frames: int = 4
    seconds: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.frames, int) or self.frames < 1:
            raise ValueError(f"ChunkSettings.frames={self.frames!r} must be an int >= 1")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"ChunkSettings.seconds={self.seconds!r} must be > 0 or None")


class Chunker:
    """Collects frames; :meth:`push` returns a chunk when one closes, :meth:`flush` the rest."""

    def __init__(self, settings: ChunkSettings, next_index: int = 0):
        self.settings = settings
        self.next_index = next_index
        self._frames: list[Frame] = []

    @property
    def pending_frames(self) -> int:
        return len(self._frames)

    def push(self, frame: Frame) -> Optional[Chunk]:
        if self._frames and frame.timestamp_s < self._frames[-1].timestamp_s:
            raise ValueError(
                f"frame at {frame.timestamp_s:.3f} s arrived after a frame at {self._frames[-1].timestamp_s:.3f} s"
            )
        self._frames.append(frame)
        span = self._frames[-1].timestamp_s - self._frames[0].timestamp_s
        full = len(self._frames) >= self.settings.frames
        if full or (self.settings.seconds is not None and span >= self.settings.seconds):
            return self._close()
        return None

    def flush(self) -> Optional[Chunk]:
        return self._close() if self._frames else None

    def _close(self) -> Chunk:
        frames = tuple(self._frames)
        self._frames = []
        chunk = Chunk(index=self.next_index, frames=frames, outlier_energy=chunk_outlier_energy(frames))
        self.next_index += 1
        return chunk
