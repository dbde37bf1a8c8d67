"""Planning a conversion: the source's tensors, each one's output name, dtype, shard and
quantization decision (see convert.py for the whole process)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import UserError
from ..model.config import ModelConfig, load_config
from .loading import (
    SHIFTED_NORM_SUFFIXES,
    checkpoint_layout,
    rename_key,
    weight_files,
)
from .quantize import Decision, decide, quantization_block
from .quantize import quantize as quantize_tensor
from .recipes import QuantSpec, Recipe, load_recipe

MAX_SHARD_BYTES = 5 * 10**9
INDEX_FILE = "model.safetensors.index.json"
MTP_FILE = "mtp.safetensors"
REPORT_FILE = "quality_report.json"
DTYPES = ("bfloat16", "float16", "float32")
HEAD = "language_model.lm_head"
EMBED = "language_model.model.embed_tokens"

# Kept in fp32 whatever --dtype says: A_log (the decay exponent; spec §10.2) and the gated
# DeltaNet norm (shipped fp32; mlx-lm and mlx-vlm cast that norm's output back to the activation
# dtype, so fp32 costs them nothing). The (1 + w) norms are folded in fp32 but stored in the
# output dtype: mlx-lm and mlx-vlm run `mx.fast.rms_norm(x, weight)`, whose result takes the
# promoted dtype, so an fp32 weight there would turn their whole residual stream and KV cache fp32.
# Our runtime upcasts those norms to fp32 at load time either way.
_KEEP_FP32 = (".A_log", ".linear_attn.norm.weight")
_COPY_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "LICENSE*")
_NOT_COPIED = {"config.json", INDEX_FILE, REPORT_FILE, "README.md"}
_VISION_FILES = {"preprocessor_config.json", "video_preprocessor_config.json"}
_ST_DTYPES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.uint8: "U8",
    mx.int32: "I32",
    mx.int64: "I64",
}
_METADATA = {"format": "mlx"}


@dataclass(frozen=True)
class Tensor:
    """One output tensor, as planned from the lazy graph."""

    key: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.size
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class _Context:
    """Everything the per-tensor pipeline needs; the same object drives planning and writing."""

    layout: str
    tied: bool
    dtype: mx.Dtype
    recipe: Recipe | None
    vision_sanitize: Callable[[dict[str, mx.array]], dict[str, mx.array]] | None
    mtp: bool


@dataclass
class Plan:
    source: Path
    config: ModelConfig
    ctx: _Context
    inputs: list[tuple[Path, list[str]]]  # input shard -> tensor names in file order
    files: dict[str, list[Tensor]]  # output weight file -> tensors in write order
    config_json: dict[str, Any]
    quantized: dict[str, tuple[QuantSpec, int]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)  # quantizable but left as is -> why
    copies: list[Path] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(_shard_size(ts) for ts in self.files.values())


@dataclass
class ConversionResult:
    out: Path
    files: list[tuple[str, int]]  # (name, bytes) of everything in the output directory
    dry_run: bool = False
    report: dict[str, Any] | None = None
    url: str | None = None


# ---------------------------------------------------------------- options


def _choose_recipe(
    quantize: bool, q_bits: int | None, q_group_size: int | None, recipe: str | Path | None
) -> Recipe | None:
    if recipe is None and not quantize:
        if q_bits is not None or q_group_size is not None:
            raise UserError("--q-bits/--q-group-size only apply with -q or --recipe; add -q")
        return None
    if recipe is not None and q_bits is not None:
        raise UserError(
            "--q-bits picks the 4bit or 8bit recipe; with --recipe the recipe sets the bits "
            "(copy the recipe file to change them)"
        )
    if q_bits is not None and q_bits not in (4, 8):
        raise UserError(f"--q-bits must be 4 or 8, got {q_bits}")
    chosen = load_recipe(recipe if recipe is not None else f"{q_bits or 4}bit")
    if q_group_size is not None:
        if q_group_size not in (32, 64, 128):
            raise UserError(f"--q-group-size must be 32, 64 or 128, got {q_group_size}")
        chosen = chosen.with_group_size(q_group_size)
    return chosen


def _output_dtype(dtype: str | None, raw: dict[str, Any]) -> str:
    """--dtype, else the dtype the source declares, else bfloat16."""
    if dtype is not None:
        return dtype
    text = raw.get("text_config") or {}
    for d in (raw, text):
        for key in ("dtype", "torch_dtype"):
            if d.get(key) in DTYPES:
                return d[key]
    return "bfloat16"


# ---------------------------------------------------------------- reading


def read_header(path: Path) -> list[str]:
    """The tensor names of a safetensors file in data order, after checking the file is whole
    (a truncated download fails here, before anything is written)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(f.read(n))
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"the file has {size} bytes but its header describes {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise UserError(
            f"{path}: cannot read this safetensors shard ({e}); it is corrupt or truncated, "
            f"download it again"
        ) from None
    return sorted(entries, key=lambda k: int(entries[k]["data_offsets"][0]))


def _open_lazy(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises RuntimeError/ValueError with the parser's message
        raise UserError(
            f"{path}: cannot read this safetensors shard ({str(e).splitlines()[0]}); it is corrupt "
            f"or truncated, download it again"
        ) from None


# ---------------------------------------------------------------- one tensor


def _is_mtp(key: str) -> bool:
    return key.startswith("mtp.") or ".mtp." in key


def _to_our_layout(key: str, value: mx.array, ctx: _Context) -> tuple[str, mx.array] | None:
    """Source key/tensor -> our key/tensor (lazy), or None when the output does not keep it."""
    if _is_mtp(key):
        if not ctx.mtp:
            return None
        # Every MTP norm is a (1 + w) RMSNorm (spec §2); it has no gated norm.
        if ctx.layout == "hf" and value.ndim == 1 and "norm" in key.rsplit(".", 2)[-2]:
            value = value.astype(mx.float32) + 1.0
        return key, value
    new = key if ctx.layout == "ours" else rename_key(key)
    if new is None:
        return None
    if new.startswith("vision_tower."):
        if ctx.vision_sanitize is None:
            return None
        if ctx.layout == "hf":
            moved = ctx.vision_sanitize({new[len("vision_tower.") :]: value})
            if not moved:
                return None  # derived buffers (rotary tables) are not parameters
            ((sub, value),) = moved.items()
            new = f"vision_tower.{sub}"
        return new, value
    if ctx.tied and new == f"{HEAD}.weight":
        return None
    if ctx.layout == "hf":
        if new.endswith("conv1d.weight") and value.ndim == 3:
            value = value.moveaxis(2, 1)
        if new.endswith(SHIFTED_NORM_SUFFIXES):
            value = value.astype(mx.float32) + 1.0
    return new, value


def _cast(key: str, value: mx.array, dtype: mx.Dtype) -> mx.array:
    if not mx.issubdtype(value.dtype, mx.floating):
        return value
    return value.astype(mx.float32 if key.endswith(_KEEP_FP32) else dtype)


def _decide(key: str, shape: tuple[int, ...], ctx: _Context) -> Decision:
    head = HEAD if ctx.tied and key == f"{EMBED}.weight" else None
    return decide(key, shape, ctx.recipe, head_path=head)


def _convert_tensor(
    key: str, value: mx.array, ctx: _Context
) -> tuple[dict[str, mx.array], str | None, mx.array | None, Decision]:
    """One source tensor -> (output tensors, our key, the unquantized tensor, decision); lazy."""
    moved = _to_our_layout(key, value, ctx)
    if moved is None:
        return {}, None, None, Decision(None)
    new, value = moved
    value = _cast(new, value, ctx.dtype)
    decision = _decide(new, tuple(value.shape), ctx)
    if decision.spec is None:
        return {new: value}, new, value, decision
    return quantize_tensor(new, value, decision.spec), new, value, decision


# ---------------------------------------------------------------- planning


def make_plan(
    source: Path,
    recipe: Recipe | None,
    dtype: str | None,
    *,
    vision: bool = True,
    mtp: bool = True,
    max_shard_size: int = MAX_SHARD_BYTES,
) -> Plan:
    """Everything about the output (files, tensors, shapes, config) without computing a tensor."""
    config = load_config(source)
    if config.raw.get("quantization") or config.raw.get("quantization_config"):
        raise UserError(
            f"{source} is already quantized; convert from the original bf16 checkpoint instead"
        )
    inputs = [(f, read_header(f)) for f in weight_files(source)]
    _check_unique(inputs)
    lazy: dict[str, mx.array] = {}
    for f, _ in inputs:
        lazy.update(_open_lazy(f))
    if any(k.endswith(".scales") for k in lazy):
        raise UserError(
            f"{source} holds quantized weights; convert from the original bf16 checkpoint instead"
        )
    keep_vision = vision and config.vision is not None
    out_config = replace(config, vision=config.vision if keep_vision else None)
    dtype_name = _output_dtype(dtype, config.raw)
    ctx = _Context(
        layout=checkpoint_layout(lazy, config),
        tied=config.text.tie_word_embeddings,
        dtype=getattr(mx, dtype_name),
        recipe=recipe,
        vision_sanitize=_vision_sanitizer(out_config) if keep_vision else None,
        mtp=mtp,
    )
    plan = Plan(source, config, ctx, inputs, {}, {})
    main: list[list[Tensor]] = []
    mtp_tensors: list[Tensor] = []
    for _, keys in inputs:
        for key in keys:
            tensors, new, _, decision = _convert_tensor(key, lazy[key], ctx)
            if not tensors:
                continue
            group = [Tensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
            if _is_mtp(new):
                mtp_tensors += group
            else:
                main.append(group)
            _note_decision(plan, new, decision, lazy[key].size)
    del lazy
    _check_complete(source, out_config, keep_vision, {t.key for g in main for t in g}, plan)
    plan.files = _assign_shards(main, max_shard_size)
    if mtp_tensors:
        plan.files[MTP_FILE] = mtp_tensors
    plan.config_json = _config_json(out_config, dtype_name, recipe, plan.quantized)
    plan.copies = _side_files(source, keep_vision)
    return plan


def _check_unique(inputs: list[tuple[Path, list[str]]]) -> None:
    seen: dict[str, Path] = {}
    for f, keys in inputs:
        for key in keys:
            if key in seen:
                raise UserError(
                    f"{key} is stored in both {seen[key].name} and {f.name}; the checkpoint is "
                    f"inconsistent, download it again"
                )
            seen[key] = f


def _vision_sanitizer(config: ModelConfig) -> Callable[[dict[str, mx.array]], dict[str, mx.array]]:
    from ..model.vision import VisionModel

    # Built once; its parameters are lazy and never evaluated, only sanitize_hf is used.
    return VisionModel(config.vision).sanitize_hf


def _note_decision(plan: Plan, key: str | None, decision: Decision, size: int) -> None:
    path = key.removesuffix(".weight") if key else None
    if decision.spec is not None:
        plan.quantized[path] = (decision.spec, size)
    elif decision.reason and plan.ctx.recipe is not None:
        plan.kept[key] = decision.reason


def _check_complete(
    source: Path, config: ModelConfig, keep_vision: bool, planned: set[str], plan: Plan
) -> None:
    """The text (and vision) tensors must be exactly what our model holds: a partial download or
    another architecture fails here, not when someone loads the output."""
    from mlx.utils import tree_flatten

    from ..model.model import Model

    expected = {
        k for k, _ in tree_flatten(Model(config).parameters()) if k.startswith("language_model.")
    }
    if keep_vision:
        from ..model.vision import VisionModel

        expected |= {
            f"vision_tower.{k}" for k, _ in tree_flatten(VisionModel(config.vision).parameters())
        }
    for path, (spec, _) in plan.quantized.items():
        if not _is_mtp(path):
            expected.add(f"{path}.scales")
            if spec.mode == "affine":
                expected.add(f"{path}.biases")
    missing, extra = sorted(expected - planned), sorted(planned - expected)
    if missing:
        raise UserError(
            f"{source}: {len(missing)} tensors the model needs are missing (e.g. {missing[0]}); "
            f"the download is incomplete or this is not a Qwen3.5 checkpoint"
        )
    if extra:
        raise UserError(
            f"{source}: {len(extra)} tensors do not belong to a dense Qwen3.5 model (e.g. "
            f"{extra[0]}); convert the original checkpoint of a dense Qwen3.5 model"
        )


def _assign_shards(groups: list[list[Tensor]], max_bytes: int) -> dict[str, list[Tensor]]:
    """Fill shards in order, up to `max_bytes` each; a tensor's packed parts stay together."""
    shards: list[list[Tensor]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(t.nbytes for t in group)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1] += group
        size += nbytes
    n = len(shards)
    if n == 1:
        return {"model.safetensors": shards[0]}
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": s for i, s in enumerate(shards)}


def _config_json(
    config: ModelConfig,
    dtype_name: str,
    recipe: Recipe | None,
    quantized: dict[str, tuple[QuantSpec, int]],
) -> dict[str, Any]:
    out = config.to_dict()
    for key in ("quantization", "quantization_config", "_name_or_path"):
        out.pop(key, None)
    out["dtype"] = dtype_name
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype_name
    if recipe is not None and quantized:
        block = quantization_block(recipe, quantized)
        # mlx-lm writes both names; mlx-vlm and HF tooling look at quantization_config.
        out["quantization"] = block
        out["quantization_config"] = block
    return out


def _side_files(source: Path, keep_vision: bool) -> list[Path]:
    found: dict[str, Path] = {}
    for pattern in _COPY_PATTERNS:
        for p in source.glob(pattern):
            skip = p.name in _NOT_COPIED or p.name.endswith(".index.json")
            if p.is_file() and not skip and (keep_vision or p.name not in _VISION_FILES):
                found[p.name] = p
    return [found[name] for name in sorted(found)]


def _header(tensors: list[Tensor]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": _METADATA}
    offset = 0
    for t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise UserError(f"{t.key}: dtype {t.dtype} cannot be stored in safetensors")
        entries[t.key] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


def _shard_size(tensors: list[Tensor]) -> int:
    return len(_header(tensors)) + sum(t.nbytes for t in tensors)
