"""The HTTP routes: POST /v1/chat/completions (whole or streamed as server-sent events ending `data: [DONE]`),
GET /v1/models, GET /health and the chat page at GET /. Every error, the framework's own included (404, 405, a
body over the limit: 413), is OpenAI-shaped JSON; an unexpected one is logged here and answered 500 in that
shape, never with a traceback."""
import asyncio
import hmac
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from config import DecodingSettings
from inference.template import PromptTooLong, fit_prompt
from serving.protocol import (ApiError, chunk, completion, messages_of, new_id, parse_request, settings_of,
                              stops_of, usage)
from serving.scheduler import Job, QueueFull, Scheduler
from serving.worker import Delta, Failed, Finished

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")


@dataclass(frozen=True)
class ServerSettings:
    model_id: str
    defaults: DecodingSettings
    max_seq_len: int
    api_key: str
    max_body_bytes: int


class EventStream(StreamingResponse):
    """Server-sent events from an iterator of (text, last) whose last write also ends the body: Starlette's own
    ends it with one more, empty write, that is one more packet, and one more wake-up of the client, per answer."""

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        async for text, last in self.body_iterator:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": not last})
            ended = ended or last
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is answered 413 before the route reads it (by Content-Length,
    or while it arrives in chunks when the client sends none)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"the request body is over {self.limit} bytes (the server's --max_body_kb)",
                             code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(too_large)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large
            return message
        try:
            await self.app(scope, limited_receive, send)
        except ApiError as error:
            await error_response(error)(scope, receive, send)


def create_app(scheduler: Scheduler, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="train_low_mem serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    tokenizer = scheduler.tokenizer
    with open(PAGE, encoding="utf-8") as handle:
        page = handle.read()
    expected = f"Bearer {settings.api_key}".encode()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = (f"no route {request.method} {request.url.path}" if error.status_code == 404 else
                   f"{request.method} is not allowed on {request.url.path}" if error.status_code == 405 else
                   str(error.detail))
        return error_response(ApiError(error.status_code, message, code="not_found" if error.status_code == 404
                                       else None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        traceback.print_exception(error, file=sys.stderr)
        return error_response(ApiError(500, "the server failed on this request (its log has the details)",
                                       kind="server_error"))

    def authorize(request: Request) -> None:
        if not settings.api_key:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: the key does not leak by timing
            raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(page.replace("__MODEL_ID__", json.dumps(settings.model_id)
                                         ).replace("__DEFAULTS__", json.dumps(page_defaults(settings))))

    @app.get("/health")
    async def health():
        if scheduler.ended:  # a monitor sees that the server cannot answer any more
            return JSONResponse({"status": "error", "model": settings.model_id, "error": scheduler.ended},
                                status_code=503)
        return {"status": "ok", "model": settings.model_id, **scheduler.load()}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(settings.model_id)]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, request: Request):
        authorize(request)
        if model_id != settings.model_id:
            raise ApiError(404, f"model {model_id!r} not found; this server has {settings.model_id!r}",
                           param="model", code="model_not_found")
        return model_card(settings.model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        raw = await request.body()
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
        body = parse_request(payload)
        if body.model != settings.model_id:
            raise ApiError(404, f"model {body.model!r} not found; this server has {settings.model_id!r}",
                           param="model", code="model_not_found")
        messages, decoding, stops = messages_of(body), settings_of(body, settings.defaults), stops_of(body)
        try:
            prompt = fit_prompt(messages, tokenizer, settings.max_seq_len)
        except PromptTooLong as error:
            raise ApiError(400, f"messages: {error} (the server's --max_seq_len)", param="messages",
                           code="context_length_exceeded") from None
        try:
            job = scheduler.submit(prompt.ids, decoding, stops)
        except QueueFull as error:
            raise ApiError(429, str(error), code="rate_limit_exceeded", kind="rate_limit_error",
                           headers={"Retry-After": str(error.retry_after)}) from None
        completion_id = new_id()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(stream(scheduler, job, completion_id, settings.model_id, include_usage),
                               media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await whole(scheduler, job, completion_id, settings.model_id, request)

    return app


def model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "train_low_mem"}


def page_defaults(settings: ServerSettings) -> dict:
    d = settings.defaults
    return {"max_tokens": d.max_new_tokens, "temperature": d.temperature if d.do_sample else 0, "top_p": d.top_p,
            "seed": d.seed if d.seed >= 0 else None, "max_seq_len": settings.max_seq_len}


async def whole(scheduler: Scheduler, job: Job, completion_id: str, model_id: str, request: Request) -> JSONResponse:
    """Wait for the whole answer; a client that hangs up meanwhile cancels it (its place goes to another)."""
    parts = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Finished):
                return JSONResponse(completion(completion_id, model_id, "".join(parts), event.reason,
                                               event.prompt_tokens, event.completion_tokens))
            else:
                raise ApiError(503, event.message, kind="server_error", code="unavailable")
    finally:
        scheduler.cancel(job)  # a no-op once finished; frees the place when the client is gone


async def stream(scheduler: Scheduler, job: Job, completion_id: str, model_id: str, include_usage: bool):
    """Server-sent events: a first chunk with the role, one per text delta, the finish chunk, the usage chunk
    (stream_options.include_usage), then `data: [DONE]`; each write with whether it is the last. A client gone
    cancels this generator: the job too."""
    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
    try:
        # The role chunk goes out with the first events: one write fewer for each request, and nothing is late
        # for it (a client shows nothing before the first text).
        text = [event(chunk(completion_id, model_id, {"role": "assistant", "content": ""}))]
        ended = False
        while not ended:
            # Every event already waiting goes out in one write: a busy server sends fewer, fuller packets.
            items = [await job.events.get()]
            while not job.events.empty():
                items.append(job.events.get_nowait())
            for item in items:
                if isinstance(item, Delta):
                    text.append(event(chunk(completion_id, model_id, {"content": item.text})))
                elif isinstance(item, Finished):
                    text.append(event(chunk(completion_id, model_id, {}, item.reason)))
                    if include_usage:
                        text.append(event(chunk(completion_id, model_id, {}, no_choices=True, with_usage=usage(
                            item.prompt_tokens, item.completion_tokens))))
                    ended = True
                elif isinstance(item, Failed):
                    text.append(event(ApiError(503, item.message, kind="server_error", code="unavailable").body()))
                    ended = True
            yield "".join(text) + ("data: [DONE]\n\n" if ended else ""), ended
            text = []
    finally:
        scheduler.cancel(job)
