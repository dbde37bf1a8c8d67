"""Find a checkpoint (local dir, Hub repo id or `tiny-random`), read its shards, and turn the
tensors into our layout.

Three on-disk layouts are read:
- original Hugging Face checkpoints (`model.language_model.*`, `model.visual.*`, `lm_head.*`, and
  flat `model.*` for text-only ones): RMSNorm weights are zero-centred (we fold 1 + w in fp32),
  conv1d is [C, 1, K] (we move it to [C, K, 1]);
- our converted format: config.json carries `mlx_qwen35_format`, weights are already ours;
- checkpoints written by mlx-lm / mlx-vlm (`language_model.*`, `vision_tower.*`): already shifted
  and transposed, possibly quantized.
The layout is decided by the marker and the key prefixes, never by guessing from values, so the
(1 + w) shift and the conv transpose are applied exactly once.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError
from ..model.config import ModelConfig, load_config
from ..model.config_fields import typed
from ..model.model import Model

TINY_RANDOM = "tiny-random"
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "LICENSE*",
    "README.md",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Norm weights that hold (1 + w) in our layout; the gated DeltaNet norm is not among them.
SHIFTED_NORM_SUFFIXES = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
    "language_model.model.norm.weight",
)
_FP32_SUFFIXES = SHIFTED_NORM_SUFFIXES + (".A_log", ".linear_attn.norm.weight")


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """A local directory for `path_or_repo`, downloading from the Hub when it is a repo id."""
    name = str(path_or_repo)
    if name == TINY_RANDOM:
        from .tiny_random import ensure_tiny_random

        return ensure_tiny_random()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{name} is a file; pass the checkpoint directory that contains it")
        return path
    if name.startswith((".", "/", "~")) or not _REPO_ID.match(name):
        raise UserError(
            f"{name}: no such directory; pass a local checkpoint directory, a Hugging Face repo id "
            f"(owner/name) or {TINY_RANDOM}"
        )
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # huggingface_hub raises many types; all mean "not reachable/found"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not get {repo_id} from the Hugging Face Hub ({type(e).__name__}: {reason}); "
            f"check the repo id and your network, pass a local directory, or try --model "
            f"{TINY_RANDOM}"
        ) from None


def weight_files(model_dir: Path) -> list[Path]:
    """The shards to read: those the index names, else every model*.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: unreadable shard index ({e}); re-download the model") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(
                f"{model_dir}: shard {missing[0]} listed in the index is missing "
                f"({len(missing)} missing); re-download the model"
            )
        return files
    files = sorted(model_dir.glob("model*.safetensors")) or sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no .safetensors weights found; is this a model directory?")
    return files


def read_weights(model_dir: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in weight_files(model_dir):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise UserError(
                f"{f}: cannot read this safetensors shard ({e}); it is corrupt or truncated, "
                f"re-download or re-convert the model"
            ) from None
    return weights


def checkpoint_layout(weights: dict[str, mx.array], config: ModelConfig) -> str:
    """'ours', 'hf' (original, unshifted) or 'mlx' (mlx-lm / mlx-vlm converted)."""
    if config.format_version is not None:
        return "ours"
    keys = list(weights)
    if any(k.startswith(("model.language_model.", "model.visual.")) for k in keys):
        return "hf"
    if any(k.startswith(("language_model.", "vision_tower.")) for k in keys):
        return "mlx"
    # Flat text-only checkpoints (`model.layers.*`): the original stores conv1d as [C, 1, K],
    # every MLX writer as [C, K, 1]; this is the one case the prefix alone cannot tell.
    conv = next((v for k, v in weights.items() if k.endswith("conv1d.weight")), None)
    if conv is not None and conv.ndim == 3 and conv.shape[1] == 1 and conv.shape[2] != 1:
        return "hf"
    return "mlx"


def rename_key(key: str) -> str | None:
    """Original/mlx key -> our key; None for tensors the model does not hold (MTP)."""
    if key.startswith("mtp.") or ".mtp." in key:
        return None
    for old, new in (
        ("model.language_model.", "language_model.model."),
        ("model.visual.", "vision_tower."),
        ("lm_head.", "language_model.lm_head."),
        ("model.", "language_model.model."),
    ):
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def sanitize(
    weights: dict[str, mx.array],
    config: ModelConfig,
    with_vision: bool = True,
    vision_tower: Any = None,
) -> dict[str, mx.array]:
    """Tensors of any readable layout -> our layout (see module docstring).

    Vision tensors are kept only `with_vision` (and when the config has a tower); original HF
    ones go through `vision_tower.sanitize_hf` (a tower is built from the config if none is given).
    """
    layout = checkpoint_layout(weights, config)
    out: dict[str, mx.array] = {}
    vision: dict[str, mx.array] = {}
    for key, value in weights.items():
        new = key if layout == "ours" else rename_key(key)
        if new is None:
            continue
        if new.startswith("vision_tower."):
            vision[new[len("vision_tower.") :]] = value
            continue
        if layout == "hf":
            if new.endswith("conv1d.weight") and value.ndim == 3:
                value = value.moveaxis(2, 1)
            if new.endswith(SHIFTED_NORM_SUFFIXES):
                value = value.astype(mx.float32) + 1.0
        out[new] = value
    if config.text.tie_word_embeddings:
        out.pop("language_model.lm_head.weight", None)
    if vision and with_vision and config.vision is not None:
        if layout == "hf":
            if vision_tower is None:
                from ..model.vision import VisionModel

                vision_tower = VisionModel(config.vision)
            vision = vision_tower.sanitize_hf(vision)
        out.update({f"vision_tower.{k}": v for k, v in vision.items()})
    return out


def has_vision_weights(weights: dict[str, mx.array]) -> bool:
    return any(k.startswith(("model.visual.", "vision_tower.")) for k in weights)


def quantize_like_checkpoint(
    model: nn.Module, weights: dict[str, mx.array], config: dict[str, Any]
) -> None:
    """Turn the Linear/Embedding layers that the checkpoint stores quantized into quantized ones.

    `config` is the raw config.json dict; per-module overrides in its quantization block (as
    mlx-lm writes them for mixed recipes) are honoured. Works for any MLX model, mlx-lm's too.
    """
    key = "quantization" if config.get("quantization") else "quantization_config"
    quant = typed(config, key, dict, None)
    if not quant:
        return
    defaults = {}
    for name, kind in (("group_size", int), ("bits", int), ("mode", str)):
        value = typed(quant, name, kind, None, where=f"{key}.", positive=kind is int)
        if value is not None:
            defaults[name] = value

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        override = quant.get(path)
        return override if isinstance(override, dict) else True

    nn.quantize(model, **defaults, class_predicate=predicate)


def _cast(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Cast floating tensors to `dtype`, except those that must stay fp32 (A_log, norms)."""
    return {
        k: v.astype(dtype)
        if mx.issubdtype(v.dtype, mx.floating) and not k.endswith(_FP32_SUFFIXES)
        else v
        for k, v in weights.items()
    }


_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in _DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(model_dir: str | Path, dtype: str | mx.Dtype | None = None) -> Model:
    model_dir = Path(model_dir)
    config = load_config(model_dir)  # first: a missing config.json is the clearer error
    return model_from_weights(read_weights(model_dir), config, dtype, model_dir)


def model_from_weights(
    raw: dict[str, mx.array],
    config: ModelConfig,
    dtype: str | mx.Dtype | None = None,
    source: str | Path = "checkpoint",
) -> Model:
    """A ready model from tensors of any readable layout (`source` names them in errors)."""
    dtype = parse_dtype(dtype)
    if config.vision is not None and not has_vision_weights(raw):
        # Text-only conversions (mlx-lm's, for one) keep vision_config but drop the tower.
        config = replace(config, vision=None)
    model = Model(config)
    tower = getattr(model, "vision_tower", None)
    weights = sanitize(raw, config, with_vision=tower is not None, vision_tower=tower)
    if dtype is not None:
        weights = _cast(weights, dtype)
    for k in weights:
        if k.endswith(SHIFTED_NORM_SUFFIXES):
            weights[k] = weights[k].astype(mx.float32)
    quantize_like_checkpoint(model, weights, config.raw)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        first = str(e).splitlines()[0]
        raise UserError(
            f"{source}: the weights do not match config.json ({first}); the checkpoint is "
            f"incomplete or for another model"
        ) from None
    mx.eval(model.parameters())
    model.eval()
    return model


def load(path_or_repo: str | Path, dtype: str | mx.Dtype | None = None) -> tuple[Model, Any]:
    """`(model, processor)` for a local directory, a Hub repo id or `tiny-random`."""
    from ..inputs.processor import Processor

    model_dir = resolve_model_path(path_or_repo)
    model = load_model(model_dir, dtype)
    processor = Processor.from_pretrained(model_dir, model.config)
    return model, processor
