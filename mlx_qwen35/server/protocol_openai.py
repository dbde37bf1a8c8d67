"""OpenAI Chat Completions and Completions requests: the fields this server reads, typed and
range-checked (a wrong type or an out-of-range value is a 400 naming the parameter), and their
translation into a Call. Fields other clients send that do not change the output are ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError
from .generation import Call
from .media import MediaLimits, TempFiles, load_image, load_video


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Model):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class FunctionDef(_Model):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Model):
    include_usage: bool = False


class Sampling(_Model):
    """The sampling fields the chat and completions requests share."""

    model: str = ""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")

    def sampling(self) -> dict[str, Any]:
        return {
            "temp": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
        }

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: int | None = Field(None, ge=0)
    reasoning_effort: str | None = None

    def to_call(self, limits: MediaLimits, temp: TempFiles) -> Call:
        kwargs = dict(self.chat_template_kwargs or {})
        thinking = kwargs.pop("enable_thinking", None)
        if thinking is not None and not isinstance(thinking, bool):
            raise APIError(
                400,
                "chat_template_kwargs.enable_thinking must be true or false",
                param="chat_template_kwargs.enable_thinking",
            )
        if thinking is None and self.reasoning_effort is not None:
            thinking = self.reasoning_effort not in ("none", "minimal")
        choice, name = "auto", None
        if isinstance(self.tool_choice, NamedToolChoice):
            choice, name = "function", self.tool_choice.function.name
        elif self.tool_choice is not None:
            choice = self.tool_choice
        return Call(
            messages=chat_messages(self.messages, limits, temp),
            tools=[t.model_dump(exclude_none=True) for t in self.tools or []] or None,
            tool_choice=choice,
            tool_name=name,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=self.response_format,
            enable_thinking=thinking,
            thinking_budget=self.thinking_budget,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            sampling=self.sampling(),
            stop=self.stops(),
            top_logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            template_kwargs=kwargs,
        )


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


def chat_messages(
    messages: list[Message], limits: MediaLimits, temp: TempFiles
) -> list[dict[str, Any]]:
    """OpenAI messages -> chat messages for the template; images and videos loaded."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        role = "system" if m.role == "developer" else m.role
        message: dict[str, Any] = {"role": role}
        if role in ("system", "tool") or role == "assistant":
            message["content"] = _text(m.content, f"{param}.content")
        else:
            if m.content is None:
                raise APIError(400, f"{param}.content: a user message needs content", param=param)
            message["content"] = _parts(m.content, f"{param}.content", limits, temp)
        if role == "system" and out and out[-1]["role"] == "system" and len(out) == 1:
            out[-1]["content"] += "\n\n" + message["content"]  # system + developer: one turn
            continue
        if role == "assistant":
            reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            if m.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": c.id or f"call_{i}_{j}",
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments},
                    }
                    for j, c in enumerate(m.tool_calls)
                ]
        if role == "tool" and m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.name and role != "assistant":
            message["name"] = m.name
        out.append(message)
    return out


def _text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.get("type") in ("text", "input_text", "output_text", "refusal"):
            value = part.get("text", part.get("refusal"))
            if not isinstance(value, str):
                raise APIError(400, f"{param}[{j}].text must be a string", param=param)
            texts.append(value)
        else:
            raise APIError(
                400, f"{param}[{j}]: only text parts are allowed here", param=f"{param}[{j}]"
            )
    return "".join(texts)


def _parts(content: Any, param: str, limits: MediaLimits, temp: TempFiles) -> Any:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.text must be a string", param=where)
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            parts.append({"type": "image", "image": load_image(url, limits, f"{where}.image_url")})
        elif kind in ("video_url", "video"):
            source = part.get(kind)
            source = source.get("url") if isinstance(source, dict) else source
            video = load_video(source, limits, f"{where}.{kind}", temp)
            parts.append({"type": "video", "video": video})
        else:
            raise APIError(
                400,
                f"{where}: content part type {kind!r} is not supported (text, image_url, "
                "video_url)",
                param=where,
            )
    return parts
