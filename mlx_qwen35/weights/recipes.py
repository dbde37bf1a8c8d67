"""Quantization recipes: which tensors get which bits and group size.

A recipe is a JSON data file (the built-in ones live in the repository's `convert/recipes/`):

    {
      "description": "one line for the model card",
      "default": {"bits": 4, "group_size": 64, "mode": "affine"},
      "rules": [
        {"match": "<regex on the module path>", "bits": 8, "why": "..."},
        {"match": "^vision_tower\\.", "quantize": false, "why": "..."}
      ]
    }

Module paths are our layout's (`language_model.model.layers.3.mlp.down_proj`,
`language_model.lm_head`, `vision_tower.blocks.0.attn.qkv`, `mtp.layers.0.self_attn.v_proj`). The
first rule whose `match` is found in the path decides; a rule may leave out `bits`, `group_size` or
`mode` to inherit the default's. Rules only choose among quantizable tensors: the converter never
quantizes anything but the 2-D weight of a linear or embedding layer, so norms, biases, conv1d,
A_log and dt_bias stay unquantized whatever a recipe says.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import UserError

MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
_RULE_KEYS = {"match", "bits", "group_size", "mode", "quantize", "why"}


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"

    def to_dict(self) -> dict[str, Any]:
        """The per-layer entry of a config.json `quantization` block (mlx-lm's keys)."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


@dataclass(frozen=True)
class Rule:
    pattern: str
    quantize: bool = True
    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None
    why: str = ""

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    default: QuantSpec
    rules: tuple[Rule, ...] = ()

    def spec_for(self, path: str) -> QuantSpec | None:
        """How to quantize the layer at `path`, or None to keep it unquantized."""
        for rule in self.rules:
            if rule.matches(path):
                if not rule.quantize:
                    return None
                return QuantSpec(
                    bits=rule.bits or self.default.bits,
                    group_size=rule.group_size or self.default.group_size,
                    mode=rule.mode or self.default.mode,
                )
        return self.default

    def with_group_size(self, group_size: int) -> Recipe:
        """The same recipe with a new default group size (rules that pin one keep theirs)."""
        spec = replace(self.default, group_size=group_size)
        _check_spec(spec, f"recipe {self.name} with group size {group_size}")
        return replace(self, default=spec)


def recipe_dirs() -> list[Path]:
    """Where built-in recipes are looked up: the repository's `convert/recipes/` (source checkout
    or editable install), then `<prefix>/share/mlx_qwen35/recipes/` (installed data files)."""
    return [
        Path(__file__).resolve().parents[2] / "convert" / "recipes",
        Path(sys.prefix) / "share" / "mlx_qwen35" / "recipes",
    ]


def builtin_names() -> list[str]:
    names: set[str] = set()
    for d in recipe_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.json"))
    return sorted(names)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name (`4bit`, `8bit`, `mixed`) or a recipe JSON file by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not (text.endswith(".json") or path.is_file()):
        found = [d / f"{text}.json" for d in recipe_dirs() if (d / f"{text}.json").is_file()]
        if not found:
            names = ", ".join(builtin_names()) or "(none found)"
            raise UserError(
                f"unknown recipe {text!r}; use one of {names} or the path of a recipe .json file"
            )
        path = found[0]
    if not path.is_file():
        raise UserError(f"recipe file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {path}: not valid JSON ({e})") from None
    return parse_recipe(data, name=path.stem)


def parse_recipe(data: Any, name: str) -> Recipe:
    where = f"recipe {name}"
    if not isinstance(data, dict) or not isinstance(data.get("default"), dict):
        raise UserError(f"{where}: expected an object with a 'default' quantization")
    d = data["default"]
    default = QuantSpec(
        bits=_int(d.get("bits"), f"{where}: default.bits"),
        group_size=_int(d.get("group_size"), f"{where}: default.group_size"),
        mode=str(d.get("mode", "affine")),
    )
    _check_spec(default, f"{where}: default")
    rules = []
    for i, r in enumerate(data.get("rules", [])):
        rule_where = f"{where}: rule {i + 1}"
        if not isinstance(r, dict) or not isinstance(r.get("match"), str):
            raise UserError(f"{rule_where}: expected an object with a 'match' regex")
        unknown = sorted(set(r) - _RULE_KEYS)
        if unknown:
            raise UserError(f"{rule_where}: unknown keys {unknown}; allowed: {sorted(_RULE_KEYS)}")
        try:
            re.compile(r["match"])
        except re.error as e:
            raise UserError(f"{rule_where}: bad regex {r['match']!r} ({e})") from None
        rule = Rule(
            pattern=r["match"],
            quantize=bool(r.get("quantize", True)),
            bits=_int(r["bits"], f"{rule_where}: bits") if "bits" in r else None,
            group_size=_int(r["group_size"], f"{rule_where}: group_size")
            if "group_size" in r
            else None,
            mode=str(r["mode"]) if "mode" in r else None,
            why=str(r.get("why", "")),
        )
        if rule.quantize:
            _check_spec(
                QuantSpec(
                    rule.bits or default.bits,
                    rule.group_size or default.group_size,
                    rule.mode or default.mode,
                ),
                rule_where,
            )
        rules.append(rule)
    return Recipe(
        name=name,
        description=str(data.get("description", "")),
        default=default,
        rules=tuple(rules),
    )


def _int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{where} must be a positive integer, got {value!r}")
    return value


def _check_spec(spec: QuantSpec, where: str) -> None:
    """Let MLX itself say whether it can pack these bits/group size/mode (one tiny quantize)."""
    if spec.mode not in MODES:
        raise UserError(f"{where}: mode {spec.mode!r} is not one of {', '.join(MODES)}")
    try:
        mx.eval(
            mx.quantize(
                mx.zeros((1, 2 * spec.group_size)), spec.group_size, spec.bits, mode=spec.mode
            )
        )
    except (ValueError, RuntimeError) as e:
        raise UserError(
            f"{where}: MLX cannot quantize with bits={spec.bits}, group_size={spec.group_size}, "
            f"mode={spec.mode} ({str(e).splitlines()[0]})"
        ) from None
