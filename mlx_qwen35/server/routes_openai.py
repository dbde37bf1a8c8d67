"""POST /v1/chat/completions and /v1/completions, whole or streamed (SSE chunks, then
`data: [DONE]`), in the shapes the `openai` SDK parses."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..inputs.reply_parser import CallArguments, CallStart, Content, Reasoning
from .app import sse
from .errors import APIError
from .generation import Call, Finished, TokenInfo, Usage, events, prepare
from .media import TempFiles
from .protocol_openai import ChatCompletionRequest, CompletionRequest

router = APIRouter()


async def prepared_call(request: Request, build: Any) -> tuple[Any, Any]:
    """(state, Prepared): the request translated (media fetched) and rendered off the event
    loop, after the capacity check."""
    state = request.app.state.server
    state.check_capacity()

    def work() -> Any:
        with TempFiles() as temp:
            return prepare(state, build(state.config.media, temp))

    return state, await asyncio.to_thread(work)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = request.app.state.server
    name = state.check_model(body.model)
    state, prepared = await prepared_call(request, body.to_call)
    reply_id = f"chatcmpl-{uuid.uuid4().hex}"
    stream = events(state, prepared, id_prefix=f"call_{uuid.uuid4().hex[:8]}")
    if body.stream:
        chunks = chat_chunks(stream, reply_id, name, body.include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream")
    return JSONResponse(await chat_whole(request, stream, reply_id, name))


async def collect(request: Request, stream: AsyncIterator[Any]) -> list[Any]:
    """All events of a whole (non-streamed) reply; the request is cancelled in the engine if
    the client disconnects while it waits."""

    async def gather() -> list[Any]:
        return [event async for event in stream]

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
    try:
        finished, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task not in finished:
        # Cancelling the gathering closes the event stream, which cancels the engine request.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise APIError(499, "the client closed the connection")
    return task.result()


async def chat_whole(
    request: Request, stream: AsyncIterator[Any], reply_id: str, name: str
) -> dict[str, Any]:
    items = await collect(request, stream)
    reasoning = "".join(e.text for e in items if isinstance(e, Reasoning))
    content = "".join(e.text for e in items if isinstance(e, Content))
    calls: dict[int, dict[str, Any]] = {}
    for e in items:
        if isinstance(e, CallStart):
            calls[e.index] = {
                "id": e.id,
                "type": "function",
                "function": {"name": e.name, "arguments": ""},
            }
        elif isinstance(e, CallArguments):
            calls[e.index]["function"]["arguments"] += e.text
    finished = items[-1]
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if reasoning:
        message["reasoning_content"] = reasoning
        message["reasoning"] = reasoning
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    tokens = [e for e in items if isinstance(e, TokenInfo)]
    choice = {
        "index": 0,
        "message": message,
        "logprobs": {"content": [logprob_entry(t) for t in tokens]} if tokens else None,
        "finish_reason": finished.finish_reason,
    }
    return {
        "id": reply_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [choice],
        "usage": usage_body(finished.usage),
    }


async def chat_chunks(
    stream: AsyncIterator[Any], reply_id: str, name: str, include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse(
            {
                "id": reply_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [choice],
            }
        )

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for e in stream:
            if isinstance(e, Reasoning):
                yield chunk({"reasoning_content": e.text, "reasoning": e.text})
            elif isinstance(e, Content):
                yield chunk({"content": e.text})
            elif isinstance(e, CallStart):
                fn = {"name": e.name, "arguments": ""}
                yield chunk(
                    {
                        "tool_calls": [
                            {"index": e.index, "id": e.id, "type": "function", "function": fn}
                        ]
                    }
                )
            elif isinstance(e, CallArguments):
                yield chunk({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
            elif isinstance(e, TokenInfo):
                yield chunk({}, logprobs={"content": [logprob_entry(e)]})
            elif isinstance(e, Finished):
                yield chunk({}, finish=e.finish_reason)
                if include_usage:
                    yield sse(
                        {
                            "id": reply_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": name,
                            "choices": [],
                            "usage": usage_body(e.usage),
                        }
                    )
    except APIError as err:
        yield sse({"error": {"message": err.message, "type": "server_error", "code": err.code}})
    yield "data: [DONE]\n\n"


def logprob_entry(t: TokenInfo) -> dict[str, Any]:
    def one(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {**one(t.text, t.logprob), "top_logprobs": [one(x, lp) for x, lp in t.top]}


def legacy_logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
    """The Completions API's log-probabilities: per token, its text, logprob and the top ones."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    state = request.app.state.server
    name = state.check_model(body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "prompt: one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        # A raw prompt is the caller's own template output: its markup is read as markup.
        ids = state.processor.encode(prompt)
    else:
        vocab = state.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        ids = list(prompt)

    def build(limits: Any, temp: Any) -> Call:
        return Call(
            prompt_ids=ids,
            max_tokens=body.max_tokens or 16,
            sampling=body.sampling(),
            stop=body.stops(),
            top_logprobs=body.logprobs,
        )

    state, prepared = await prepared_call(request, build)
    reply_id = f"cmpl-{uuid.uuid4().hex}"
    stream = events(state, prepared)
    created = int(time.time())

    def body_of(
        text: str, finish: str | None, usage: Usage | None, tokens: list[TokenInfo] = ()
    ) -> dict[str, Any]:
        logprobs = legacy_logprobs(tokens) if body.logprobs is not None else None
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        out: dict[str, Any] = {
            "id": reply_id,
            "object": "text_completion",
            "created": created,
            "model": name,
            "choices": [choice],
        }
        if usage is not None:
            out["usage"] = {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            }
        return out

    if not body.stream:
        items = await collect(request, stream)
        text = "".join(e.text for e in items if isinstance(e, Content))
        tokens = [e for e in items if isinstance(e, TokenInfo)]
        return JSONResponse(body_of(text, items[-1].finish_reason, items[-1].usage, tokens))

    async def chunks() -> AsyncIterator[str]:
        async for e in stream:
            if isinstance(e, Content):
                yield sse(body_of(e.text, None, None))
            elif isinstance(e, TokenInfo):
                yield sse(body_of("", None, None, [e]))
            elif isinstance(e, Finished):
                yield sse(body_of("", e.finish_reason, e.usage if body.include_usage else None))
        yield "data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")
