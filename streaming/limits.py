"""Per-tenant and per-stream limits of a stream service deployment.

Where each is enforced:

- ``max_streams_per_tenant``: atomically in the store when a stream is created (every stored
  stream counts, whatever its status: each holds metadata and chunk files until deleted);
- ``max_body_bytes``: by the HTTP layer before a request body is parsed (413);
- ``ask_rate_per_s`` / ``ask_burst``: a token bucket per stream in the store, so every
  replica draws from the same bucket (429 with ``Retry-After``);
- ``max_stream_disk_bytes``: chunk files per stream (streaming.artifacts): files the memory no
  longer needs are deleted as soon as it says so; when the files it still needs exceed the
  limit they are kept and the stream's ``warning`` says so.

0 means unlimited for each.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["Limits", "RateLimited", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class RateLimited(RuntimeError):
    """Too many questions to one stream; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


def parse_size(text: str) -> int:
    """Bytes in ``"512"``, ``"64KiB"``, ``"500MB"``, ``"2G"`` (k/M/G/T decimal, Ki/Mi/Gi/Ti binary)."""
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").lower().rstrip("b") if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"size {text!r} is not a number of bytes with an optional unit (k, M, G, T, Ki, Mi, Gi, Ti)")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Limits:
    """Limits of one deployment (see the module docstring); 0 = unlimited."""

    max_streams_per_tenant: int = 32
    max_body_bytes: int = 64 * 1024
    ask_rate_per_s: float = 2.0
    ask_burst: float = 5.0
    max_stream_disk_bytes: int = 2 * 2**30

    def __post_init__(self) -> None:
        for name in ("max_streams_per_tenant", "max_body_bytes", "max_stream_disk_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Limits.{name}={value!r} must be an int >= 0 (0: unlimited)")
        if not self.ask_rate_per_s >= 0:
            raise ValueError(f"Limits.ask_rate_per_s={self.ask_rate_per_s!r} must be >= 0 (0: unlimited)")
        if self.ask_rate_per_s > 0 and not self.ask_burst >= 1:
            raise ValueError(f"Limits.ask_burst={self.ask_burst!r} must be >= 1 (questions allowed at once)")
