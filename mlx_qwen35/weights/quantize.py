"""Quantize one tensor at a time by a recipe, and describe the result in config.json.

The packed layout is MLX's `mx.quantize` (`<path>.weight` uint32, `<path>.scales`, and for affine
`<path>.biases`), exactly what mlx-lm writes, so mlx-lm, mlx-vlm and our loader rebuild the same
QuantizedLinear / QuantizedEmbedding layers from the `.scales` they find plus the `quantization`
block of config.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .recipes import QuantSpec, Recipe

# mlx-vlm quantizes a layer that the quantization block does not name only if its weight size is
# a multiple of this; such layers must be named explicitly.
_MLX_VLM_SIZE_MULTIPLE = 64


@dataclass(frozen=True)
class Decision:
    """What happens to one quantizable weight: `spec` None means kept in the output dtype."""

    spec: QuantSpec | None
    reason: str = ""


def module_path(key: str) -> str | None:
    """The layer path of a quantizable tensor (`<path>.weight`), else None.

    Every 2-D weight in Qwen3.5 (text, vision, MTP) belongs to a linear or embedding layer; norms
    and biases are 1-D, conv1d is 3-D, the vision patch embedding 5-D, A_log/dt_bias have no
    `.weight` suffix. So dimensionality alone keeps the protected tensors out of reach; the one
    3-D weight that is quantized is a stack of MoE experts (`switch_mlp`, see `quantizable`).
    """
    return key[: -len(".weight")] if key.endswith(".weight") else None


def quantizable(key: str, shape: tuple[int, ...]) -> bool:
    """A linear/embedding weight (2-D), or a stack of expert weights [E, out, in] (3-D)."""
    if module_path(key) is None:
        return False
    return len(shape) == 2 or (len(shape) == 3 and ".switch_mlp." in key)


def decide(
    key: str, shape: tuple[int, ...], recipe: Recipe | None, head_path: str | None = None
) -> Decision:
    """How `key` (shape `shape`) is quantized under `recipe`.

    `head_path`: with tied embeddings the embedding matrix is also the output head, so it is
    quantized by the head's rule (pass the head's path for the embedding key).
    """
    path = module_path(key)
    if recipe is None or path is None or not quantizable(key, shape):
        return Decision(None)
    spec = recipe.spec_for(head_path or path)
    if spec is None:
        return Decision(None, "kept by the recipe")
    if shape[-1] % spec.group_size:
        # As mlx-lm does: a row that is not a whole number of groups cannot be packed.
        return Decision(None, f"input size {shape[-1]} is not a multiple of {spec.group_size}")
    return Decision(spec)


def quantize(key: str, weight: mx.array, spec: QuantSpec) -> dict[str, mx.array]:
    """`<path>.weight` -> {`<path>.weight` (packed), `<path>.scales`[, `<path>.biases`]} (lazy)."""
    path = module_path(key)
    packed = mx.quantize(weight, spec.group_size, spec.bits, mode=spec.mode)
    out = {f"{path}.weight": packed[0], f"{path}.scales": packed[1]}
    if len(packed) > 2:
        out[f"{path}.biases"] = packed[2]
    return out


def dequantize(tensors: dict[str, mx.array], key: str, spec: QuantSpec) -> mx.array:
    path = module_path(key)
    return mx.dequantize(
        tensors[f"{path}.weight"],
        tensors[f"{path}.scales"],
        tensors.get(f"{path}.biases"),
        spec.group_size,
        spec.bits,
        mode=spec.mode,
    )


def quantization_block(
    recipe: Recipe, quantized: dict[str, tuple[QuantSpec, int]]
) -> dict[str, object]:
    """config.json's `quantization`: the recipe's default plus one entry per layer that differs
    from it (mlx-lm's per-layer override format).

    `quantized` maps layer path -> (spec, weight element count). Layers whose weight size is not a
    multiple of 64 are always named, because mlx-vlm skips unnamed ones of that size.
    """
    block: dict[str, object] = dict(recipe.default.to_dict())
    for path, (spec, size) in sorted(quantized.items()):
        if spec != recipe.default or size % _MLX_VLM_SIZE_MULTIPLE:
            block[path] = spec.to_dict()
    return block
