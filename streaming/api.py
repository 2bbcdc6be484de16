"""HTTP API of the stream service (FastAPI).

    POST   /streams                      start: {"source", "fps"?, "chunk_frames"?, "chunk_seconds"?,
                                          "max_pixels"?, "pace"?, "budget"?: {BudgetSettings fields}}
                                          -> 201 {"stream_id", "token"}
    GET    /streams                      ids and statuses (no sources, no details)
    GET    /streams/{id}                 metadata (token)
    GET    /streams/{id}/chunks?start=N  chunk records (token)
    GET    /streams/{id}/memory          logical vs kept tokens (token)
    POST   /streams/{id}/ask             {"question", "conversation_id"?} -> answer (token)
    GET    /streams/{id}/conversations/{cid}  turns (token)
    POST   /streams/{id}/stop            stop ingest (token)
    DELETE /streams/{id}                 stop and forget (token)
    GET    /healthz

The token goes in ``Authorization: Bearer <token>``. Unknown stream -> 404, missing or wrong
token -> 403, bad source or settings -> 400, store unreachable -> 503, backend error -> 502.
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI, Header, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from .budget import BudgetSettings
from .chunker import ChunkSettings
from .memory import MemoryBackendError
from .service import AccessDenied, StreamConfig, StreamManager
from .sources import BadSourceError, SamplingSettings
from .store import StoreUnavailable, UnknownStreamError

__all__ = ["create_app"]


class StartRequest(BaseModel):
    source: str
    fps: float = 2.0
    max_pixels: int = 224 * 224
    pace: float = 0.0
    chunk_frames: int = 4
    chunk_seconds: Optional[float] = None
    queue_frames: int = 64
    drop_policy: Optional[str] = None
    budget: dict[str, Any] = Field(default_factory=dict)


class AskRequest(BaseModel):
    question: str
    conversation_id: str = "default"


def _token(authorization: Optional[str]) -> Optional[str]:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def create_app(manager: StreamManager) -> FastAPI:
    app = FastAPI(title="flashcache-stream", version="0.1.0")

    async def guarded(function, *args):
        try:
            return await run_in_threadpool(function, *args)
        except UnknownStreamError:
            raise HTTPException(404, "unknown stream") from None
        except AccessDenied:
            raise HTTPException(403, "missing or wrong stream token") from None
        except (BadSourceError, ValueError) as error:
            raise HTTPException(400, str(error)) from None
        except StoreUnavailable as error:
            raise HTTPException(503, str(error)) from None
        except MemoryBackendError as error:
            raise HTTPException(502, str(error)) from None

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        await guarded(manager.store.ping)
        return {"ok": True, "backend": manager.backend.name}

    @app.post("/streams", status_code=201)
    async def start(request: StartRequest) -> dict[str, str]:
        def run() -> tuple[str, str]:
            config = StreamConfig(
                sampling=SamplingSettings(fps=request.fps, max_pixels=request.max_pixels, pace=request.pace),
                chunking=ChunkSettings(frames=request.chunk_frames, seconds=request.chunk_seconds),
                budget=BudgetSettings.from_dict(request.budget),
                queue_frames=request.queue_frames,
                drop_policy=request.drop_policy,
            )
            return manager.start_stream(request.source, config)

        stream_id, token = await guarded(run)
        return {"stream_id": stream_id, "token": token}

    @app.get("/streams")
    async def list_streams() -> list[dict[str, Any]]:
        records = await guarded(manager.store.list_streams)
        return [{"stream_id": r.stream_id, "status": r.status, "created_at": r.created_at} for r in records]

    @app.get("/streams/{stream_id}")
    async def inspect(stream_id: str, authorization: Optional[str] = Header(None)) -> dict[str, Any]:
        record = await guarded(manager.authorize, stream_id, _token(authorization))
        return record.public_dict()

    @app.get("/streams/{stream_id}/chunks")
    async def chunks(stream_id: str, start: int = 0, authorization: Optional[str] = Header(None)) -> list[dict[str, Any]]:
        await guarded(manager.authorize, stream_id, _token(authorization))
        records = await guarded(manager.store.chunks, stream_id, start)
        return [r.to_dict() for r in records]

    @app.get("/streams/{stream_id}/memory")
    async def memory(stream_id: str, authorization: Optional[str] = Header(None)) -> dict[str, Any]:
        record = await guarded(manager.authorize, stream_id, _token(authorization))
        return {
            "logical_tokens": record.logical_tokens,
            "kept_tokens": record.kept_tokens,
            "cap_tokens": record.cap_tokens,
            "chunks_ingested": record.chunks_ingested,
        }

    @app.post("/streams/{stream_id}/ask")
    async def ask(stream_id: str, request: AskRequest, authorization: Optional[str] = Header(None)) -> dict[str, Any]:
        answer = await guarded(manager.ask, stream_id, _token(authorization), request.question, request.conversation_id)
        return answer.to_dict()

    @app.get("/streams/{stream_id}/conversations/{conversation_id}")
    async def conversation(stream_id: str, conversation_id: str, authorization: Optional[str] = Header(None)) -> list[dict[str, Any]]:
        await guarded(manager.authorize, stream_id, _token(authorization))
        turns = await guarded(manager.store.turns, stream_id, conversation_id)
        return [t.to_dict() for t in turns]

    @app.post("/streams/{stream_id}/stop")
    async def stop(stream_id: str, authorization: Optional[str] = Header(None)) -> dict[str, str]:
        await guarded(manager.stop_stream, stream_id, _token(authorization))
        return {"stream_id": stream_id, "status": "stopped"}

    @app.delete("/streams/{stream_id}")
    async def delete(stream_id: str, authorization: Optional[str] = Header(None)) -> dict[str, str]:
        await guarded(manager.delete_stream, stream_id, _token(authorization))
        return {"stream_id": stream_id, "status": "deleted"}

    return app
