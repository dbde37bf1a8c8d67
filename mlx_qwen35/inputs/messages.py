"""Chat messages -> prompt text through the checkpoint's chat template, thinking control, and
parsing of what the model writes back (reasoning block, XML tool calls).

Real checkpoints bring their own template (`chat_template.jinja` or `tokenizer_config.json`);
`tiny-random` ships ours (chat_template.jinja in this package), written to behave like Qwen3.5's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import UserError
from .tools import parse_tool_calls as _parse_calls

ROLES = ("system", "user", "assistant", "tool")
THINK_START, THINK_END = "<think>", "</think>"


def build_messages(prompt: str, system: str | None = None) -> list[dict[str, Any]]:
    """One user turn (after an optional system turn), as mlx-lm builds it from `--prompt`."""
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    return messages


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check roles and shapes, and decode OpenAI-style tool-call arguments given as JSON strings
    (templates render arguments parameter by parameter, so they need a mapping)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise UserError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise UserError(f"message {i} must be a dict with a 'role' key, got {message!r}")
        if message["role"] not in ROLES:
            raise UserError(
                f"message {i} has role {message['role']!r}; use one of {', '.join(ROLES)}"
            )
        message = dict(message)
        if message.get("tool_calls"):
            calls = message["tool_calls"]
            message["tool_calls"] = [_normalize_tool_call(call, i) for call in calls]
        out.append(message)
    return out


def _normalize_tool_call(call: Mapping[str, Any], index: int) -> dict[str, Any]:
    call = dict(call)
    fn = dict(call["function"]) if isinstance(call.get("function"), Mapping) else call
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise UserError(
                f"message {index}: tool call arguments are not valid JSON ({e}); pass a dict"
            ) from e
        if not isinstance(arguments, dict):
            raise UserError(f"message {index}: tool call arguments must be a JSON object")
        fn["arguments"] = arguments
    if "function" in call:
        call["function"] = fn
        return call
    return fn


def render_chat_template(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **template_kwargs: Any,
) -> str:
    """Render `messages` with the tokenizer's chat template (transformers' apply_chat_template).

    `enable_thinking=None` passes nothing, so the template's own default decides. mlx-lm's
    TokenizerWrapper would otherwise inject `enable_thinking=True` for every vocabulary with a
    <think> token, so the call goes to the wrapped transformers tokenizer directly (unless the
    wrapper carries its own renderer, which only it knows how to call).
    """
    if not getattr(tokenizer, "has_chat_template", getattr(tokenizer, "chat_template", None)):
        raise UserError(
            "this model's tokenizer has no chat template; pass the prompt as token ids or use a "
            "checkpoint that ships chat_template.jinja"
        )
    kwargs: dict[str, Any] = dict(template_kwargs)
    if enable_thinking is not None:
        kwargs["enable_thinking"] = bool(enable_thinking)
    if tools:
        kwargs["tools"] = list(tools)
    target = tokenizer
    if getattr(tokenizer, "_chat_template", None) is None:
        target = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        text = target.apply_chat_template(
            normalize_messages(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except UserError:
        raise
    except Exception as e:  # jinja2 errors, including the template's raise_exception()
        if type(e).__module__.startswith("jinja2"):
            raise UserError(f"chat template: {e}") from e
        raise
    return text


def split_thinking(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a generated reply.

    The generation prompt already opens the <think> block, so the reply usually starts inside it
    and only the closing tag appears; a reply without </think> is all reasoning when it is still
    inside an open block (`<think>` present) and all answer otherwise.
    """
    if THINK_END in text:
        reasoning, answer = text.split(THINK_END, 1)
        reasoning = reasoning.split(THINK_START)[-1]
        return reasoning.strip(), answer.strip()
    if THINK_START in text:
        return text.split(THINK_START, 1)[1].strip(), ""
    return "", text.strip()


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """Tool calls written in Qwen3.5's XML format, as [{"name": ..., "arguments": {...}}].

    Parameter values that read as JSON (numbers, booleans, null, objects, arrays) are decoded;
    anything else stays a string. Malformed calls are skipped; `tools.parse_tool_calls` types the
    values by the tools' schemas and says what was wrong.
    """
    return [{"name": c.name, "arguments": c.arguments} for c in _parse_calls(text).calls]
