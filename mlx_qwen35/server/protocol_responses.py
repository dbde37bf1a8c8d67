"""OpenAI Responses requests, the subset Codex uses: input as text or items (messages,
function_call, function_call_output, reasoning), instructions, function tools, tool_choice,
reasoning effort, text.format, and previous_response_id (kept for the server's lifetime)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError
from .generation import Call
from .media import MediaLimits, TempFiles, load_image


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Reasoning(_Model):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(_Model):
    model: str = ""
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    stream: bool = False
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    reasoning: Reasoning | None = None
    previous_response_id: str | None = None
    store: bool = True
    text: dict[str, Any] | None = None

    def function_tools(self) -> list[dict[str, Any]] | None:
        """Function tools in the chat form; the built-in tools (web search and the like) have
        no meaning for a local model and are left out."""
        out = []
        for i, tool in enumerate(self.tools or []):
            if tool.get("type") != "function":
                continue
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise APIError(400, f"tools[{i}].name must be a string", param=f"tools[{i}]")
            out.append(
                {
                    "type": "function",
                    "function": {
                        "name": tool["name"],
                        "description": tool.get("description") or "",
                        "parameters": tool.get("parameters") or {"type": "object"},
                    },
                }
            )
        return out or None

    def response_format(self) -> dict[str, Any] | None:
        fmt = (self.text or {}).get("format")
        if not fmt or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_schema":
            return {"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}}
        return {"type": fmt.get("type")}

    def to_call(
        self, history: list[dict[str, Any]], limits: MediaLimits, temp: TempFiles
    ) -> tuple[Call, list[dict[str, Any]]]:
        """(the Call, the conversation without instructions, to store for a follow-up)."""
        conversation = history + input_messages(self.input, limits)
        # Codex sends developer messages anywhere in the input; the template takes one system
        # turn, first: instructions and every system/developer text go there, in order.
        system = [self.instructions] if self.instructions else []
        system += [m["content"] for m in conversation if m["role"] == "system"]
        messages = [m for m in conversation if m["role"] != "system"]
        if system:
            messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
        thinking = None
        if self.reasoning is not None and self.reasoning.effort is not None:
            thinking = self.reasoning.effort not in ("none", "minimal")
        choice, name = "auto", None
        if isinstance(self.tool_choice, dict):
            choice, name = "function", self.tool_choice.get("name")
        elif self.tool_choice is not None:
            choice = self.tool_choice
        call = Call(
            messages=messages,
            tools=self.function_tools(),
            tool_choice=choice,
            tool_name=name,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=self.response_format(),
            enable_thinking=thinking,
            max_tokens=self.max_output_tokens,
            sampling={"temp": self.temperature, "top_p": self.top_p},
        )
        return call, conversation


def input_messages(items: str | list[dict[str, Any]], limits: MediaLimits) -> list[dict]:
    """Responses input items -> chat messages: an assistant's reasoning, text and function
    calls in a row make one assistant message; each function_call_output a tool message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    assistant: dict[str, Any] | None = None

    def flush() -> None:
        nonlocal assistant
        if assistant is not None:
            out.append(assistant)
            assistant = None

    def current() -> dict[str, Any]:
        nonlocal assistant
        if assistant is None:
            assistant = {"role": "assistant", "content": ""}
        return assistant

    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("system", "user", "assistant"):
                raise APIError(400, f"{where}.role {item.get('role')!r} is not valid", param=where)
            content = _content(item.get("content"), where, limits, allow_media=role == "user")
            if role == "system" and not isinstance(content, str):
                raise APIError(400, f"{where}: a system message holds text only", param=where)
            if role == "assistant":
                message = current()
                message["content"] = (message["content"] + "\n\n" + content).strip()
                continue
            flush()
            out.append({"role": role, "content": content})
        elif kind == "function_call":
            calls = current().setdefault("tool_calls", [])
            calls.append(
                {
                    "id": item.get("call_id") or item.get("id") or f"call_{i}",
                    "type": "function",
                    "function": {
                        "name": item.get("name"),
                        "arguments": item.get("arguments") or "{}",
                    },
                }
            )
        elif kind == "function_call_output":
            flush()
            output = item.get("output")
            if isinstance(output, list):
                output = _content(output, where, limits, allow_media=False)
            out.append(
                {"role": "tool", "tool_call_id": item.get("call_id"), "content": output or ""}
            )
        elif kind == "reasoning":
            flush()
            texts = [c.get("text", "") for c in item.get("content") or []]
            texts = texts or [s.get("text", "") for s in item.get("summary") or []]
            current()["reasoning_content"] = "\n\n".join(t for t in texts if t)
        else:
            raise APIError(400, f"{where}: input item type {kind!r} is not supported", param=where)
    flush()
    return out


def _content(content: Any, where: str, limits: MediaLimits, allow_media: bool) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of parts", param=where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text", "refusal", "summary_text"):
            parts.append({"type": "text", "text": str(part.get("text", part.get("refusal", "")))})
        elif kind == "input_image" and allow_media:
            image = load_image(part.get("image_url"), limits, f"{where}.content[{j}]")
            parts.append({"type": "image", "image": image})
        else:
            raise APIError(
                400, f"{where}.content[{j}]: part type {kind!r} is not supported", param=where
            )
    if any(p["type"] == "image" for p in parts):
        return parts
    return "".join(p["text"] for p in parts)
