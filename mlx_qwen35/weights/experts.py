"""MoE expert tensors: the layouts checkpoints store them in, and the stacked one the model holds.

- Fused (the original Hugging Face checkpoints, transformers >= 5 in memory):
  `<p>.experts.gate_up_proj` [E, 2I, H] (each expert's gate rows, then its up rows) and
  `<p>.experts.down_proj` [E, H, I], with no `.weight` suffix (mlx-vlm also meets a `.weight`
  form, with `.scales`/`.biases` beside it when quantized).
- Per expert (transformers' `save_pretrained`, older exports):
  `<p>.experts.<e>.{gate,up,down}_proj.weight` [I, H] / [H, I].
- Stacked (mlx-lm, mlx-vlm and our converted format): `<p>.switch_mlp.{gate,up,down}_proj.weight`
  [E, out, in], plus `.scales`/`.biases` when quantized.

`<p>` is any `....mlp` path, the MTP layer's included. Which layout a checkpoint uses is read from
the key names alone; the values are never inspected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import mlx.core as mx

from ..errors import UserError

_PER_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
    r"\.(?P<suffix>weight|scales|biases)$"
)
_FUSED = re.compile(
    r"^(?P<prefix>.*\.mlp)\.experts\.(?P<proj>gate_up_proj|down_proj)"
    r"(?:\.(?P<suffix>weight|scales|biases))?$"
)


@dataclass(frozen=True)
class ExpertStack:
    """One stacked tensor `key` [E, ...] and the stored tensors it is made of.

    sources: per-expert layout, one key per expert in expert order; fused layout, the one fused
    key. part: for fused gate_up, 0 takes each expert's first half of the rows (gate), 1 the
    second (up); None takes the whole tensor.
    """

    key: str
    sources: tuple[str, ...]
    part: int | None = None

    @property
    def fused(self) -> bool:
        return len(self.sources) == 1

    def expert(self, tensors: Mapping[str, mx.array], e: int) -> mx.array:
        """Expert `e`'s matrix (lazy)."""
        if not self.fused:
            return tensors[self.sources[e]]
        return self._part(tensors[self.sources[0]][e], axis=0)

    def stacked(self, tensors: Mapping[str, mx.array]) -> mx.array:
        """The whole stack (lazy)."""
        if not self.fused:
            return mx.stack([tensors[k] for k in self.sources])
        return self._part(tensors[self.sources[0]], axis=1)

    def _part(self, t: mx.array, axis: int) -> mx.array:
        if self.part is None:
            return t
        half = t.shape[axis] // 2
        index = [slice(None)] * t.ndim
        index[axis] = slice(0, half) if self.part == 0 else slice(half, None)
        return t[tuple(index)]


def expert_stacks(keys: Iterable[str]) -> list[ExpertStack]:
    """The stacked tensors that the fused and per-expert keys among `keys` make up.

    A per-expert set must hold experts 0..E-1 for every projection it has: a gap means a shard or
    tensor is missing, which fails here with the first missing key named.
    """
    per_expert: dict[tuple[str, str, str], dict[int, str]] = {}
    stacks: list[ExpertStack] = []
    for key in keys:
        m = _PER_EXPERT.match(key)
        if m:
            group = (m["prefix"], m["proj"], m["suffix"])
            per_expert.setdefault(group, {})[int(m["e"])] = key
            continue
        m = _FUSED.match(key)
        if m:
            suffix = m["suffix"] or "weight"
            target = f"{m['prefix']}.switch_mlp"
            if m["proj"] == "gate_up_proj":
                stacks.append(ExpertStack(f"{target}.gate_proj.{suffix}", (key,), 0))
                stacks.append(ExpertStack(f"{target}.up_proj.{suffix}", (key,), 1))
            else:
                stacks.append(ExpertStack(f"{target}.down_proj.{suffix}", (key,)))
    for (prefix, proj, suffix), by_index in per_expert.items():
        count = max(by_index) + 1
        missing = [e for e in range(count) if e not in by_index]
        if missing:
            raise UserError(
                f"{prefix}.experts.{missing[0]}.{proj}.{suffix} is missing ({len(missing)} of "
                f"{count} experts of {prefix}.{proj}); the checkpoint is incomplete, download it "
                "again"
            )
        sources = tuple(by_index[e] for e in range(count))
        stacks.append(ExpertStack(f"{prefix}.switch_mlp.{proj}.{suffix}", sources))
    return stacks


def stack_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """`weights` with every fused or per-expert set replaced by its stacked tensor (lazy)."""
    stacks = expert_stacks(weights)
    if not stacks:
        return weights
    out = dict(weights)
    for stack in stacks:
        out[stack.key] = stack.stacked(weights)
    for stack in stacks:
        for source in stack.sources:
            out.pop(source, None)
    return out


@dataclass(frozen=True)
class Unit:
    """One step of a streamed conversion: one source tensor (no stacks), or the expert stacks
    built from the same source tensors (a fused gate_up gives two)."""

    sources: tuple[str, ...]
    stacks: tuple[ExpertStack, ...] = ()


def stream_units(keys: list[str]) -> list[Unit]:
    """`keys` (every source tensor, in the order they are stored) as conversion units: a plain
    tensor where it is stored, an expert stack where its last source is stored."""
    stacks = expert_stacks(keys)
    by_sources: dict[tuple[str, ...], list[ExpertStack]] = {}
    for stack in stacks:
        by_sources.setdefault(stack.sources, []).append(stack)
    position = {key: i for i, key in enumerate(keys)}
    last_of = {max(sources, key=position.__getitem__): sources for sources in by_sources}
    in_stack = {source for sources in by_sources for source in sources}
    units = []
    for key in keys:
        if key in last_of:
            sources = last_of[key]
            units.append(Unit(sources, tuple(by_sources[sources])))
        elif key not in in_stack:
            units.append(Unit((key,)))
    return units
