"""HTTP API of the stream service (FastAPI).

    POST   /streams                      start (operator key): {"source", "fps"?, "chunk_frames"?,
                                          "chunk_seconds"?, "max_pixels"?, "pace"?, "budget"?: {...}}
                                          -> 201 {"stream_id", "token"}
    GET    /streams                      the caller's tenant's streams: ids, statuses (operator key)
    GET    /streams/{id}                 metadata (stream token or operator key; an operator also sees
                                          the ``owner`` replica and, over several workers, the ``worker``)
    GET    /streams/{id}/chunks?start=N  chunk records (stream token or operator key)
    GET    /streams/{id}/memory          logical vs kept tokens (stream token or operator key)
    POST   /streams/{id}/ask             {"question", "conversation_id"?} -> answer (token or key)
    GET    /streams/{id}/conversations/{cid}  turns (stream token or operator key)
    POST   /streams/{id}/stop            stop ingest, on whichever replica runs it (token or key)
    DELETE /streams/{id}                 stop and forget, chunk files included (token or key)
    GET    /healthz                      {"ok", "backend", "replica"} (no credential)

Credentials go in ``Authorization: Bearer <credential>``: an operator API key
(``fck_...``, streaming.auth; one tenant's) or a stream token (``fst_...``, returned once by
``POST /streams``; one stream's).

Error contract (every error body is ``{"detail": "<message>"}``):

- 400: bad source or settings; a source the source policy refuses names the rule
  (``source refused by the source policy (rule 'media_root'): ...``).
- 401: no credential, or not a Bearer credential (with ``WWW-Authenticate: Bearer``).
- 403: an API key that is malformed, unknown or revoked; a stream token where an operator key
  is needed (create, list).
- 404: unknown stream, another tenant's stream, or a stream token of another stream: the
  same answer, so nobody learns whether a stream id exists.
- 409: the tenant already has its maximum number of streams.
- 413: request body above the limit (refused before it is parsed).
- 422: a request body that does not match the schema.
- 429: too many questions to one stream (``Retry-After`` in seconds).
- 502: the memory backend failed; 503: the metadata store is unreachable.
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI, Header, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import API_KEY_PREFIX, Authenticator, InvalidApiKey, Principal
from .budget import BudgetSettings
from .chunker import ChunkSettings
from .limits import RateLimited
from .memory import MemoryBackendError
from .service import AccessDenied, StreamConfig, StreamManager
from .sources import BadSourceError, SamplingSettings
from .store import StoreUnavailable, StreamLimitReached, UnknownStreamError

__all__ = ["create_app", "BodySizeLimit"]

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="flashcache-stream"'}
_NOT_FOUND = "unknown stream (or not visible with these credentials)"


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


class BodySizeLimit:
    """ASGI middleware: a request body above ``max_bytes`` gets 413 before the app parses it.

    A declared ``Content-Length`` above the limit is refused without reading; a body sent
    without one (chunked) is read only up to the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(send, 400, "Content-Length is not a number")
                return
            if int(declared) > self.max_bytes:
                await self._refuse(send, 413, f"request body of {int(declared)} bytes is above the limit of {self.max_bytes} bytes")
                return
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; let the app see it
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                await self._refuse(send, 413, f"request body is above the limit of {self.max_bytes} bytes")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str) -> None:
        import json

        payload = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _bearer(authorization: Optional[str]) -> str:
    if not authorization:
        raise HTTPException(401, "missing credentials: send 'Authorization: Bearer <operator API key or stream token>'",
                            headers=_CHALLENGE)
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise HTTPException(401, "the Authorization header must be 'Bearer <operator API key or stream token>'",
                            headers=_CHALLENGE)
    return credential.strip()


def create_app(manager: StreamManager, authenticator: Optional[Authenticator] = None) -> FastAPI:
    """The API over ``manager``. ``authenticator`` checks operator keys (default: the keys in
    the manager's store). The manager must have an operator source policy: the default
    local-user policy would let any client read the server's files."""
    if manager.source_policy.trusted_caller:
        raise ValueError(
            "the HTTP API needs a StreamManager with an operator source policy (SourcePolicy(...)), "
            "not the local-user default that allows every file and host"
        )
    authenticator = authenticator or Authenticator(manager.store)
    app = FastAPI(title="flashcache-stream", version="0.2.0")
    app.add_middleware(BodySizeLimit, max_bytes=manager.limits.max_body_bytes)

    async def guarded(function, *args, **kwargs):
        try:
            return await run_in_threadpool(function, *args, **kwargs)
        except (UnknownStreamError, AccessDenied):
            raise HTTPException(404, _NOT_FOUND) from None
        except InvalidApiKey as error:
            raise HTTPException(403, str(error)) from None
        except StreamLimitReached as error:
            raise HTTPException(409, str(error)) from None
        except RateLimited as error:
            raise HTTPException(429, str(error), headers={"Retry-After": error.retry_after_header}) from None
        except (BadSourceError, ValueError) as error:
            raise HTTPException(400, str(error)) from None
        except StoreUnavailable as error:
            raise HTTPException(503, str(error)) from None
        except MemoryBackendError as error:
            raise HTTPException(502, str(error)) from None

    async def operator(authorization: Optional[str]) -> Principal:
        credential = _bearer(authorization)
        if not credential.startswith(API_KEY_PREFIX):
            raise HTTPException(403, "this needs an operator API key (fck_...); a stream token grants only its own stream")
        return await guarded(authenticator.authenticate, credential)

    async def stream_access(authorization: Optional[str]) -> tuple[Optional[str], Optional[str]]:
        """``(token, tenant)`` for StreamManager calls: a stream token, or an operator's tenant."""
        credential = _bearer(authorization)
        if credential.startswith(API_KEY_PREFIX):
            principal = await guarded(authenticator.authenticate, credential)
            return None, principal.tenant
        return credential, None

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        await guarded(manager.store.ping)
        return {"ok": True, "backend": manager.backend.name, "replica": manager.replica_id}

    @app.post("/streams", status_code=201)
    async def start(request: StartRequest, authorization: Optional[str] = Header(None)) -> dict[str, str]:
        principal = await operator(authorization)

        def run() -> tuple[str, str]:
            config = StreamConfig(
                sampling=SamplingSettings(fps=request.fps, max_pixels=request.max_pixels, pace=request.pace),
                chunking=ChunkSettings(frames=request.chunk_frames, seconds=request.chunk_seconds),
                budget=BudgetSettings.from_dict(request.budget),
                queue_frames=request.queue_frames,
                drop_policy=request.drop_policy,
            )
            return manager.start_stream(request.source, config, tenant=principal.tenant)

        stream_id, token = await guarded(run)
        return {"stream_id": stream_id, "token": token}

    @app.get("/streams")
    async def list_streams(authorization: Optional[str] = Header(None)) -> list[dict[str, Any]]:
        principal = await operator(authorization)
        records = await guarded(manager.list_streams, principal.tenant)
        return [{"stream_id": r.stream_id, "status": r.status, "created_at": r.created_at} for r in records]

    @app.get("/streams/{stream_id}")
    async def inspect(stream_id: str, authorization: Optional[str] = Header(None)) -> dict[str, Any]:
        token, tenant = await stream_access(authorization)
        record = await guarded(manager.authorize, stream_id, token, tenant)
        info = record.public_dict()
        if tenant is not None:  # which replica ingests it: the operator's business only
            info["owner"] = await guarded(manager.owner, stream_id)
            worker_of = getattr(manager.backend, "worker_of", None)  # several SGLang workers (streaming.workers)
            if worker_of is not None:
                info["worker"] = await guarded(worker_of, stream_id)
        return info

    @app.get("/streams/{stream_id}/chunks")
    async def chunks(stream_id: str, start: int = 0, authorization: Optional[str] = Header(None)) -> list[dict[str, Any]]:
        token, tenant = await stream_access(authorization)
        await guarded(manager.authorize, stream_id, token, tenant)
        records = await guarded(manager.store.chunks, stream_id, start)
        return [r.to_dict() for r in records]

    @app.get("/streams/{stream_id}/memory")
    async def memory(stream_id: str, authorization: Optional[str] = Header(None)) -> dict[str, Any]:
        token, tenant = await stream_access(authorization)
        record = await guarded(manager.authorize, stream_id, token, tenant)
        return {
            "logical_tokens": record.logical_tokens,
            "kept_tokens": record.kept_tokens,
            "cap_tokens": record.cap_tokens,
            "chunks_ingested": record.chunks_ingested,
        }

    @app.post("/streams/{stream_id}/ask")
    async def ask(stream_id: str, request: AskRequest, authorization: Optional[str] = Header(None)) -> dict[str, Any]:
        token, tenant = await stream_access(authorization)
        await guarded(manager.authorize, stream_id, token, tenant)
        await guarded(manager.check_ask_rate, stream_id)  # after authorising: strangers cannot drain the bucket
        answer = await guarded(manager.ask, stream_id, token, request.question, request.conversation_id, tenant)
        return answer.to_dict()

    @app.get("/streams/{stream_id}/conversations/{conversation_id}")
    async def conversation(stream_id: str, conversation_id: str, authorization: Optional[str] = Header(None)) -> list[dict[str, Any]]:
        token, tenant = await stream_access(authorization)
        await guarded(manager.authorize, stream_id, token, tenant)
        turns = await guarded(manager.store.turns, stream_id, conversation_id)
        return [t.to_dict() for t in turns]

    @app.post("/streams/{stream_id}/stop")
    async def stop(stream_id: str, authorization: Optional[str] = Header(None)) -> dict[str, str]:
        token, tenant = await stream_access(authorization)
        await guarded(manager.stop_stream, stream_id, token, 10.0, tenant)
        return {"stream_id": stream_id, "status": "stopped"}

    @app.delete("/streams/{stream_id}")
    async def delete(stream_id: str, authorization: Optional[str] = Header(None)) -> dict[str, str]:
        token, tenant = await stream_access(authorization)
        await guarded(manager.delete_stream, stream_id, token, tenant)
        return {"stream_id": stream_id, "status": "deleted"}

    return app
