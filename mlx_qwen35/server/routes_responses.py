"""POST /v1/responses (whole, or streamed as response.* events) and GET /v1/responses/{id}."""

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
from .generation import Finished, Usage, events, prepare
from .media import TempFiles
from .protocol_responses import ResponsesRequest
from .routes_openai import collect

router = APIRouter()


class Output:
    """The output items of one response as events arrive (reasoning, message, function calls),
    yielding the stream events that go with them."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None

    def add(self, e: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if isinstance(e, (Reasoning, Content)):
            kind = "reasoning" if isinstance(e, Reasoning) else "message"
            if self.open is None or self.open["type"] != kind:
                out += self.close()
                out += self._start(_new_item(kind))
                if kind == "message":
                    part = {"type": "output_text", "text": "", "annotations": []}
                    out.append(self._part_event("response.content_part.added", part))
            item = self.open
            part = item["content"][0]
            part["text"] += e.text
            name = (
                "response.reasoning_text.delta"
                if kind == "reasoning"
                else ("response.output_text.delta")
            )
            out.append({"type": name, **self._where(), "content_index": 0, "delta": e.text})
        elif isinstance(e, CallStart):
            out += self.close()
            item = {
                "type": "function_call",
                "id": f"fc_{uuid.uuid4().hex}",
                "call_id": e.id,
                "name": e.name,
                "arguments": "",
                "status": "in_progress",
            }
            out += self._start(item)
        elif isinstance(e, CallArguments):
            self.open["arguments"] += e.text
            out.append(
                {"type": "response.function_call_arguments.delta", **self._where(), "delta": e.text}
            )
        return out

    def close(self) -> list[dict[str, Any]]:
        item, out = self.open, []
        if item is None:
            return out
        where = self._where()
        if item["type"] == "message":
            part = item["content"][0]
            out.append(
                {
                    "type": "response.output_text.done",
                    **where,
                    "content_index": 0,
                    "text": part["text"],
                }
            )
            out.append(self._part_event("response.content_part.done", part))
        elif item["type"] == "reasoning":
            out.append(
                {
                    "type": "response.reasoning_text.done",
                    **where,
                    "content_index": 0,
                    "text": item["content"][0]["text"],
                }
            )
        else:
            out.append(
                {
                    "type": "response.function_call_arguments.done",
                    **where,
                    "arguments": item["arguments"],
                }
            )
        item["status"] = "completed"
        out.append(
            {"type": "response.output_item.done", "output_index": len(self.items) - 1, "item": item}
        )
        self.open = None
        return out

    def _start(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self.items.append(item)
        self.open = item
        return [
            {
                "type": "response.output_item.added",
                "output_index": len(self.items) - 1,
                "item": item,
            }
        ]

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1}

    def _part_event(self, name: str, part: dict[str, Any]) -> dict[str, Any]:
        return {"type": name, **self._where(), "content_index": 0, "part": part}


def _new_item(kind: str) -> dict[str, Any]:
    if kind == "reasoning":
        return {
            "type": "reasoning",
            "id": f"rs_{uuid.uuid4().hex}",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": ""}],
            "status": "in_progress",
        }
    return {
        "type": "message",
        "id": f"msg_{uuid.uuid4().hex}",
        "status": "in_progress",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "", "annotations": []}],
    }


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def reply_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output items as the assistant message a follow-up request continues from."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in items:
        if item["type"] == "reasoning":
            message["reasoning_content"] = item["content"][0]["text"]
        elif item["type"] == "message":
            message["content"] += item["content"][0]["text"]
        else:
            message.setdefault("tool_calls", []).append(
                {
                    "id": item["call_id"],
                    "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]},
                }
            )
    return [message]


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request) -> Any:
    state = request.app.state.server
    name = state.check_model(body.model)
    state.check_capacity()
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        stored = state.responses.get(body.previous_response_id)
        if stored is None:
            raise APIError(
                404,
                f"no response {body.previous_response_id!r} on this server (responses are kept "
                "while it runs); send the whole conversation instead",
                param="previous_response_id",
            )
        history = stored["conversation"]

    def work() -> Any:
        with TempFiles() as temp:
            call, conversation = body.to_call(history, state.config.media, temp)
            return prepare(state, call), conversation

    prepared, conversation = await asyncio.to_thread(work)
    response_id = f"resp_{uuid.uuid4().hex}"
    base = {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "model": name,
        "status": "in_progress",
        "output": [],
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "metadata": {},
        "parallel_tool_calls": body.parallel_tool_calls,
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "temperature": body.temperature,
        "top_p": body.top_p,
        "previous_response_id": body.previous_response_id,
        "text": body.text or {"format": {"type": "text"}},
        "usage": None,
    }
    stream = events(state, prepared, id_prefix=f"call_{uuid.uuid4().hex[:8]}")

    def finish(output: Output, e: Finished) -> dict[str, Any]:
        done = dict(base, output=output.items, usage=usage_body(e.usage))
        done["status"] = "incomplete" if e.finish_reason == "length" else "completed"
        if e.finish_reason == "length":
            done["incomplete_details"] = {"reason": "max_output_tokens"}
        if body.store:
            state.store_response(
                response_id,
                {"response": done, "conversation": conversation + reply_messages(output.items)},
            )
        return done

    if not body.stream:
        output = Output()
        items = await collect(request, stream)
        for e in items:
            output.add(e)
        output.close()
        return JSONResponse(finish(output, items[-1]))

    async def chunks() -> AsyncIterator[str]:
        number = 0

        def event(data: dict[str, Any]) -> str:
            nonlocal number
            number += 1
            return sse({**data, "sequence_number": number - 1}, event=data["type"])

        output = Output()
        yield event({"type": "response.created", "response": base})
        yield event({"type": "response.in_progress", "response": base})
        try:
            async for e in stream:
                if isinstance(e, Finished):
                    for data in output.close():
                        yield event(data)
                    yield event({"type": "response.completed", "response": finish(output, e)})
                else:
                    for data in output.add(e):
                        yield event(data)
        except APIError as err:
            failed = dict(
                base, status="failed", error={"code": "server_error", "message": err.message}
            )
            yield event({"type": "response.failed", "response": failed})

    return StreamingResponse(chunks(), media_type="text/event-stream")


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> Any:
    stored = request.app.state.server.responses.get(response_id)
    if stored is None:
        raise APIError(404, f"no response {response_id!r} on this server", param="response_id")
    return stored["response"]
