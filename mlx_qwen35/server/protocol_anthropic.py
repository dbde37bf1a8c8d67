"""Anthropic Messages requests (what Claude Code and the `anthropic` SDK send) and their
translation into a Call: system, text / image / document / tool_use / tool_result / thinking
blocks, tools, tool_choice, thinking, stop_sequences."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError
from .generation import Call
from .media import MediaLimits, TempFiles, load_image


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AnthropicMessage(_Model):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(_Model):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    type: str | None = None


class ToolChoice(_Model):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(_Model):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)


class CountTokensRequest(_Model):
    model: str = ""
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    thinking: Thinking | None = None

    def chat(self, limits: MediaLimits, temp: TempFiles) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        system = _system_text(self.system)
        if system is not None:
            out.append({"role": "system", "content": system})
        for i, m in enumerate(self.messages):
            out.extend(_translate(m, f"messages[{i}]", limits))
        return out

    def tool_list(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        for t in self.tools:
            if t.type not in (None, "custom"):
                raise APIError(
                    400,
                    f"tools: the server tool {t.type!r} is not available here; send client tools",
                    param="tools",
                )
        return [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description or "",
                    "parameters": t.input_schema,
                },
            }
            for t in self.tools
        ]

    def thinking_flag(self) -> tuple[bool | None, int | None]:
        if self.thinking is None:
            return None, None
        if self.thinking.type == "disabled":
            return False, None
        return True, self.thinking.budget_tokens


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    tool_choice: ToolChoice | None = None

    def to_call(self, limits: MediaLimits, temp: TempFiles) -> Call:
        thinking, budget = self.thinking_flag()
        choice, name, parallel = "auto", None, True
        if self.tool_choice is not None:
            choice = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}[
                self.tool_choice.type
            ]
            name = self.tool_choice.name
            parallel = not self.tool_choice.disable_parallel_tool_use
            if choice == "function" and not name:
                raise APIError(400, "tool_choice: type 'tool' needs a name", param="tool_choice")
        return Call(
            messages=self.chat(limits, temp),
            tools=self.tool_list(),
            tool_choice=choice,
            tool_name=name,
            parallel_tool_calls=parallel,
            enable_thinking=thinking,
            thinking_budget=budget,
            max_tokens=self.max_tokens,
            sampling={"temp": self.temperature, "top_p": self.top_p, "top_k": self.top_k},
            stop=list(self.stop_sequences or []),
        )


def _system_text(system: Any) -> str | None:
    if system is None:
        return None
    if isinstance(system, str):
        return system
    texts = []
    for j, block in enumerate(system):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise APIError(400, f"system[{j}]: only text blocks are allowed", param="system")
        texts.append(block["text"])
    return "\n\n".join(texts)


def _translate(m: AnthropicMessage, param: str, limits: MediaLimits) -> list[dict[str, Any]]:
    """One Anthropic message -> chat messages: tool results become tool messages (before any
    text of the same user turn), tool_use blocks the assistant's tool calls."""
    blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
    parts: list[dict[str, Any]] = []
    tool_messages: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    reasoning: list[str] = []
    for j, block in enumerate(blocks):
        where = f"{param}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _string(block, "text", where)})
        elif kind == "document":
            source = block.get("source") or {}
            if source.get("type") != "text":
                raise APIError(400, f"{where}: only text documents are supported", param=where)
            parts.append({"type": "text", "text": _string(source, "data", where)})
        elif kind == "image" and m.role == "user":
            parts.append({"type": "image", "image": _image(block, where, limits)})
        elif kind == "tool_use" and m.role == "assistant":
            calls.append(
                {
                    "id": _string(block, "id", where),
                    "type": "function",
                    "function": {
                        "name": _string(block, "name", where),
                        "arguments": block.get("input") or {},
                    },
                }
            )
        elif kind == "tool_result" and m.role == "user":
            tool_messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _string(block, "tool_use_id", where),
                    "content": _result_text(block.get("content"), where),
                }
            )
        elif kind == "thinking" and m.role == "assistant":
            reasoning.append(_string(block, "thinking", where))
        elif kind == "redacted_thinking" and m.role == "assistant":
            continue  # opaque to this model
        else:
            raise APIError(
                400,
                f"{where}: a {kind!r} block is not supported in a {m.role} message",
                param=where,
            )
    out = list(tool_messages)
    if m.role == "assistant":
        message: dict[str, Any] = {"role": "assistant", "content": _joined(parts)}
        if reasoning:
            message["reasoning_content"] = "\n\n".join(reasoning)
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    elif parts or not tool_messages:
        has_media = any(p["type"] != "text" for p in parts)
        out.append({"role": "user", "content": parts if has_media else _joined(parts)})
    return out


def _joined(parts: list[dict[str, Any]]) -> str:
    return "\n\n".join(p["text"] for p in parts if p["type"] == "text")


def _string(block: dict[str, Any], key: str, where: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise APIError(400, f"{where}.{key} must be a string", param=f"{where}.{key}")
    return value


def _result_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return json.dumps(content, ensure_ascii=False)
    texts = []
    for k, block in enumerate(content):
        if isinstance(block, dict) and block.get("type") == "text":
            texts.append(_string(block, "text", f"{where}.content[{k}]"))
        else:
            raise APIError(
                400, f"{where}.content[{k}]: tool results may hold text blocks", param=where
            )
    return "\n\n".join(texts)


def _image(block: dict[str, Any], where: str, limits: MediaLimits) -> Any:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif source.get("type") == "url":
        url = source.get("url")
    else:
        raise APIError(400, f"{where}.source: use a base64 or url source", param=where)
    return load_image(url, limits, where)
