"""Tool calling: tool schemas for the chat template, and the model's XML tool calls parsed into
typed calls.

Qwen3.5 calls a tool by writing

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Every value arrives as text; the tool's JSON schema says what it means ("2" is an integer for an
`integer` parameter and a string for a `string` one). Small models get the format slightly wrong
now and then, so the parser is lenient where the intent is unambiguous (a missing </parameter> or
</tool_call>, a JSON-style call inside the tags) and otherwise leaves the call in the text with a
warning: a bad call never raises.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
FUNCTION_END = "</function>"
PARAMETER_END = "</parameter>"
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>")
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>")
_INTEGER = re.compile(r"[+-]?\d+")


class ToolCallWarning(UserWarning):
    """A tool call the model wrote could not be used as it stands."""


@dataclass(frozen=True)
class ToolCall:
    """One call: the tool's name, its arguments typed per the tool's schema, and an id that tool
    results can refer to."""

    name: str
    arguments: dict[str, Any]
    id: str = ""

    def to_message(self) -> dict[str, Any]:
        """The OpenAI-style entry of an assistant message's `tool_calls`."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": dict(self.arguments)},
        }

    def result(self, content: Any) -> ToolResult:
        """This call's result, ready for `ChatSession.send(tool_results=[...])`."""
        return ToolResult(content=content, name=self.name, call_id=self.id)


@dataclass(frozen=True)
class ToolResult:
    """What a tool returned; anything but a string is written as JSON."""

    content: Any
    name: str | None = None
    call_id: str | None = None

    def to_message(self) -> dict[str, Any]:
        content = self.content
        if not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False, default=str)
        message: dict[str, Any] = {"role": "tool", "content": content}
        if self.name is not None:
            message["name"] = self.name
        if self.call_id:
            message["tool_call_id"] = self.call_id
        return message


@dataclass
class ParsedCalls:
    """calls: the usable calls in order; text: the input with those calls cut out (malformed ones
    stay, as the model wrote them); warnings: one line per problem."""

    calls: list[ToolCall] = field(default_factory=list)
    text: str = ""
    warnings: list[str] = field(default_factory=list)


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Tools in the OpenAI form `{"type": "function", "function": {name, description,
    parameters}}`; a bare `{name, parameters}` is wrapped. Raises UserError for anything else."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise UserError("tools must be a list of JSON-schema dicts ({'type': 'function', ...})")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise UserError(f"tool {i} must be a dict, got {type(tool).__name__}")
        fn = tool.get("function", tool)
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "<>\n"):
            raise UserError(f"tool {i} needs a 'name' (a string without <, > or newlines)")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping) or not isinstance(params.get("properties", {}), Mapping):
            raise UserError(f"tool {name!r}: 'parameters' must be a JSON schema object")
        out.append(json.loads(json.dumps({"type": "function", "function": dict(fn)})))
    return out


def tool_schemas(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """name -> parameters schema, for tools in either form."""
    return {
        t["function"]["name"]: t["function"].get("parameters") or {} for t in normalize_tools(tools)
    }


def parse_tool_calls(
    text: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    id_prefix: str = "call",
) -> ParsedCalls:
    """Find the tool calls in `text` (the answer part of a reply, after any thinking).

    With `tools`, each call must name one of them, give its required parameters and values that
    fit the parameter types; values are converted to those types. Without `tools`, values that
    read as JSON (numbers, booleans, null, objects, arrays) are decoded, the rest stay strings.
    """
    schemas = tool_schemas(tools) if tools is not None else None
    parsed = ParsedCalls()
    kept: list[str] = []
    pos = 0
    while (start := text.find(CALL_START, pos)) >= 0:
        kept.append(text[pos:start])
        end, body, notes = _call_extent(text, start)
        number = len(parsed.calls) + 1
        call, problems = _parse_call(body, schemas, f"{id_prefix}_{len(parsed.calls)}")
        if call is None:
            kept.append(text[start:end])
            parsed.warnings.append(f"tool call {number}: {problems[0]}; left in the text")
        else:
            parsed.calls.append(call)
            parsed.warnings.extend(f"tool call {number}: {p}" for p in notes + problems)
        pos = end
    kept.append(text[pos:])
    parsed.text = _join_kept(kept)
    return parsed


def _join_kept(parts: list[str]) -> str:
    # Cutting a call out leaves the blank lines around it; keep the prose tidy.
    return re.sub(r"\n{3,}", "\n\n", "".join(parts)).strip()


def _call_extent(text: str, start: int) -> tuple[int, str, list[str]]:
    """(end of the call in `text`, its body, tolerated problems) for the call at `start`."""
    body_start = start + len(CALL_START)
    close = text.find(CALL_END, body_start)
    following = text.find(CALL_START, body_start)
    if close >= 0 and (following < 0 or close < following):
        return close + len(CALL_END), text[body_start:close], []
    limit = following if following >= 0 else len(text)
    fn_end = text.find(FUNCTION_END, body_start, limit)
    if fn_end >= 0:
        end = fn_end + len(FUNCTION_END)
        return end, text[body_start:end], [f"missing {CALL_END}"]
    return limit, text[body_start:limit], []


def _parse_call(
    body: str, schemas: dict[str, dict[str, Any]] | None, call_id: str
) -> tuple[ToolCall | None, list[str]]:
    """The call in one <tool_call> body, or None and the reason; plus tolerated problems."""
    if body.lstrip().startswith("{"):
        return _parse_json_call(body, schemas, call_id)
    match = _FUNCTION.match(body)
    if match is None:
        return None, ["no <function=NAME> inside <tool_call>"]
    name = match.group(1).strip()
    fn_end = body.find(FUNCTION_END, match.end())
    if fn_end < 0:
        return None, [f"{name}: missing {FUNCTION_END} (the reply may have been cut off)"]
    raw, notes = _raw_parameters(body[match.end() : fn_end], name)
    if raw is None:
        return None, notes
    call, problems = _typed_call(name, raw, schemas, call_id, from_xml=True)
    return call, notes + problems


def _parse_json_call(
    body: str, schemas: dict[str, dict[str, Any]] | None, call_id: str
) -> tuple[ToolCall | None, list[str]]:
    # The Qwen2.5/Qwen3 style, which the model sometimes falls back to.
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return None, [f"a JSON-style call that is not valid JSON ({e.msg})"]
    if not isinstance(obj, dict):
        return None, ['a JSON-style call needs {"name": ..., "arguments": {...}}']
    name, arguments = obj.get("name"), obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None, ['a JSON-style call needs {"name": ..., "arguments": {...}}']
    return _typed_call(name.strip(), arguments, schemas, call_id, from_xml=False)


def _raw_parameters(body: str, name: str) -> tuple[dict[str, str] | None, list[str]]:
    """Parameter name -> raw text value; a value without </parameter> runs to the next one."""
    raw: dict[str, str] = {}
    notes: list[str] = []
    starts = list(_PARAMETER.finditer(body))
    if not starts and body.strip():
        return None, [f"{name}: text inside <function> that is not a <parameter=...>"]
    for i, m in enumerate(starts):
        limit = starts[i + 1].start() if i + 1 < len(starts) else len(body)
        close = body.find(PARAMETER_END, m.end(), limit)
        if close < 0:
            close = limit
            notes.append(f"{name}: missing {PARAMETER_END} after {m.group(1).strip()}")
        key = m.group(1).strip()
        if key in raw:
            return None, [f"{name}: parameter {key!r} given twice"]
        raw[key] = _strip_one_newline(body[m.end() : close])
    return raw, notes


def _strip_one_newline(value: str) -> str:
    # The template writes "<parameter=p>\nVALUE\n</parameter>"; other whitespace is the value's.
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _typed_call(
    name: str,
    raw: dict[str, Any],
    schemas: dict[str, dict[str, Any]] | None,
    call_id: str,
    *,
    from_xml: bool,
) -> tuple[ToolCall | None, list[str]]:
    """Check a call against its tool's schema and type its arguments. XML values are text to
    convert; a JSON-style call's values are already typed and only checked."""
    if schemas is None:
        args = {k: _decode_loose(v) if from_xml else v for k, v in raw.items()}
        return ToolCall(name, args, call_id), []
    if name not in schemas:
        known = ", ".join(sorted(schemas)) or "none"
        return None, [f"unknown tool {name!r} (tools: {known})"]
    schema = schemas[name]
    properties = schema.get("properties", {}) or {}
    missing = [p for p in schema.get("required", []) if p not in raw]
    if missing:
        return None, [f"{name}: missing required parameter(s) {', '.join(missing)}"]
    args: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in raw.items():
        if key not in properties:
            if schema.get("additionalProperties") is False:
                return None, [f"{name}: unknown parameter {key!r}"]
            notes.append(f"{name}: parameter {key!r} is not in the schema")
            args[key] = _decode_loose(value) if from_xml else value
            continue
        ok, typed = convert_value(value, properties[key])
        if not ok:
            expected = _kind(properties[key])
            return None, [f"{name}: parameter {key!r} = {_short(value)} is not {expected}"]
        args[key] = typed
    return ToolCall(name, args, call_id), notes


def convert_value(value: Any, schema: Mapping[str, Any]) -> tuple[bool, Any]:
    """(fits, value typed per `schema`) for one parameter value.

    Text values (from the XML format) are converted; already-typed values (from a JSON-style
    call) are checked. Handles `type` (a name or a list of names), `anyOf`/`oneOf` and `enum`;
    objects and arrays are decoded from JSON (or Python literals, which small models write) but
    their insides are not checked against the schema.
    """
    if "enum" in schema:
        for option in schema["enum"]:
            if value == option or (isinstance(value, str) and value.strip() == _as_text(option)):
                return True, option
        return False, value
    types = _schema_types(schema)
    if not types:
        return True, _decode_loose(value) if isinstance(value, str) else value
    # A string type last: "12" for ["integer", "string"] is the integer.
    for kind in sorted(types, key=lambda t: t == "string"):
        ok, typed = _convert_to(value, kind)
        if ok:
            return True, typed
    return False, value


def _schema_types(schema: Mapping[str, Any]) -> list[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    types: list[str] = []
    for sub in list(schema.get("anyOf", [])) + list(schema.get("oneOf", [])):
        if isinstance(sub, Mapping):
            types.extend(t for t in _schema_types(sub) if t not in types)
    return types


def _convert_to(value: Any, kind: str) -> tuple[bool, Any]:
    if not isinstance(value, str):
        return _check_type(value, kind), value
    text = value.strip()
    if kind == "string":
        return True, value
    if kind == "integer":
        if _INTEGER.fullmatch(text):
            return True, int(text)
        number = _json_or_none(text)
        ok = isinstance(number, float) and number.is_integer()
        return ok, int(number) if ok else value
    if kind == "number":
        number = _json_or_none(text)
        ok = isinstance(number, (int, float)) and not isinstance(number, bool)
        return ok, number if ok else value
    if kind == "boolean":
        lowered = text.lower()
        return lowered in ("true", "false"), lowered == "true"
    if kind == "null":
        return text.lower() in ("null", "none"), None
    if kind in ("object", "array"):
        decoded = _structured(text)
        ok = isinstance(decoded, dict if kind == "object" else list)
        return ok, decoded if ok else value
    return True, value


def _check_type(value: Any, kind: str) -> bool:
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
    }
    return checks.get(kind, lambda v: True)(value)


def _structured(text: str) -> Any:
    decoded = _json_or_none(text)
    if decoded is not None:
        return decoded
    try:
        # Literals only (no names, no calls): safe on untrusted text.
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def _decode_loose(value: str) -> Any:
    """Schema-less decoding: JSON numbers, booleans, null, objects, arrays; text stays text."""
    decoded = _json_or_none(value)
    if decoded is None and value.strip() != "null":
        return value
    # A quoted JSON string stays the raw text the model wrote.
    return value if isinstance(decoded, str) else decoded


def _as_text(option: Any) -> str:
    return option if isinstance(option, str) else json.dumps(option)


def _kind(schema: Mapping[str, Any]) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(_as_text(o) for o in schema["enum"])
    types = _schema_types(schema)
    return "a " + " or ".join(types) if types else "valid"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
