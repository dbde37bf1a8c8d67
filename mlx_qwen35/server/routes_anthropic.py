"""POST /v1/messages (whole, or streamed with Anthropic's event types) and
/v1/messages/count_tokens, in the shapes the `anthropic` SDK and Claude Code parse."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import UserError
from ..inputs.render import render_chat
from ..inputs.reply_parser import CallArguments, CallStart, Content, Reasoning
from .app import sse
from .errors import APIError
from .generation import Finished, Usage, events
from .media import TempFiles
from .protocol_anthropic import CountTokensRequest, MessagesRequest
from .routes_openai import collect, prepared_call

router = APIRouter()

STOP_REASONS = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "length": "max_tokens",
    "cancelled": "end_turn",
}


def usage_body(usage: Usage) -> dict[str, Any]:
    # Anthropic counts cache reads apart from the input tokens that were processed.
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def stop_reason(finished: Finished) -> str:
    if finished.stop_sequence is not None:
        return "stop_sequence"
    return STOP_REASONS.get(finished.finish_reason, "end_turn")


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request) -> Any:
    state = request.app.state.server
    name = state.check_model(body.model)
    state, prepared = await prepared_call(request, body.to_call)
    message_id = f"msg_{uuid.uuid4().hex}"
    stream = events(state, prepared, id_prefix=f"toolu_{uuid.uuid4().hex[:12]}")
    if body.stream:
        return StreamingResponse(
            message_events(stream, message_id, name, prepared.prompt_tokens),
            media_type="text/event-stream",
        )
    items = await collect(request, stream)
    content: list[dict[str, Any]] = []
    for e in items:
        kind = {Reasoning: "thinking", Content: "text", CallStart: "tool_use"}.get(type(e))
        if kind == "thinking":
            if not content or content[-1]["type"] != "thinking":
                content.append({"type": "thinking", "thinking": "", "signature": ""})
            content[-1]["thinking"] += e.text
        elif kind == "text":
            if not content or content[-1]["type"] != "text":
                content.append({"type": "text", "text": ""})
            content[-1]["text"] += e.text
        elif kind == "tool_use":
            content.append({"type": "tool_use", "id": e.id, "name": e.name, "input": ""})
        elif isinstance(e, CallArguments):
            content[-1]["input"] += e.text
    for block in content:
        if block["type"] == "tool_use":
            block["input"] = _json_object(block["input"])
    finished = items[-1]
    return JSONResponse(
        {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": name,
            "content": content,
            "stop_reason": stop_reason(finished),
            "stop_sequence": finished.stop_sequence,
            "usage": usage_body(finished.usage),
        }
    )


def _json_object(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


async def message_events(
    stream: AsyncIterator[Any], message_id: str, name: str, prompt_tokens: int
) -> AsyncIterator[str]:
    def event(kind: str, **data: Any) -> str:
        return sse({"type": kind, **data}, event=kind)

    start = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": name,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
    }
    yield event("message_start", message=start)
    index, open_kind = -1, None

    def close() -> list[str]:
        return [event("content_block_stop", index=index)] if open_kind else []

    try:
        async for e in stream:
            if isinstance(e, (Reasoning, Content)):
                kind = "thinking" if isinstance(e, Reasoning) else "text"
                if open_kind != kind:
                    for chunk in close():
                        yield chunk
                    index, open_kind = index + 1, kind
                    block = (
                        {"type": "thinking", "thinking": "", "signature": ""}
                        if kind == "thinking"
                        else {"type": "text", "text": ""}
                    )
                    yield event("content_block_start", index=index, content_block=block)
                delta = (
                    {"type": "thinking_delta", "thinking": e.text}
                    if kind == "thinking"
                    else {"type": "text_delta", "text": e.text}
                )
                yield event("content_block_delta", index=index, delta=delta)
            elif isinstance(e, CallStart):
                for chunk in close():
                    yield chunk
                index, open_kind = index + 1, "tool_use"
                block = {"type": "tool_use", "id": e.id, "name": e.name, "input": {}}
                yield event("content_block_start", index=index, content_block=block)
            elif isinstance(e, CallArguments):
                delta = {"type": "input_json_delta", "partial_json": e.text}
                yield event("content_block_delta", index=index, delta=delta)
            elif isinstance(e, Finished):
                for chunk in close():
                    yield chunk
                open_kind = None
                delta = {"stop_reason": stop_reason(e), "stop_sequence": e.stop_sequence}
                yield event("message_delta", delta=delta, usage=usage_body(e.usage))
                yield event("message_stop")
    except APIError as err:
        yield event("error", error={"type": "api_error", "message": err.message})


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> Any:
    state = request.app.state.server
    state.check_model(body.model)

    def count() -> int:
        with TempFiles() as temp:
            thinking, _ = body.thinking_flag()
            if thinking is None:
                thinking = state.config.enable_thinking
            try:
                rendered = render_chat(
                    state.processor,
                    body.chat(state.config.media, temp),
                    tools=body.tool_list(),
                    enable_thinking=thinking,
                )
            except UserError as e:
                raise APIError(400, str(e), param="messages") from e
            return len(rendered.ids)

    return {"input_tokens": await asyncio.to_thread(count)}
