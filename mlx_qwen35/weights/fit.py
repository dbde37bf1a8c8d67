"""Will it fit? The memory a model needs at a context length, against what this machine can wire.

    weights      the checkpoint's weight files, from their safetensors headers (exact), cast to
                 --dtype when one is given; split over the machines of a distributed run (the
                 embedding, head and vision tower stay whole on each)
    KV cache     2 (keys, values) x full-attention layers x KV heads x head_dim x context (in the
                 cache's 256-position steps) x batch, in the activation dtype; with `kv_bits`,
                 bits/8 bytes per element plus one scale and one bias (activation dtype) per
                 `kv_group_size` elements, mlx-lm's quantized KV layout
    recurrent    per DeltaNet layer and sequence: the fp32 state Hv x Dv x Dk and the conv window
                 (K - 1) x conv channels
    activations  one prefill step's transient arrays: residual-stream copies, the widest
                 projection output (the routed experts' k rows per token on MoE), the attention
                 scores of a step where no fused kernel avoids them, and one row of fp32 logits
What a machine can wire: on a Mac, Metal's recommended working set
(`mx.metal.device_info()["max_recommended_working_set_size"]`), the memory macOS lets the GPU
keep resident; elsewhere the physical RAM.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..errors import UserError
from ..model.attention import SCORE_BUDGET
from ..model.config import ModelConfig, load_config
from .loading import weight_files
from .safetensors_file import DTYPE_BYTES, read_entries

KV_STEP = 256  # KVCache grows in steps of this many positions
WARN_FRACTION = 0.9  # above this share of the wireable memory, warn: other programs need some
GB = 1e9
_DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
_WHOLE_ON_EACH = ("embed_tokens.", "lm_head.", "visual.", "vision_tower.")


@dataclass(frozen=True)
class FitEstimate:
    weights: int
    kv_cache: int
    recurrent: int
    activations: int
    capacity: int
    capacity_source: str
    context: int
    machines: int = 1
    kv_format: str = "16-bit"  # bits per KV element: the activation dtype's, or kv_bits

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.recurrent + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def tight(self) -> bool:
        return self.total > WARN_FRACTION * self.capacity

    def summary(self) -> str:
        """One line: the parts, the total and what the machine can wire."""
        per = " per machine" if self.machines > 1 else ""
        left = self.capacity - self.total
        return (
            f"memory{per}: weights {_gb(self.weights)} + KV cache {_gb(self.kv_cache)} "
            f"({self.context} tokens, {self.kv_format}) + recurrent states "
            f"{_gb(self.recurrent)} + activations {_gb(self.activations)} = {_gb(self.total)} of "
            f"{_gb(self.capacity)} ({self.capacity_source}), "
            + (f"{_gb(left)} left" if left >= 0 else f"{_gb(-left)} short")
        )

    def advice(self) -> str:
        more = "more machines" if self.machines == 1 else "more machines than these"
        return (
            "use a smaller quantization (a 4-bit checkpoint, or convert one with "
            "`python -m mlx_qwen35.convert -q`), a shorter context (--max-tokens), or "
            f"{more} (--distributed with mlx.launch)"
        )


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def machine_capacity() -> tuple[int, str]:
    """(bytes this machine can wire for the model, where the figure comes from)."""
    if mx.metal.is_available():
        info = mx.metal.device_info()
        size = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if size:
            return int(size), "Metal's recommended working set"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical RAM"
    except (ValueError, OSError, AttributeError):
        return 0, "unknown"


def _expert_matrix(key: str) -> bool:
    if key.endswith((".scales", ".biases")):
        return False
    return ".experts." in key or (".switch_mlp." in key and key.endswith(".weight"))


def checkpoint_bytes(
    model_dir: Path, dtype: str | None = None, with_vision: bool = True
) -> tuple[int, int, int]:
    """(bytes of every weight, bytes of those each machine keeps whole, activation dtype size),
    from the safetensors headers; floating tensors counted at `dtype` when one is given (A_log
    and the norms stay fp32 whatever the cast)."""
    total = whole = 0
    act = None
    target = _DTYPE_SIZES.get(dtype) if dtype else None
    for f in weight_files(Path(model_dir)):
        for key, entry in read_entries(f).items():
            if not with_vision and key.startswith(("model.visual.", "vision_tower.")):
                continue
            kind = entry["dtype"]
            size = DTYPE_BYTES.get(kind, 2)
            floating = kind in ("F32", "F16", "BF16")
            if target and floating and not key.endswith(("A_log", "norm.weight")):
                size = target
            if floating and _expert_matrix(key) and not mx.metal.is_available():
                size = 4  # unquantized experts are held in fp32 off Metal (see loading.py)
            nbytes = size * math.prod(entry["shape"])
            total += nbytes
            if any(part in key for part in _WHOLE_ON_EACH):
                whole += nbytes
            if act is None and "embed_tokens." in key and floating:
                act = size  # the embedding (or its scales when quantized) sets the compute dtype
    return total, whole, act or target or 2


def estimate(
    config: ModelConfig,
    weights: int,
    context: int,
    *,
    whole_weights: int = 0,
    activation_bytes: int = 2,
    batch: int = 1,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prefill_step_size: int = 2048,
    machines: int = 1,
    capacity: tuple[int, str] | None = None,
) -> FitEstimate:
    """The estimate for `config` at `context` tokens per sequence (see the module doc).

    `kv_bits`: None keeps keys/values in the activation dtype; 8 or 4 quantize them as mlx-lm
    does. `machines`: processes of a distributed run; weights other than `whole_weights`, the KV
    cache and the recurrent states are divided among them.
    """
    t = config.text
    a = activation_bytes
    n_full = sum(1 for kind in t.layer_types if kind == "full_attention")
    n_linear = len(t.layer_types) - n_full
    slots = math.ceil(max(context, 1) / KV_STEP) * KV_STEP
    elements = 2 * n_full * t.num_key_value_heads * t.head_dim * slots * batch
    per_element = a if kv_bits is None else kv_bits / 8 + 2 * a / kv_group_size
    kv = int(elements * per_element)
    recurrent = (
        n_linear
        * batch
        * (
            t.linear_num_value_heads * t.linear_value_head_dim * t.linear_key_head_dim * 4
            + (t.linear_conv_kernel_dim - 1) * t.conv_dim * a
        )
    )
    step = min(prefill_step_size, max(context, 1)) * batch
    if t.moe is not None:
        mlp = t.moe.num_experts_per_tok * t.moe.moe_intermediate_size * 3
    else:
        mlp = t.intermediate_size * 3
    widest = max(
        mlp,
        2 * t.num_attention_heads * t.head_dim,
        t.conv_dim + t.linear_num_value_heads * t.linear_value_head_dim,
    )
    activations = step * (8 * t.hidden_size + widest) * a + t.vocab_size * 4 * batch
    # A step's attention scores, a block of queries at a time (model/attention.py): no fused
    # kernel takes head_dim 256 prompts, so a block's fp32 scores exist at once.
    activations += min(t.num_attention_heads * step * slots, SCORE_BUDGET) * 4
    if kv_bits is not None and not mx.metal.is_available():
        # The CPU's prefill attends over one layer's keys/values dequantized (attention.py).
        activations += 2 * t.num_key_value_heads * t.head_dim * slots * batch * a
    sharded = max(weights - whole_weights, 0)
    cap, source = capacity or machine_capacity()
    return FitEstimate(
        weights=whole_weights + sharded // machines,
        kv_cache=kv // machines,
        recurrent=recurrent // machines,
        activations=int(activations),
        capacity=cap,
        capacity_source=source,
        context=context,
        machines=machines,
        kv_format=f"{kv_bits or 8 * a}-bit",
    )


def check_fit(
    model_dir: str | Path,
    context: int,
    *,
    dtype: str | None = None,
    machines: int = 1,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prefill_step_size: int = 2048,
    capacity: tuple[int, str] | None = None,
    batch: int = 1,
) -> FitEstimate:
    """The estimate for the checkpoint in `model_dir`, before anything is loaded, for `batch`
    sequences of `context` tokens; a configuration that cannot fit raises a one-line UserError
    naming the options."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    total, whole, act = checkpoint_bytes(model_dir, dtype)
    est = estimate(
        config,
        total,
        context,
        whole_weights=whole,
        activation_bytes=act,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        prefill_step_size=prefill_step_size,
        machines=machines,
        capacity=capacity,
        batch=batch,
    )
    if est.capacity and not est.fits:
        raise UserError(
            f"{model_dir.name} will not fit: it needs about {_gb(est.total)} ({est.summary()}); "
            f"{est.advice()}"
        )
    return est


def tight_warning(est: FitEstimate) -> str | None:
    """A one-line warning when the estimate leaves little room, else None."""
    if not est.capacity or not est.tight or not est.fits:
        return None
    return (
        f"warning: {_gb(est.total)} of {_gb(est.capacity)} needed, little room left for "
        f"anything else; if it swaps, {est.advice()}"
    )


TEMPLATE_TOKENS = 16  # the chat template's role markers around a one-turn prompt


def count_tokens(model_dir: str | Path, texts: list[str]) -> int:
    """Tokens of `texts` (prompt, system) plus the chat template's few, by the checkpoint's own
    tokenizer.json; without one, their UTF-8 bytes (byte-level BPE never makes more tokens)."""
    tokenizer_file = Path(model_dir) / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        n = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts)
    else:
        n = sum(len(t.encode("utf-8")) for t in texts)
    return n + TEMPLATE_TOKENS
