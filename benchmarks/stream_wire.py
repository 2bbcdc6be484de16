"""What a stream client puts on the wire and what the server says it spent, per request.

The stream benchmarks (benchmarks/soak.py, benchmarks/stream_long.py) measure the product's
client (streaming.sglang_backend.SGLangMemoryBackend) and the resend baseline
(benchmarks/soak_baseline.py) from outside: both take a ``requests.Session``, and
:class:`RecordingSession` is one that, for every ``/generate`` request, keeps

- ``request_bytes``: the exact body sent (the prepared request's bytes);
- the server's ``meta_info`` of the answer (the last streamed event for a streamed answer),

per calling thread, between :meth:`RecordingSession.begin` and :meth:`RecordingSession.end`.
An ingest runs in its stream's ingest thread and a question in its client's thread, so the
requests of one ``append_chunk`` or ``ask`` call (a rebuild included) are exactly those the
thread made in between.

:func:`server_timing` turns SGLang 0.5.23's ``meta_info`` into durations (seconds). With
``--enable-metrics`` the server reports, besides ``e2e_latency`` (request created in the
tokenizer manager -> finished): ``first_token_latency`` (created -> first token),
``queue_time`` (waiting in the scheduler), ``forward_entry_time`` / ``prefill_finished_time``
(scheduler, wall clock) and ``request_received_ts`` / ``api_server_dispatch_finish_ts``
(tokenizer manager, wall clock: tokenization and video processing happen in between).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Optional

import requests

__all__ = ["RecordingSession", "server_timing", "sum_timings", "TIMING_KEYS"]

# Durations server_timing derives (seconds), in the order reports list them.
TIMING_KEYS = ("server_e2e_s", "server_ttft_s", "server_queue_s", "server_tokenize_s", "server_prefill_s")


def server_timing(meta: Optional[dict[str, Any]]) -> dict[str, float]:
    """Durations (s) the server reports in one answer's ``meta_info``; absent ones are left out.

    - ``server_e2e_s``: ``e2e_latency``, the server's whole processing time of the request;
    - ``server_ttft_s``: ``first_token_latency`` (needs ``--enable-metrics``);
    - ``server_queue_s``: ``queue_time``, time in the scheduler's waiting queue;
    - ``server_tokenize_s``: ``api_server_dispatch_finish_ts - request_received_ts``:
      tokenization and multimodal processing (video decode) before the scheduler gets it;
    - ``server_prefill_s``: ``prefill_finished_time - forward_entry_time``.
    """
    if not isinstance(meta, dict):
        return {}
    out: dict[str, float] = {}

    def number(key: str) -> Optional[float]:
        value = meta.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    for key, name in (("e2e_latency", "server_e2e_s"), ("first_token_latency", "server_ttft_s"),
                      ("queue_time", "server_queue_s")):
        value = number(key)
        if value is not None:
            out[name] = value
    received, dispatched = number("request_received_ts"), number("api_server_dispatch_finish_ts")
    if received is not None and dispatched is not None and dispatched >= received:
        out["server_tokenize_s"] = dispatched - received
    entered, prefilled = number("forward_entry_time"), number("prefill_finished_time")
    if entered is not None and prefilled is not None and prefilled >= entered:
        out["server_prefill_s"] = prefilled - entered
    return out


def sum_timings(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One call's requests summed: bytes, count, and each server duration (a rebuild sends
    several requests; their costs add up). ``prompt_tokens`` / ``cached_tokens`` are the last
    request's (the one that did what the call asked)."""
    out: dict[str, Any] = {"requests": len(records), "request_bytes": sum(r["request_bytes"] for r in records)}
    for key in TIMING_KEYS:
        values = [r["timing"][key] for r in records if key in r.get("timing", {})]
        if values:
            out[key] = sum(values)
    last_meta = next((r["meta"] for r in reversed(records) if r.get("meta")), None)
    if last_meta:
        for key in ("prompt_tokens", "cached_tokens"):
            if isinstance(last_meta.get(key), int):
                out[key] = last_meta[key]
    statuses = sorted({r["status"] for r in records if r["status"] != 200})
    if statuses:
        out["http_errors"] = statuses
    return out


class RecordingSession(requests.Session):
    """A ``requests.Session`` that records each ``/generate`` request of the calling thread.

    ``session.begin()`` starts recording for this thread; ``session.end()`` returns the records
    since, each ``{"request_bytes", "status", "meta", "timing"}`` (``meta``: the server's
    ``meta_info`` without its bulky per-token lists; ``timing``: :func:`server_timing`). Other
    threads' requests are not mixed in; requests made while not recording are not kept.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def begin(self) -> None:
        self._local.records = []

    def end(self) -> list[dict[str, Any]]:
        records = getattr(self._local, "records", None) or []
        self._local.records = None
        for record in records:
            _parse_last_event(record)
        return records

    def send(self, request, **kwargs):  # noqa: D102 - requests.Session.send
        response = super().send(request, **kwargs)
        records = getattr(self._local, "records", None)
        if records is None or not request.url.endswith("/generate"):
            return response
        body = request.body or b""
        record: dict[str, Any] = {"request_bytes": len(body if isinstance(body, bytes) else body.encode()),
                                  "status": response.status_code, "meta": None, "timing": {}}
        records.append(record)
        if response.status_code != 200:
            return response
        if kwargs.get("stream"):
            _watch_stream(response, record)
        else:
            try:
                _keep_meta(record, response.json().get("meta_info"))
            except ValueError:
                pass
        return response


def _keep_meta(record: dict[str, Any], meta: Any) -> None:
    if isinstance(meta, dict):
        record["meta"] = {k: v for k, v in meta.items() if not isinstance(v, list) or k == "flashcache"}
        record["timing"] = server_timing(meta)


def _watch_stream(response, record: dict[str, Any]) -> None:
    """Wrap ``response.iter_lines`` so the last event of the stream is kept in ``record`` as
    the caller reads it (the caller sees every line unchanged); :meth:`RecordingSession.end`
    parses its ``meta_info``."""
    original = response.iter_lines

    def iter_lines(*args, **kwargs):
        for line in original(*args, **kwargs):
            text = line.decode() if isinstance(line, bytes) else line
            if text and text.startswith("data:") and text[5:].strip() != "[DONE]":
                record["last_event"] = text
            yield line

    response.iter_lines = iter_lines


def _parse_last_event(record: dict[str, Any]) -> None:
    text = record.pop("last_event", None)
    if text is None:
        return
    try:
        _keep_meta(record, json.loads(text[5:].strip()).get("meta_info"))
    except ValueError:
        pass
