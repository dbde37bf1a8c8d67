"""config.json -> dataclasses, read by hand.

We never go through a library's config class: transformers' AutoConfig has been reported to replace
`linear_num_value_heads` with its class default, and mlx-vlm's defaults for the vision start/end ids
are wrong. Every field comes from the file; defaults only fill what a file may legitimately omit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .config_fields import typed, typed_list

MODEL_TYPES = ("qwen3_5", "qwen3_5_text")
VISION_MODEL_TYPES = ("qwen3_5_vision", "qwen3_5")
FORMAT_KEY = "mlx_qwen35_format"
FORMAT_VERSION = 1


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"config.json: {message}")


@dataclass
class RopeConfig:
    theta: float = 1e7
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, int, int] = (11, 11, 10)
    mrope_interleaved: bool = True
    rope_type: str = "default"
    # YaRN fields, used only when rope_type == "yarn".
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None

    @classmethod
    def from_text_dict(cls, d: dict[str, Any]) -> RopeConfig:
        # rope_scaling is an older alias of rope_parameters, `type` of `rope_type`; theta and
        # partial_rotary_factor may also sit at the text-config level.
        key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
        params = dict(typed(d, key, dict, {}))
        where = f"{key}."
        rope_type = typed(params, "rope_type", str, None, where=where)
        rope_type = rope_type or typed(params, "type", str, "default", where=where)
        section = typed_list(params, "mrope_section", int, None, where=where, length=3)
        if section is None:
            section = typed_list(d, "mrope_section", int, [11, 11, 10], length=3)
        theta = typed(d, "rope_theta", float, 1e7, positive=True)
        partial = typed(d, "partial_rotary_factor", float, 0.25, positive=True)
        return cls(
            theta=typed(params, "rope_theta", float, theta, where=where, positive=True),
            partial_rotary_factor=typed(
                params, "partial_rotary_factor", float, partial, where=where, positive=True
            ),
            mrope_section=tuple(section),
            mrope_interleaved=typed(params, "mrope_interleaved", bool, True, where=where),
            rope_type=rope_type,
            factor=typed(params, "factor", float, 1.0, where=where, positive=True),
            original_max_position_embeddings=typed(
                params, "original_max_position_embeddings", int, None, where=where, positive=True
            ),
            beta_fast=typed(params, "beta_fast", float, 32.0, where=where),
            beta_slow=typed(params, "beta_slow", float, 1.0, where=where),
            attention_factor=typed(params, "attention_factor", float, None, where=where),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rope_type": self.rope_type,
            "rope_theta": self.theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "mrope_section": list(self.mrope_section),
            "mrope_interleaved": self.mrope_interleaved,
        }
        if self.rope_type == "yarn":
            out.update(factor=self.factor, beta_fast=self.beta_fast, beta_slow=self.beta_slow)
            if self.original_max_position_embeddings is not None:
                out["original_max_position_embeddings"] = self.original_max_position_embeddings
            if self.attention_factor is not None:
                out["attention_factor"] = self.attention_factor
        return out


@dataclass
class TextConfig:
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 256
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    rms_norm_eps: float = 1e-6
    vocab_size: int = 248320
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    layer_types: list[str] = field(default_factory=list)
    rope: RopeConfig = field(default_factory=RopeConfig)
    mtp_num_hidden_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + (
            self.linear_num_value_heads * self.linear_value_head_dim
        )

    def is_linear(self, layer: int) -> bool:
        return self.layer_types[layer] == "linear_attention"

    @classmethod
    def from_dict(cls, d: dict[str, Any], tie_default: bool = False) -> TextConfig:
        ints = (
            "hidden_size intermediate_size num_hidden_layers num_attention_heads "
            "num_key_value_heads linear_num_key_heads linear_num_value_heads linear_key_head_dim "
            "linear_value_head_dim linear_conv_kernel_dim vocab_size max_position_embeddings"
        ).split()
        kwargs: dict[str, Any] = {}
        for name in ints:
            value = typed(d, name, int, None, positive=True)
            if value is not None:
                kwargs[name] = value
        kwargs["rms_norm_eps"] = typed(d, "rms_norm_eps", float, 1e-6, positive=True)
        cfg = cls(**kwargs)
        head_dim = typed(d, "head_dim", int, None, positive=True)
        cfg.head_dim = head_dim or cfg.hidden_size // cfg.num_attention_heads
        cfg.tie_word_embeddings = typed(d, "tie_word_embeddings", bool, tie_default)
        cfg.rope = RopeConfig.from_text_dict(d)
        cfg.mtp_num_hidden_layers = typed(d, "mtp_num_hidden_layers", int, 0, minimum=0)
        cfg.bos_token_id = typed(d, "bos_token_id", int, None, minimum=0)
        eos = d.get("eos_token_id")
        cfg.eos_token_id = (
            typed_list(d, "eos_token_id", int)
            if isinstance(eos, list)
            else typed(d, "eos_token_id", int, None, minimum=0)
        )
        layer_types = typed_list(d, "layer_types", str, None)
        if layer_types:
            cfg.layer_types = layer_types
        else:
            interval = typed(d, "full_attention_interval", int, 4, positive=True)
            cfg.layer_types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention"
                for i in range(cfg.num_hidden_layers)
            ]
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _require(
            len(self.layer_types) == self.num_hidden_layers,
            f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
            f"{self.num_hidden_layers}",
        )
        bad = sorted(set(self.layer_types) - {"linear_attention", "full_attention"})
        _require(not bad, f"unknown layer_types {bad}; expected linear_attention/full_attention")
        _require(
            self.linear_num_value_heads % self.linear_num_key_heads == 0,
            f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
            f"linear_num_key_heads ({self.linear_num_key_heads})",
        )
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({self.num_key_value_heads})",
        )
        _require(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        rot = self.rotary_dim
        _require(
            0 < rot <= self.head_dim and rot % 2 == 0,
            f"partial_rotary_factor {self.rope.partial_rotary_factor} gives rotary dim {rot}; "
            f"it must be even and in (0, head_dim={self.head_dim}]",
        )
        _require(
            len(self.rope.mrope_section) == 3 and sum(self.rope.mrope_section) == rot // 2,
            f"mrope_section {list(self.rope.mrope_section)} must have 3 entries summing to "
            f"rotary_dim/2 = {rot // 2}",
        )
        _require(
            self.rope.rope_type in ("default", "mrope", "yarn"),
            f"rope_type {self.rope.rope_type!r} is not supported (default, mrope or yarn)",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": "qwen3_5_text",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "layer_types": list(self.layer_types),
            "full_attention_interval": _interval_of(self.layer_types),
            "rope_parameters": self.rope.to_dict(),
            "mtp_num_hidden_layers": self.mtp_num_hidden_layers,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_bias": False,
            "hidden_act": "silu",
        }


def _interval_of(layer_types: list[str]) -> int:
    """The full_attention_interval that reproduces layer_types, or 4 if none does (informational:
    readers that honour layer_types, ours included, never use it)."""
    for interval in range(1, len(layer_types) + 1):
        derived = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(len(layer_types))
        ]
        if derived == layer_types:
            return interval
    return 4


@dataclass
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    out_hidden_size: int = 4096
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any], text_hidden: int) -> VisionConfig:
        vt = typed(d, "model_type", str, "qwen3_5_vision", where="vision_config.")
        _require(
            vt in VISION_MODEL_TYPES, f"vision_config.model_type {vt!r} is not a Qwen3.5 tower"
        )
        _require(
            not typed(d, "deepstack_visual_indexes", list, [], where="vision_config."),
            "vision_config.deepstack_visual_indexes must be empty: Qwen3.5 has no deepstack "
            "(this looks like a Qwen3-VL checkpoint)",
        )
        where = "vision_config."
        cfg = cls(
            out_hidden_size=typed(
                d, "out_hidden_size", int, text_hidden, where=where, positive=True
            )
        )
        for name in (
            "depth hidden_size intermediate_size num_heads in_channels patch_size "
            "temporal_patch_size spatial_merge_size num_position_embeddings"
        ).split():
            setattr(cfg, name, typed(d, name, int, getattr(cfg, name), where=where, positive=True))
        cfg.hidden_act = typed(d, "hidden_act", str, cfg.hidden_act, where=where)
        rope = typed(d, "rope_parameters", dict, {}, where=where)
        theta = typed(rope, "rope_theta", float, cfg.rope_theta, where=f"{where}rope_parameters.")
        cfg.rope_theta = typed(d, "rope_theta", float, theta, where=where, positive=True)
        _require(
            cfg.hidden_size % cfg.num_heads == 0,
            f"vision_config.hidden_size {cfg.hidden_size} must be a multiple of num_heads",
        )
        side = int(round(cfg.num_position_embeddings**0.5))
        _require(
            side * side == cfg.num_position_embeddings,
            "vision_config.num_position_embeddings must be a square number",
        )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": "qwen3_5_vision",
            "depth": self.depth,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "num_position_embeddings": self.num_position_embeddings,
            "out_hidden_size": self.out_hidden_size,
            "hidden_act": self.hidden_act,
            "rope_theta": self.rope_theta,
            "deepstack_visual_indexes": [],
        }


@dataclass
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    # Our converted format carries this marker: weights are already in our layout (norms hold 1+w,
    # conv1d is [C, K, 1]), so the loader must not transform them again.
    format_version: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        _require(
            model_type in MODEL_TYPES,
            f"model_type is {model_type!r}, but mlx-qwen35 runs only Qwen3.5 dense models "
            f"({', '.join(MODEL_TYPES)}); use mlx-lm for other architectures",
        )
        # Text-only checkpoints may be flat: then the whole dict is the text config.
        text_dict = typed(d, "text_config", dict, None) or d
        tie_default = typed(d, "tie_word_embeddings", bool, False)
        text = TextConfig.from_dict(text_dict, tie_default=tie_default)
        vision = None
        vision_dict = typed(d, "vision_config", dict, None)
        if vision_dict:
            vision = VisionConfig.from_dict(vision_dict, text.hidden_size)
        cfg = cls(model_type=model_type, text=text, vision=vision, raw=d)
        for (
            name
        ) in "image_token_id video_token_id vision_start_token_id vision_end_token_id".split():
            setattr(cfg, name, typed(d, name, int, getattr(cfg, name), minimum=0))
        cfg.format_version = d.get(FORMAT_KEY)
        _require(
            cfg.format_version in (None, FORMAT_VERSION),
            f"{FORMAT_KEY} is {cfg.format_version!r}; this version of mlx-qwen35 reads format "
            f"{FORMAT_VERSION}: upgrade mlx-qwen35 or re-convert the checkpoint",
        )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A config.json for our converted format (also readable by mlx-lm and mlx-vlm)."""
        out = dict(self.raw)
        out.update(
            model_type="qwen3_5",
            architectures=["Qwen3_5ForConditionalGeneration"],
            text_config=self.text.to_dict(),
            tie_word_embeddings=self.text.tie_word_embeddings,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
        )
        if self.vision is not None:
            out["vision_config"] = self.vision.to_dict()
        else:
            out.pop("vision_config", None)
        out[FORMAT_KEY] = FORMAT_VERSION
        return out


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json found; pass a Qwen3.5 checkpoint directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); re-download or re-convert the model") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return ModelConfig.from_dict(data)
