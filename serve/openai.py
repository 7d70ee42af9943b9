"""OpenAI-compatible endpoints for a causal-LM bundle: /v1/models, /v1/completions, /v1/chat/completions.

Requests are checked field by field before anything is queued; a problem is a 400 in OpenAI's error shape
naming the field (`param`), so the official clients raise `BadRequestError` with it. `stream: true` answers
with server-sent events ending in `data: [DONE]`. A client that disconnects, streaming or not, has its
sequence taken out of the batch at the next decode step. A full queue is a 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from serve.body import BadRequest, parse_json
from serve.context import ServeContext
from serve.lm import (
    LM_FAMILY,
    RETRY_AFTER_SECONDS,
    Generation,
    LMRuntime,
    QueueFull,
    Sampling,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MAX_STOP_STRINGS = 4
# Fields this server does not implement, with the value that means "not used": anything else is refused
# rather than silently ignored.
UNSUPPORTED: dict[str, object] = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": False,
    "top_logprobs": None,
    "suffix": None,
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "none",
}
CHAT_ROLES = {"system", "developer", "user", "assistant"}


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code
        self.headers = headers or ({"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 429 else None)

    @classmethod
    def of(cls, err: BadRequest) -> OpenAIError:
        """The server's own refusals (loading, wrong family, body limits) in OpenAI's error shape."""
        return cls(
            err.status,
            str(err),
            kind="invalid_request_error" if err.status < 500 else "server_error",
            headers=err.headers,
        )

    def response(self) -> JSONResponse:
        return JSONResponse(
            status_code=self.status,
            headers=self.headers,
            content={"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}},
        )


def _number(payload: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = payload.get(name)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not ((low < value if low_open else low <= value) and value <= high)
    ):
        raise OpenAIError(
            400,
            f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], got {json.dumps(value)[:40]}",
            name,
        )
    return float(value)


def _integer(payload: dict, name: str, low: int) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise OpenAIError(400, f"{name} must be an integer >= {low}, got {json.dumps(value)[:40]}", name)
    return value


def _stop(payload: dict) -> tuple[str, ...]:
    stop = payload.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise OpenAIError(
            400, f"stop must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} non-empty strings", "stop"
        )
    return tuple(stops)


def _common(payload: object, runtime: LMRuntime) -> dict:
    if not isinstance(payload, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str):
        raise OpenAIError(400, "model must be a string: the id GET /v1/models lists", "model")
    if model != runtime.model_id:
        raise OpenAIError(
            404,
            f"The model {model!r} does not exist; this server serves {runtime.model_id!r}",
            "model",
            "invalid_request_error",
            "model_not_found",
        )
    for name, unused in UNSUPPORTED.items():
        if payload.get(name) not in (None, unused):
            raise OpenAIError(400, f"{name} is not supported by this server", name)
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError(400, "stream must be true or false", "stream")
    options = payload.get("stream_options")
    if options is not None and (
        not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)
    ):
        raise OpenAIError(400, 'stream_options must be an object like {"include_usage": true}', "stream_options")
    seed = payload.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise OpenAIError(400, f"seed must be a non-negative integer, got {json.dumps(seed)[:40]}", "seed")
    return {
        "stream": stream,
        "include_usage": bool((options or {}).get("include_usage")),
        "seed": seed,
        "temperature": _number(payload, "temperature", runtime.defaults["temperature"], 0.0, 2.0),
        "top_p": _number(payload, "top_p", runtime.defaults["top_p"], 0.0, 1.0, low_open=True),
        "stop": _stop(payload),
    }


def _completion_prompt(payload: dict, runtime: LMRuntime) -> list[int]:
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return runtime.encode(prompt)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return list(prompt)
    raise OpenAIError(400, "prompt must be a non-empty string or token ids (one prompt per request)", "prompt")


def _chat_prompt(payload: dict, runtime: LMRuntime) -> list[int]:
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "messages must be a non-empty array of {role, content} objects", "messages")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise OpenAIError(400, f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
        ):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise OpenAIError(400, f"messages[{i}].content must be a string (or text parts)", f"messages[{i}].content")
        role = "system" if message["role"] == "developer" else message["role"]
        plain.append({"role": role, "content": content})
    try:
        return runtime.encode(runtime.chat_prompt(plain))
    except Exception as err:  # e.g. a tokenizer without a chat template
        raise OpenAIError(
            400,
            f"this model's chat template cannot render these messages ({err}); POST /v1/completions takes plain text",
            "messages",
        ) from None


def parse_request(payload: object, runtime: LMRuntime, chat: bool) -> tuple[list[int], Sampling, dict]:
    """The prompt's token ids, the sampling and the response options, or `OpenAIError` naming the field."""
    common = _common(payload, runtime)
    assert isinstance(payload, dict)  # _common refused anything else
    ids = (_chat_prompt if chat else _completion_prompt)(payload, runtime)
    where = "messages" if chat else "prompt"
    room = runtime.max_length - len(ids)
    if room < 1:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {runtime.max_length} tokens; the {where} "
            f"has {len(ids)} tokens, which leaves no room for a completion",
            where,
            code="context_length_exceeded",
        )
    names = ["max_tokens", "max_completion_tokens"] if chat else ["max_tokens"]
    given = [(n, v) for n in names if (v := _integer(payload, n, 1)) is not None]
    if given and given[0][1] > room:
        name, value = given[0]
        raise OpenAIError(
            400,
            f"This model's maximum context length is {runtime.max_length} tokens. However, you "
            f"requested {len(ids) + value} tokens ({len(ids)} in the {where}, {value} in the completion)",
            name,
            code="context_length_exceeded",
        )
    max_tokens = given[0][1] if given else (room if chat else min(COMPLETION_DEFAULT_MAX_TOKENS, room))
    sampling = Sampling(max_tokens, common["temperature"], common["top_p"], common["stop"], common["seed"])
    return ids, sampling, common


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _chunks(generation: Generation, request: Request):
    """The generation's chunks until its end; a disconnected client cancels it."""
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        while True:
            nxt = asyncio.ensure_future(generation.chunks.get())
            await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done():  # checked first: chunks may be queued faster than a dead connection is noticed
                nxt.cancel()
                return
            chunk = nxt.result()
            yield chunk
            if chunk.finish_reason is not None or chunk.error is not None:
                return
    finally:
        gone.cancel()
        generation.cancel()  # a no-op once it finished


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def router(ctx: ServeContext) -> APIRouter:
    """The /v1 endpoints over the causal LM being served (it changes on hot reload)."""
    api = APIRouter(prefix="/v1")

    def runtime_now() -> LMRuntime:
        try:
            return cast(LMRuntime, ctx.model(LM_FAMILY).session)  # a causal LM's session is its LMRuntime
        except BadRequest as err:
            raise OpenAIError.of(err) from None

    @api.get("/models")
    async def models():
        try:
            runtime = runtime_now()
        except OpenAIError as err:
            return err.response()
        return {
            "object": "list",
            "data": [
                {
                    "id": runtime.model_id,
                    "object": "model",
                    "created": int(runtime.loaded_at),
                    "owned_by": "modelforge",
                    "max_model_len": runtime.max_length,
                }
            ],
        }

    async def complete(request: Request, chat: bool):
        try:
            runtime = runtime_now()  # one model for the whole request, even across a reload
            try:
                payload = parse_json(await ctx.body(request))
            except BadRequest as err:
                raise OpenAIError.of(err) from None
            ids, sampling, options = await run_in_threadpool(parse_request, payload, runtime, chat)
            try:
                generation = runtime.generate(ids, sampling)
            except QueueFull as err:
                raise OpenAIError(
                    429,
                    f"the server is at capacity ({err}); retry after {RETRY_AFTER_SECONDS} s",
                    kind="rate_limit_error",
                    code="rate_limit_exceeded",
                ) from None
        except OpenAIError as err:
            return err.response()
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": runtime.model_id,
        }
        if options["stream"]:
            return StreamingResponse(
                _stream(generation, request, head, chat, len(ids), options["include_usage"]),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        text, last = [], None
        async for chunk in _chunks(generation, request):
            text.append(chunk.text)
            last = chunk
        if last is None or (last.finish_reason is None and last.error is None):
            return JSONResponse(
                status_code=499,
                content={"error": {"message": "client disconnected", "type": "cancelled", "param": None, "code": None}},
            )
        if last.error is not None:
            return JSONResponse(
                status_code=500,
                content={"error": {"message": last.error, "type": "server_error", "param": None, "code": None}},
            )
        content = "".join(text)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": content}}
            if chat
            else {"index": 0, "text": content, "logprobs": None}
        )
        return {
            **head,
            "choices": [{**choice, "finish_reason": last.finish_reason}],
            "usage": _usage(len(ids), last.completion_tokens),
        }

    async def _stream(
        generation: Generation, request: Request, head: dict, chat: bool, prompt_tokens: int, include_usage: bool
    ):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def event(text: str | None, finish_reason: str | None, first: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None}
            return _sse({**head, "choices": [{**choice, "finish_reason": finish_reason}]})

        if chat:
            yield event(None, None, first=True)
        async for chunk in _chunks(generation, request):
            if chunk.error is not None:
                yield _sse({"error": {"message": chunk.error, "type": "server_error", "param": None, "code": None}})
                return
            if chunk.text:
                yield event(chunk.text, None)
            if chunk.finish_reason is not None:
                yield event(None, chunk.finish_reason)
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, chunk.completion_tokens)})
                yield _sse("[DONE]")

    @api.post("/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @api.post("/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return api
