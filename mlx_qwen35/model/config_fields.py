"""Typed reads of config.json fields.

Every value read from config.json goes through `typed` / `typed_list`, so a field of the wrong
JSON type (`"rms_norm_eps": "abc"`, `"vision_config": "none"`, `"mrope_section": 5`) is a one-line
UserError naming the field, not a TypeError deep inside model construction. JSON null counts as
absent: Hugging Face configs write null for unset optional fields.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import UserError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"config.json: {message}")


_KIND_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "a JSON object",
    list: "a list",
}


def _is_kind(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    return isinstance(value, kind)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def typed(
    d: dict[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    default: Any = None,
    *,
    where: str = "",
    positive: bool = False,
    minimum: float | None = None,
) -> Any:
    """`d[name]` if it is of `kind` (int never takes booleans; float takes integers, finite
    only, and returns a float), `default` if absent or null; else a UserError naming the field
    as `{where}{name}`. `positive` / `minimum` bound numbers."""
    value = d.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    wanted = " or ".join(_KIND_NAMES[k] for k in kinds)
    _require(
        any(_is_kind(value, k) for k in kinds),
        f"{where}{name} must be {wanted}, got {_short(value)}",
    )
    if positive:
        _require(value > 0, f"{where}{name} must be > 0, got {_short(value)}")
    if minimum is not None:
        _require(value >= minimum, f"{where}{name} must be >= {minimum}, got {_short(value)}")
    return float(value) if kinds == (float,) else value


def typed_list(
    d: dict[str, Any],
    name: str,
    item: type,
    default: Any = None,
    *,
    where: str = "",
    length: int | None = None,
) -> Any:
    """`d[name]` as a list whose items are all of `item` (of `length` items if given)."""
    value = typed(d, name, list, default, where=where)
    if value is default:
        return value
    items = f"{length} " if length is not None else ""
    _require(
        all(_is_kind(v, item) for v in value) and (length is None or len(value) == length),
        f"{where}{name} must be a list of {items}{_KIND_NAMES[item].split(' ', 1)[1]}s, "
        f"got {_short(value)}",
    )
    return list(value)
