"""A reply as it streams -> reasoning, answer text and tool calls, each as deltas.

    parser = ReplyParser(tools, thinking=rendered.thinking_open)
    for piece in texts:                        # decoded text, token by token
        for delta in parser.feed(piece): ...   # Reasoning / Content / CallStart / CallArguments
    for delta in parser.finish(): ...
    parser.reply                               # the whole ParsedReply

The reply starts inside the thinking block when the generation prompt opened one; `</think>` ends
it. In the answer, each `<tool_call>` ... `</tool_call>` becomes a call: its name as soon as
`<function=NAME>` is complete, its arguments as JSON text one parameter at a time (typed by the
tool's schema as `tools.parse_tool_calls` types them), so a client sees `{"city": "Paris"` and
then `}`. A call to an unknown tool, or text inside <tool_call> that is not a call, stays in the
answer as written. Text that might be the start of a tag, and white space that might precede a
call or the end of the text, is held back until it is known, so the streamed pieces concatenate to
exactly the non-streamed fields (the server builds both from this one parser).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .messages import THINK_END, THINK_START
from .tools import (
    CALL_END,
    CALL_START,
    FUNCTION_END,
    PARAMETER_END,
    _decode_loose,
    _parse_json_call,
    convert_value,
    tool_schemas,
)

_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>")
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>")


@dataclass
class Reasoning:
    text: str


@dataclass
class Content:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class CallArguments:
    index: int
    text: str  # a piece of the arguments' JSON text


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON object text

    @property
    def parsed_arguments(self) -> dict[str, Any]:
        return json.loads(self.arguments)


@dataclass
class ParsedReply:
    reasoning: str = ""
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


def _partial_suffix(text: str, tags: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


class ReplyParser:
    """Incremental parser of one reply (see the module doc). `tools`: the request's tools (calls
    to others stay text; None accepts any name); `thinking`: the reply starts inside <think>;
    `parse_calls`: False keeps tool-call markup as answer text (tool_choice "none")."""

    def __init__(
        self,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        thinking: bool = False,
        id_prefix: str = "call",
        parse_calls: bool = True,
    ):
        self.schemas = tool_schemas(tools) if tools else {}
        self.check_names = tools is not None
        self.parse_calls = parse_calls
        self.id_prefix = id_prefix
        self.state = "reasoning" if thinking else "content"
        self.buffer = ""  # text received but not handed out yet
        self.reply = ParsedReply()
        self._separate = False  # the next answer text follows a tool call
        self._current: dict[str, Any] | None = None  # the call being read

    def feed(self, text: str) -> list[Any]:
        """The deltas that `text` (the next piece of the reply) makes certain."""
        self.buffer += text
        out: list[Any] = []
        while getattr(self, f"_{self.state}")(out, final=False):
            pass
        return out

    def finish(self) -> list[Any]:
        """The deltas of whatever was held back; the reply is complete after this."""
        out: list[Any] = []
        while getattr(self, f"_{self.state}")(out, final=True):
            pass
        return out

    # -- states: each hands out what it can, and returns True when it changed state

    def _reasoning(self, out: list[Any], final: bool) -> bool:
        if not self.reply.reasoning:
            self.buffer = self.buffer.lstrip()
        end = self.buffer.find(THINK_END)
        if end >= 0:
            self._emit_reasoning(out, self.buffer[:end].rstrip())
            self.buffer = self.buffer[end + len(THINK_END) :]
            self.state = "content"
            return True
        keep = 0 if final else _held(self.buffer, [THINK_END])
        self._emit_reasoning(
            out,
            self.buffer[: len(self.buffer) - keep].rstrip()
            if final
            else self.buffer[: len(self.buffer) - keep],
        )
        self.buffer = self.buffer[len(self.buffer) - keep :]
        return False

    def _content(self, out: list[Any], final: bool) -> bool:
        fresh = not self.reply.content or self._separate
        if fresh:
            self.buffer = self.buffer.lstrip()
        if not self.reply.content and not self.reply.reasoning and not self.reply.calls:
            if self.buffer.startswith(THINK_START):
                # A model that thinks although the prompt did not open the block.
                self.buffer = self.buffer[len(THINK_START) :]
                self.state = "reasoning"
                return True
        start = self.buffer.find(CALL_START) if self.parse_calls else -1
        if start >= 0:
            before = self.buffer[:start]
            self._emit_content(out, before.rstrip())
            self.buffer = self.buffer[start + len(CALL_START) :]
            space = before[len(before.rstrip()) :]
            self._current = {"pos": 0, "params": 0, "closed": False, "space": space}
            self.state = "calling"
            return True
        if final:
            self._emit_content(out, self.buffer.rstrip())
            self.buffer = ""
            return False
        tags = [CALL_START] if self.parse_calls else []
        if not self.reply.content and not self.reply.reasoning:
            tags.append(THINK_START)
        keep = _held(self.buffer, tags)
        self._emit_content(out, self.buffer[: len(self.buffer) - keep])
        self.buffer = self.buffer[len(self.buffer) - keep :]
        return False

    def _calling(self, out: list[Any], final: bool) -> bool:
        call = self._current
        end = self.buffer.find(CALL_END)
        body = self.buffer if end < 0 else self.buffer[:end]
        if "name" not in call:
            stripped = body.lstrip()
            if stripped.startswith("{"):
                return self._json_call(out, body, end) if end >= 0 or final else False
            match = _FUNCTION.match(body)
            if match is None:
                waiting = "<function=".startswith(stripped) or (
                    stripped.startswith("<function=") and not set(stripped) & {">", "\n"}
                )
                if waiting and end < 0 and not final:
                    return False
                return self._not_a_call(out, end)
            name = match.group(1).strip()
            if self.check_names and name not in self.schemas:
                return self._not_a_call(out, end)
            call.update(name=name, pos=match.end())
            index = len(self.reply.calls)
            self.reply.calls.append(ParsedCall(f"{self.id_prefix}_{index}", name, ""))
            out.append(CallStart(index, self.reply.calls[-1].id, name))
        self._parameters(out, body, final or end >= 0)
        fn_end = re.compile(r"\s*" + re.escape(FUNCTION_END)).match(body, call["pos"])
        if fn_end is None and end < 0 and not final:
            return False
        self._close_arguments(out)
        if end >= 0:
            rest = end + len(CALL_END)
        elif final:
            rest = len(self.buffer)
        else:
            # </function> is there; wait for </tool_call>, unless other text says it is missing.
            after = self.buffer[fn_end.end() :].lstrip()
            if CALL_END.startswith(after):
                return False
            rest = fn_end.end()
        self.buffer = self.buffer[rest:]
        self._current = None
        self._separate = True
        self.state = "content"
        return True

    # -- helpers

    def _parameters(self, out: list[Any], body: str, ended: bool) -> None:
        """Hand out every parameter of the current call that is complete in `body` (`ended`:
        the body is all there is, so a parameter without </parameter> runs to its end)."""
        call = self._current
        while (m := _PARAMETER.match(body, call["pos"])) is not None:
            following = _PARAMETER.search(body, m.end())
            ends = [
                (body.find(PARAMETER_END, m.end()), len(PARAMETER_END)),
                (body.find(FUNCTION_END, m.end()), 0),
                (following.start() if following else -1, 0),
            ]
            found = [(p, n) for p, n in ends if p >= 0]
            if not found:
                if not ended:
                    return
                found = [(len(body), 0)]
            stop, skip = min(found)
            value = body[m.end() : stop]
            value = value[1:] if value.startswith("\n") else value
            value = value[:-1] if value.endswith("\n") else value
            self._emit_parameter(out, m.group(1).strip(), value)
            call["pos"] = stop + skip

    def _emit_parameter(self, out: list[Any], key: str, raw: str) -> None:
        call = self._current
        schema = self.schemas.get(call["name"], {}).get("properties", {}).get(key)
        if schema is None:
            value = _decode_loose(raw)
        else:
            ok, value = convert_value(raw, schema)
            value = value if ok else raw
        piece = ("{" if not call["params"] else ", ") + json.dumps(key, ensure_ascii=False)
        piece += ": " + json.dumps(value, ensure_ascii=False)
        call["params"] += 1
        self._arguments(out, piece)

    def _close_arguments(self, out: list[Any]) -> None:
        call = self._current
        if not call["closed"]:
            call["closed"] = True
            self._arguments(out, "}" if call["params"] else "{}")

    def _arguments(self, out: list[Any], piece: str) -> None:
        index = len(self.reply.calls) - 1
        self.reply.calls[index].arguments += piece
        out.append(CallArguments(index, piece))

    def _json_call(self, out: list[Any], body: str, end: int) -> bool:
        # The Qwen2.5/Qwen3 style that the model sometimes falls back to.
        call, _ = _parse_json_call(body, self.schemas if self.check_names else None, "")
        if call is None:
            return self._not_a_call(out, end)
        index = len(self.reply.calls)
        call_id = f"{self.id_prefix}_{index}"
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        self.reply.calls.append(ParsedCall(call_id, call.name, arguments))
        out += [CallStart(index, call_id, call.name), CallArguments(index, arguments)]
        self.buffer = self.buffer[end + len(CALL_END) :] if end >= 0 else ""
        self._current = None
        self._separate = True
        self.state = "content"
        return True

    def _not_a_call(self, out: list[Any], end: int) -> bool:
        """What followed <tool_call> is not a usable call: it is answer text, as written."""
        stop = end + len(CALL_END) if end >= 0 else len(self.buffer)
        space = self._current["space"] if self.reply.content else ""
        self._emit_content(out, space + CALL_START + self.buffer[:stop])
        self.buffer = self.buffer[stop:]
        self._current = None
        self.state = "content"
        return True

    def _emit_reasoning(self, out: list[Any], text: str) -> None:
        if text:
            self.reply.reasoning += text
            out.append(Reasoning(text))

    def _emit_content(self, out: list[Any], text: str) -> None:
        if not text:
            return
        if self._separate and self.reply.content:
            text = "\n\n" + text
        self._separate = False
        self.reply.content += text
        out.append(Content(text))


def _held(text: str, tags: Sequence[str]) -> int:
    """How much of the end of `text` to hold back: a possible start of one of `tags`, and the
    white space before it (which is dropped if a tag follows)."""
    partial = _partial_suffix(text, tags)
    return partial + _trailing_space(text[: len(text) - partial])


def _trailing_space(text: str) -> int:
    return len(text) - len(text.rstrip())
