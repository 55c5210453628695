"""OpenAI's chat completion API as this server speaks it: the request checked field by field (types: 422; values:
400, each naming the field as OpenAI's `param`), the decoding settings a request asks for, and the response
objects (a whole completion, or the chunks of a stream)."""
import time
import uuid
from dataclasses import replace
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from config import DecodingSettings
from inference.template import ROLES, Message


class ApiError(Exception):
    """An error answered as OpenAI shapes it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}
        super().__init__(message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr
    content: Union[StrictStr, list[TextPart]]
    name: StrictStr | None = None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """The fields this server reads; others OpenAI defines (logprobs, tools, ...) are ignored, as OpenAI-compatible
    servers do, except the ones whose meaning it cannot give (n > 1)."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


def parse_request(payload) -> ChatRequest:
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_request")
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("str", "list[", "function")))
        raise ApiError(422, f"{param}: {first['msg']} (got {first.get('input')!r:.80})", param=param,
                       code="invalid_type") from None


def messages_of(request: ChatRequest) -> list[Message]:
    if not request.messages:
        raise ApiError(400, "messages: must hold at least one message", param="messages", code="empty_messages")
    messages = []
    for index, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise ApiError(400, f"messages[{index}].role: {message.role!r} is not one of {', '.join(ROLES)}",
                           param=f"messages[{index}].role", code="invalid_role")
        text = message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)
        messages.append(Message(message.role, text))
    turns = [m for m in messages if m.role != "system"]
    if not turns or turns[-1].role != "user":
        raise ApiError(400, "messages: the last message (after any system ones) must be the user's, to answer it",
                       param="messages", code="invalid_messages")
    return messages


def settings_of(request: ChatRequest, defaults: DecodingSettings) -> DecodingSettings:
    """The server's decoding settings (its flags) with what the request sets: temperature 0 is greedy, above 0
    samples; top_p samples; max_tokens may ask for a shorter answer than the server's longest."""
    if request.n != 1:
        raise ApiError(400, f"n: only 1 answer per request (got {request.n})", param="n", code="unsupported_value")
    settings = defaults
    limit = defaults.max_new_tokens
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(request, name)
        if value is not None:
            if not 1 <= value <= limit:
                raise ApiError(400, f"{name}: {value} is out of range: 1 to {limit} (the server's --max_new_tokens)",
                               param=name, code="invalid_value")
            settings = replace(settings, max_new_tokens=value)
    if request.temperature is not None:
        if not 0 <= request.temperature <= 2:
            raise ApiError(400, f"temperature: {request.temperature} is out of range: 0 to 2", param="temperature",
                           code="invalid_value")
        settings = (replace(settings, do_sample=False) if request.temperature == 0 else
                    replace(settings, do_sample=True, temperature=max(float(request.temperature), 0.01)))
    if request.top_p is not None:
        if not 0 < request.top_p <= 1:
            raise ApiError(400, f"top_p: {request.top_p} is out of range: above 0, at most 1", param="top_p",
                           code="invalid_value")
        if request.temperature != 0:
            settings = replace(settings, do_sample=True, top_p=float(request.top_p))
    if request.seed is not None:
        if not 0 <= request.seed < 2**32:
            raise ApiError(400, f"seed: {request.seed} is out of range: 0 to 2**32-1", param="seed",
                           code="invalid_value")
        settings = replace(settings, seed=request.seed)
    return settings


def stops_of(request: ChatRequest) -> tuple[str, ...]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4 or any(not stop for stop in stops):
        raise ApiError(400, "stop: at most 4 non-empty strings", param="stop", code="invalid_value")
    return tuple(stops)


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(completion_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(completion_id: str, model: str, delta: dict, finish_reason: str | None = None,
          with_usage: dict | None = None, no_choices: bool = False) -> dict:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if no_choices else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                               "logprobs": None}]}
    if with_usage is not None:
        body["usage"] = with_usage
    return body
