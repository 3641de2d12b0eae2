"""The OpenAI-compatible HTTP server: a Starlette app over the EngineThread.

Routes: GET /health (503 while the model loads), GET /metrics (Prometheus text), and under /v1,
behind the Bearer key when one is set: GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (SSE streaming with `data: [DONE]`). Every error is an OpenAI-style
JSON body; a user's mistake is never a 500.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pagedeploy.runtime.engine import RequestError

from .engine_thread import EngineThread, EngineUnavailable
from .metrics import ServerMetrics
from .openai_protocol import (Body, GenerateRequest, ModelContext, ProtocolError, error_body,
                              parse_chat, parse_completion, parse_json)
from .openai_responses import ResponseBuilder, TokenStrings

log = logging.getLogger("pagedeploy.server")


@dataclass
class ServerSettings:
    model_name: str
    max_model_len: int
    vocab_size: int
    max_logprobs: int = 20
    pool_tokens: int | None = None      # num_blocks × block_size
    api_key: str | None = None
    model_root: str | None = None       # shown as `root` in /v1/models
    chat_template: str | None = None    # the profile's Jinja template (else the tokenizer's)
    drain_timeout_s: float = 30.0       # shutdown: how long in-flight requests may still run


class ServerState:
    """What the handlers share: the engine thread, metrics, and the tokenizer-derived helpers
    (built on first use, once the engine has loaded)."""

    def __init__(self, engine: EngineThread, settings: ServerSettings, metrics: ServerMetrics):
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.created = int(time.time())
        self._context: ModelContext | None = None
        self._tokens: TokenStrings | None = None

    def context(self) -> ModelContext:
        self.engine.check_available()
        if self._context is None:
            s = self.settings
            tokenizer = self.engine.engine.tokenizer
            self._context = ModelContext(s.model_name, s.max_model_len, s.max_logprobs,
                                         s.vocab_size, tokenizer, s.pool_tokens, s.chat_template)
            self._tokens = TokenStrings(tokenizer)
        return self._context

    @property
    def tokens(self) -> TokenStrings:
        self.context()
        return self._tokens


# ---- errors and auth -------------------------------------------------------------------------

def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def _exception_response(e: Exception) -> JSONResponse:
    if isinstance(e, ProtocolError):
        return JSONResponse(e.body(), status_code=e.status)
    if isinstance(e, RequestError):
        return error_response(400, e.message, param=e.param)
    if isinstance(e, EngineUnavailable):
        return error_response(503, str(e), type="service_unavailable", code="engine_unavailable")
    raise e


def authorized(request: Request, api_key: str | None) -> bool:
    if not api_key:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not reveal how much of the key was right
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def protected(state: ServerState, handler: Callable) -> Callable:
    async def guarded(request: Request) -> Response:
        if not authorized(request, state.settings.api_key):
            return error_response(401, "Invalid or missing API key; send 'Authorization: Bearer <key>'.",
                                  code="invalid_api_key")
        try:
            return await handler(state, request)
        except (ProtocolError, RequestError, EngineUnavailable) as e:
            return _exception_response(e)
    return guarded


# ---- handlers --------------------------------------------------------------------------------

async def health(state: ServerState, request: Request) -> Response:
    status = state.engine.state
    return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)


async def metrics(state: ServerState, request: Request) -> Response:
    return Response(state.metrics.render(), headers={"Content-Type": state.metrics.content_type})


def _model_card(state: ServerState) -> dict:
    s = state.settings
    return {"id": s.model_name, "object": "model", "created": state.created, "owned_by": "pagedeploy",
            "root": s.model_root or s.model_name, "parent": None, "max_model_len": s.max_model_len}


async def list_models(state: ServerState, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(state: ServerState, request: Request) -> Response:
    model = request.path_params["model"]
    if model != state.settings.model_name:
        return error_response(404, f"The model `{model}` does not exist; this server serves "
                                   f"`{state.settings.model_name}`.", param="model", code="model_not_found")
    return JSONResponse(_model_card(state))


async def completions(state: ServerState, request: Request) -> Response:
    return await _generate(state, request, parse_completion)


async def chat_completions(state: ServerState, request: Request) -> Response:
    return await _generate(state, request, parse_chat)


async def _generate(state: ServerState, request: Request,
                    parse: Callable[[Body, ModelContext], GenerateRequest]) -> Response:
    body = parse_json(await request.body())
    req = parse(body, state.context())
    builder = ResponseBuilder(req, state.tokens)
    if req.stream:
        return StreamingResponse(_sse(state, req, builder), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _until_disconnect(request, _collect(state, req, builder))


async def _collect(state: ServerState, req: GenerateRequest, builder: ResponseBuilder) -> Response:
    finals = {}
    async for out in state.engine.generate(req.engine_requests()):
        if out.finished:
            finals[req.prompt_index(out.request_id)] = out
    return JSONResponse(builder.response(finals))


async def _until_disconnect(request: Request, work) -> Response:
    """Run `work`, but cancel it (which aborts its engine requests and frees their blocks) as soon
    as the client goes away: Starlette does not do that for non-streaming responses."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_disconnect(request))
    done, _ = await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    if work_task in done:
        watch_task.cancel()
        try:
            return work_task.result()
        except (ProtocolError, RequestError, EngineUnavailable) as e:
            return _exception_response(e)
    work_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work_task
    return Response(status_code=499)   # nobody reads it; nginx's "client closed request"


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _sse(state: ServerState, req: GenerateRequest, builder: ResponseBuilder) -> AsyncIterator[bytes]:
    """SSE body. Starlette cancels this generator when the client disconnects; the cancellation
    runs EngineThread.generate's cleanup, which aborts the requests at once."""
    for chunk in builder.role_chunks():
        yield _sse_event(chunk)
    try:
        async for out in state.engine.generate(req.engine_requests()):
            events = [_sse_event(c) for c in builder.chunks(req.prompt_index(out.request_id), out)]
            if events:
                yield b"".join(events)
    except (ProtocolError, RequestError, EngineUnavailable) as e:
        response = _exception_response(e)
        yield b"data: " + response.body + b"\n\n"
    else:
        if req.include_usage:
            yield _sse_event(builder.usage_chunk())
    yield b"data: [DONE]\n\n"


# ---- app -------------------------------------------------------------------------------------

async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}.", type=kind)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "Internal server error; see the server log.", type="internal_server_error")


def build_app(engine: EngineThread, settings: ServerSettings, metrics_: ServerMetrics) -> Starlette:
    state = ServerState(engine, settings, metrics_)

    def open_route(path, handler, methods):
        async def endpoint(request: Request) -> Response:
            return await handler(state, request)
        return Route(path, endpoint, methods=methods)

    def v1_route(path, handler, methods):
        return Route(path, protected(state, handler), methods=methods)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has already stopped accepting and waited for open connections (bounded by
        # timeout_graceful_shutdown); whatever is still in flight gets the drain timeout, then stops.
        await engine.drain(settings.drain_timeout_s)

    routes = [
        open_route("/health", health, ["GET"]),
        open_route("/metrics", metrics, ["GET"]),
        v1_route("/v1/models", list_models, ["GET"]),
        v1_route("/v1/models/{model:path}", get_model, ["GET"]),
        v1_route("/v1/completions", completions, ["POST"]),
        v1_route("/v1/chat/completions", chat_completions, ["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.server = state
    return app
