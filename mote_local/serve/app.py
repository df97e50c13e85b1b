"""The routes of `mote serve`: OpenAI's chat and text completions (plain and SSE streaming), models, health
and the loaded steering profiles. Errors are OpenAI-shaped JSON with the right HTTP status.

The routes turn a request into a scheduler Job (prompt tokens, sampling, steering, routing) and its events
into OpenAI responses; generation, steering and routing happen in the library and the scheduler's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mote_local.engine import Model
from mote_local.errors import ProfileError
from mote_local.serve.sampling import SamplingParams
from mote_local.serve.scheduler import Done, Failed, Job, Scheduler, ServerBusy, Text
from mote_local.serve.settings import Settings
from mote_local.serve.steering import load_profiles, request_profile
from mote_local.serve.types import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ErrorBody,
    ErrorDetail,
    Usage,
    _Sampling,
)
from mote_local.steering.profile import Profile, entry_to_json

__all__ = ["Backend", "create_app"]

log = logging.getLogger("mote.serve")

MAX_STOP = 4  # OpenAI's limit on stop strings
POLL_S = 0.25  # how often a waiting request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def error_response(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------------ backend

class Backend:
    """The model, its named profiles and the scheduler that one server runs. Close it to free the engine."""

    def __init__(self, settings: Settings, model: Model | None = None):
        self.settings = settings
        self._own_model = model is None
        self.model = model or Model(settings.model, **settings.placement, verbose=settings.verbose)
        try:
            self.layout = self.model.layout.require_moe()
            self.profiles: dict[str, Profile] = load_profiles(settings.profiles, self.layout,
                                                              force=settings.force_profiles)
            self.scheduler = Scheduler(self.model, n_ctx=settings.n_ctx, n_seq_max=settings.parallel,
                                       n_batch=settings.n_batch, n_threads=settings.threads,
                                       max_queue=settings.max_queue)
        except BaseException:
            if self._own_model:
                self.model.close()
            raise
        self.fingerprint = self.model.fingerprint
        self.created = int(time.time())

    def close(self) -> None:
        self.scheduler.close()
        if self._own_model:
            self.model.close()

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # requests -> jobs
    def job(self, body: _Sampling, prompt: list[int], deliver) -> Job:
        """A scheduler job for a validated request body (an ApiError for what the schema cannot check)."""
        slot_ctx = self.scheduler.slot_ctx
        if len(prompt) > slot_ctx:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens but a request here holds at most {slot_ctx} "
                                f"(the context -c {self.settings.n_ctx} split over --parallel "
                                f"{self.scheduler.session.n_seq_max} slots): shorten the prompt or start the server "
                                "with a larger -c", code="context_length_exceeded", param="messages")
        bad = [t for t in prompt if not 0 <= t < self.model.n_vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is out of range for a vocabulary of {self.model.n_vocab}",
                           param="prompt")
        try:
            profile = request_profile(body.steering, self.layout, self.fingerprint, self.profiles)
        except ProfileError as err:
            raise ApiError(400, str(err), code="invalid_steering", param="steering") from None
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        room = slot_ctx - len(prompt)
        max_tokens = min(asked, room) if asked else room
        if max_tokens < 1:
            raise ApiError(400, f"the prompt fills the {slot_ctx} positions a request holds here: no room to "
                                "generate; shorten it", code="context_length_exceeded", param="messages")
        if body.routing_detail == "tokens" and not body.return_routing:
            raise ApiError(400, "routing_detail 'tokens' needs return_routing: true", param="routing_detail")
        return Job(prompt=prompt, max_tokens=max_tokens, deliver=deliver, params=self._sampling(body),
                   stop=_stops(body.stop), profile=profile,
                   routing=body.routing_detail if body.return_routing else None)

    def _sampling(self, body: _Sampling) -> SamplingParams:
        bias: dict[int, float] = {}
        for key, value in (body.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise ApiError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias") from None
            if not 0 <= token < self.model.n_vocab:
                raise ApiError(400, f"logit_bias: token id {token} is out of range for a vocabulary of "
                                    f"{self.model.n_vocab}", param="logit_bias")
            if not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias: {value} for token {token} is outside [-100, 100]",
                               param="logit_bias")
            bias[token] = value
        return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              logit_bias=bias)


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop: a stop string is empty", param="stop")
    return stops


# ------------------------------------------------------------------------------------------------ middleware

class Guard:
    """ASGI middleware: the API key on /v1/* and the request body size limit, before any parsing."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.key = settings.api_key
        self.limit = settings.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.key is not None and scope["path"].startswith("/v1") and not self._authorised(headers):
            return await error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                        "authentication_error", "invalid_api_key",
                                        headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await self._too_large(scope, receive, send)
        seen = 0
        started = over = False

        async def counting_receive():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if over:
                return  # the app's answer to a body it could not read is replaced by the 413 below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._too_large(scope, receive, send)

    def _authorised(self, headers: dict[str, str]) -> bool:
        given = headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
        return secrets.compare_digest(token.encode(), self.key.encode())

    async def _too_large(self, scope, receive, send):
        await error_response(413, f"the request body is larger than {self.limit} bytes",
                             code="request_too_large")(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


# ------------------------------------------------------------------------------------------------ app

def create_app(backend: Backend) -> FastAPI:
    """The ASGI app serving `backend`; its lifespan starts and stops the scheduler's thread (the backend's
    owner closes the backend)."""
    settings, scheduler, model = backend.settings, backend.scheduler, backend.model

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="mote serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, settings=settings)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return error_response(err.status, err.message, err.type, err.code, err.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        message, param = _validation_message(err.errors())
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(err.status_code, messages.get(err.status_code, str(err.detail)),
                              code="not_found" if err.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        log.exception("request failed")
        return error_response(500, f"internal error: {type(err).__name__}: {err}", "server_error")

    @app.get("/health")
    async def health():
        if scheduler.unavailable:
            return JSONResponse({"status": "error", "message": scheduler.unavailable}, status_code=503)
        return {"status": "ok", **scheduler.status()}

    @app.get("/v1/models")
    async def models():
        layout = backend.layout
        return {"object": "list", "data": [{
            "id": settings.model_id, "object": "model", "created": backend.created, "owned_by": "mote-local",
            "meta": {"path": str(model.path), "arch": layout.arch, "n_layer": layout.n_layer,
                     "moe_layers": list(layout.moe_layers), "n_expert": layout.n_expert,
                     "n_expert_used": layout.n_expert_used, "n_ctx_per_request": scheduler.slot_ctx,
                     "parallel": scheduler.session.n_seq_max}}]}

    @app.get("/v1/profiles")
    async def profiles():
        return {"object": "list", "data": [{
            "id": name, "object": "profile", "name": p.name, "description": p.description,
            "strength": p.strength, "entries": [entry_to_json(e) for e in p.entries],
            "file": str(settings.profiles[name])} for name, p in backend.profiles.items()]}

    def require_engine() -> None:
        if backend.scheduler.unavailable:
            raise ApiError(503, backend.scheduler.unavailable, "server_error", "model_lost")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        require_engine()
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:  # the one conversation -> tokens path every command takes (template, and BOS where the vocabulary asks)
            prompt = model.prompt_tokens(messages)
        except Exception as err:  # the template's own raise_exception, or a template bug
            raise ApiError(400, f"the model's chat template refused the messages: {err}", param="messages") from None
        return await _respond(backend, body, prompt, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        require_engine()
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, f"one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        tokens = model.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return await _respond(backend, body, tokens, request, chat=False)

    return app


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line for pydantic's errors: the first few, each with the field it concerns."""
    parts, param = [], None
    for e in errors[:3]:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        if e.get("type") != "json_invalid":
            param = param or (loc[0] if loc else None)
        if e.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
        elif e.get("type") == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        elif e.get("type") == "missing":
            parts.append(f"{where}: required")
        else:
            parts.append(f"{where}: {e.get('msg')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, param


# ------------------------------------------------------------------------------------------------ responses

@dataclass
class _Reply:
    id: str
    created: int
    model: str
    chat: bool


async def _respond(backend: Backend, body: _Sampling, prompt: list[int], request: Request, *, chat: bool):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def deliver(event) -> None:  # called from the scheduler's thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = backend.job(body, prompt, deliver)
    try:
        backend.scheduler.submit(job)
    except ServerBusy as err:
        return error_response(503, str(err), "server_error", "server_busy", headers={"Retry-After": "1"})
    reply = _Reply(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()),
                   backend.settings.model_id, chat)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _JobStream(job, _stream(reply, job, events, request, include_usage))
    try:
        return await _collect(reply, events, request)
    finally:
        job.cancel()  # a no-op once done; frees the slot when the client left or the server is stopping


class _Listener:
    """A job's events for one client; stops (None) once the client has disconnected, which it checks every
    POLL_S, also while events keep coming."""

    def __init__(self, events: asyncio.Queue, request: Request):
        self.events, self.request = events, request
        self.loop = asyncio.get_running_loop()
        self.checked = self.loop.time()

    async def next(self):
        while True:
            waited = self.loop.time() - self.checked
            if waited >= POLL_S:
                self.checked = self.loop.time()
                if await self.request.is_disconnected():
                    return None
                waited = 0.0
            try:
                return await asyncio.wait_for(self.events.get(), POLL_S - waited)
            except asyncio.TimeoutError:
                continue


async def _collect(reply: _Reply, events: asyncio.Queue, request: Request):
    parts: list[str] = []
    listener = _Listener(events, request)
    while True:
        event = await listener.next()
        if event is None:
            return error_response(499, "the client closed the request", code="client_closed")
        if isinstance(event, Text):
            parts.append(event.text)
        elif isinstance(event, Failed):
            return error_response(event.status, event.message, event.type, event.code)
        elif isinstance(event, Done):
            text = "".join(parts)
            usage = Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                          total_tokens=event.prompt_tokens + event.completion_tokens)
            if reply.chat:
                out = ChatCompletion(id=reply.id, created=reply.created, model=reply.model, usage=usage,
                                     routing=event.routing, choices=[ChatChoice(
                                         message=AssistantMessage(content=text), finish_reason=event.finish_reason)])
            else:
                out = Completion(id=reply.id, created=reply.created, model=reply.model, usage=usage,
                                 routing=event.routing,
                                 choices=[CompletionChoice(text=text, finish_reason=event.finish_reason)])
            return JSONResponse(out.model_dump(exclude_none=True))


class _JobStream(StreamingResponse):
    """An SSE response that cancels its job however the stream ends (client gone, server stopping)."""

    def __init__(self, job: Job, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def _sse(obj: Any) -> str:
    data = obj.model_dump(exclude_none=True) if hasattr(obj, "model_dump") else obj
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _chunk(reply: _Reply, text: str | None = None, *, role: bool = False, finish: str | None = None, **extra):
    if reply.chat:
        delta = Delta(role="assistant" if role else None, content=text)
        return ChatCompletionChunk(id=reply.id, created=reply.created, model=reply.model,
                                   choices=[ChatChunkChoice(delta=delta, finish_reason=finish)], **extra)
    return Completion(id=reply.id, created=reply.created, model=reply.model,
                      choices=[CompletionChoice(text=text or "", finish_reason=finish)], **extra)


async def _stream(reply: _Reply, job: Job, events: asyncio.Queue, request: Request,
                  include_usage: bool) -> AsyncIterator[str]:
    if reply.chat:
        yield _sse(_chunk(reply, "", role=True))
    listener = _Listener(events, request)
    while True:
        event = await listener.next()
        if event is None:
            job.cancel()
            return
        if isinstance(event, Text):
            yield _sse(_chunk(reply, event.text))
        elif isinstance(event, Failed):
            yield _sse(ErrorBody(error=ErrorDetail(message=event.message, type=event.type, code=event.code)))
            return
        elif isinstance(event, Done):
            yield _sse(_chunk(reply, finish=event.finish_reason, routing=event.routing))
            if include_usage:
                usage = Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                              total_tokens=event.prompt_tokens + event.completion_tokens)
                usage_chunk = _chunk(reply, usage=usage)
                usage_chunk.choices = []
                yield _sse(usage_chunk)
            yield "data: [DONE]\n\n"
            return
