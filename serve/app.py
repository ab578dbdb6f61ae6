"""The HTTP side of qwen2-serve: OpenAI's routes on FastAPI, SSE streaming, auth, errors, metrics.

    POST /v1/completions, POST /v1/chat/completions   (stream: Server-Sent Events, `data: [DONE]` last)
    GET  /v1/models, /v1/models/{id}
    GET  /health    200 once the programs are compiled; 503 while starting or draining
    GET  /metrics   Prometheus text

Every refusal has OpenAI's error body (serve/errors.py). The `/v1` routes need `Authorization:
Bearer KEY` when the server has an API key; /health and /metrics do not (probes and scrapers).
A request whose client goes away, streamed or not, is cancelled, which frees its decode slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import sys
import time
import traceback
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.errors import (
    BodyTooLarge,
    MethodNotAllowed,
    ModelNotFound,
    NotReady,
    RouteNotFound,
    Unauthorized,
    body_of,
    error_body,
    error_headers,
)
from serve.generation import Reply, deltas
from serve.metrics import ServeMetrics
from serve.protocol import Job, parse_chat, parse_completion, parse_json
from serve.requests import Draining, ServeError
from serve.responses import Responder
from serve.served_model import ServedModel

DEFAULT_MAX_REQUEST_BYTES = 16 << 20  # a 128k-token prompt as JSON ids is ~1 MB


@dataclasses.dataclass
class AppState:
    """What the routes share. `model` and `scheduler` are None until the engine is warm."""

    model_name: str
    metrics: ServeMetrics
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    model: ServedModel | None = None
    scheduler: Any = None
    draining: bool = False
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and not self.draining and bool(self.scheduler.ready)

    def serving(self):
        """(model, scheduler), or the 503 that says why requests cannot run now."""
        if self.draining:
            raise Draining("the server is shutting down; not accepting requests")
        if self.scheduler is None or self.model is None:
            raise NotReady("the model is still loading; retry when GET /health answers 200")
        return self.model, self.scheduler


def create_app(state: AppState) -> FastAPI:
    app = FastAPI(title="qwen2-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, error: ServeError):
        state.metrics.requests_refused.labels(status=str(error.status)).inc()
        return JSONResponse(body_of(error), status_code=error.status, headers=error_headers(error.status))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            wrapped: ServeError = RouteNotFound(f"no route {request.method} {request.url.path}")
        elif error.status_code == 405:
            wrapped = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        else:
            wrapped = ServeError(str(error.detail))
            wrapped.status = error.status_code
        return await _serve_error(request, wrapped)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception):
        traceback.print_exception(error, file=sys.stderr)
        body = error_body(500, f"internal error: {type(error).__name__}: {error}")
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        if state.ready:
            return JSONResponse({"status": "ok"})
        status = "draining" if state.draining else "starting"
        return JSONResponse({"status": status}, status_code=503, headers=error_headers(503))

    @app.get("/metrics")
    async def metrics():
        stats = state.scheduler.stats() if state.scheduler is not None else None
        return Response(state.metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorize(state))])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.model_name:
            raise ModelNotFound(f"the model `{model_id}` does not exist (this server has `{state.model_name}`)")
        return _model_card(state)

    @v1.post("/completions")
    async def completions(request: Request):
        return await _answer(state, request, parse_completion)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await _answer(state, request, parse_chat)

    app.include_router(v1)
    return app


def _authorize(state: AppState):
    def check(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise Unauthorized("missing or wrong API key: send the header `Authorization: Bearer <key>`")

    return check


def _model_card(state: AppState) -> dict[str, Any]:
    card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "qwen2-jax"}
    if state.model is not None:
        card["max_model_len"] = state.model.max_model_len
    return card


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise BodyTooLarge(f"the request body has {int(length)} bytes, more than the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _answer(state: AppState, request: Request, parse) -> Response:
    arrival = time.perf_counter()
    model, scheduler = state.serving()
    jobs: list[Job] = parse(parse_json(await _read_body(request, state.max_request_bytes)), model)
    capacity = scheduler.max_queue + scheduler.engine.max_batch_size
    if len(jobs) > capacity:  # it could never be accepted whole: a 503 would invite retrying forever
        raise ServeError(
            f"prompt holds {len(jobs)} prompts, more than this server holds at once ({capacity}: "
            "--max-batch-size + --max-queue); send smaller batches",
            param="prompt",
        )
    handles = []
    try:
        for job in jobs:
            handles.append(scheduler.submit(job.request))
    except ServeError:  # a batch is accepted whole or not at all
        for handle in handles:
            handle.cancel()
        raise
    state.metrics.prompt_tokens.inc(sum(len(job.prompt_ids) for job in jobs))
    responder = Responder(jobs, model)
    runs = [deltas(h, job, model, state.metrics, arrival) for h, job in zip(handles, jobs)]
    if jobs[0].stream:
        return StreamingResponse(
            _sse(request, handles, jobs[0].include_usage, runs, responder),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(_cancel_all, handles),  # idempotent; covers a stream closed before it began
        )
    async with _cancel_on_disconnect(request, handles):
        replies = await asyncio.gather(*(_whole(run) for run in runs))
    return JSONResponse(responder.response(list(replies)))


def _cancel_all(handles) -> None:
    for handle in handles:
        handle.cancel()


async def _whole(run) -> Reply:
    reply = Reply()
    async for delta in run:
        reply.add(delta)
    return reply


def _sse_data(body: Any) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _sse(request: Request, handles, include_usage: bool, runs, responder: Responder):
    completion_tokens = 0
    async with _cancel_on_disconnect(request, handles):
        try:
            for chunk in responder.first_chunks():
                yield _sse_data(chunk)
            async for i, delta in _merged(runs):
                completion_tokens += len(delta.token_ids)
                chunk = responder.chunk(i, delta)
                if chunk is not None:
                    yield _sse_data(chunk)
            if include_usage:
                yield _sse_data(responder.usage_chunk(completion_tokens))
        except Exception as e:  # the status line is sent: report in the stream, as vLLM does
            traceback.print_exception(e, file=sys.stderr)
            yield _sse_data(error_body(500, f"internal error: {type(e).__name__}: {e}"))
        yield b"data: [DONE]\n\n"


async def _merged(runs):
    """(index, delta) from every run, in the order they come."""
    if len(runs) == 1:
        async for delta in runs[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, run):
        try:
            async for delta in run:
                await queue.put((i, delta))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    try:
        remaining = len(tasks)
        while remaining:
            i, delta = await queue.get()
            if delta is done:
                remaining -= 1
            else:
                yield i, delta
        for task in tasks:
            task.result()  # a run's error
    finally:
        for task in tasks:
            task.cancel()


@contextlib.asynccontextmanager
async def _cancel_on_disconnect(request: Request, handles):
    """Cancel the requests when the client disconnects while the body runs (the body was read
    already, so the next ASGI message is the disconnect)."""

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                _cancel_all(handles)
                return

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
