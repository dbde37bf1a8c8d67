"""Rendering a checkpoint's Jinja chat template the way transformers' `apply_chat_template` does.

Templates come from the Hub, so they are untrusted code: they run in Jinja's immutable sandbox and
see only plain JSON-like data (anything else becomes a `<TypeName>` placeholder, as transformers
does). The environment matches transformers' (trim_blocks, lstrip_blocks, loop controls, a
`tojson` that does not escape HTML, `raise_exception`, `strftime_now`, and `{% generation %}`
blocks rendered as their body), so a template renders here exactly as it does there, without
importing transformers (~2 s). jinja2 itself is imported on the first render.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ..errors import UserError

# Names a message's reasoning is given under; templates read the first (transformers aliases them).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def pick_template(
    chat_template: str | Mapping[str, str] | None, tools: Sequence[Any] | None = None
) -> str:
    """The template text: a single template, or from named ones "tool_use" (when tools are given
    and it exists) else "default"."""
    if isinstance(chat_template, Mapping):
        if tools and "tool_use" in chat_template:
            return chat_template["tool_use"]
        if "default" in chat_template:
            return chat_template["default"]
        raise UserError(
            "the checkpoint has several chat templates ("
            + ", ".join(sorted(chat_template))
            + ") and none named 'default'; add chat_template.jinja"
        )
    if not chat_template:
        raise UserError(
            "this model's tokenizer has no chat template; pass the prompt as token ids or use a "
            "checkpoint that ships chat_template.jinja"
        )
    return chat_template


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    **variables: Any,
) -> str:
    """`template` rendered for `messages` (keys whose value is None dropped, reasoning aliased),
    with `tools`, `documents`, `add_generation_prompt` and any other template variables."""
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise UserError("tools must be JSON schema dicts ({'type': 'function', 'function': ...})")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise UserError(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return _compile(template).render(
        messages=_plain(chat),
        tools=_plain(list(tools) if tools is not None else None),
        documents=_plain(list(documents) if documents is not None else None),
        add_generation_prompt=add_generation_prompt,
        **_plain(variables),
    )


def _plain(value: Any) -> Any:
    """Only JSON-like data reaches the sandbox: rich objects (images, arrays) have methods the
    sandbox does not know to be dangerous; templates only test whether such keys are present."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / mlx scalars
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks in
        transformers) renders as its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class Namespace(jinja2.utils.Namespace):
        """namespace() that refuses underscore attributes (no way to CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 -- Jinja's own signature
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore attributes on a namespace ({name!r})"
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    return env.from_string(template)
