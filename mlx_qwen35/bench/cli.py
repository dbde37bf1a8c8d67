"""`python -m mlx_qwen35.bench`: prompt and generation speed, optionally against mlx-lm.

Prompt tok/s, generation tok/s and peak memory for one model, either a checkpoint (`--model`) or
random weights with the real text dimensions of a Qwen3.5 size (`--config`). With `--vs mlx-lm`
the same weights also go into mlx-lm's own `qwen3_5` model in this process and the runs alternate
(ours, theirs, ours, theirs...), so that the ratios, not the absolute times, are the figures to
quote on a shared machine.

Ours runs through the engine, as generate does (`concurrency.engine_run`); mlx-lm's through the
loop of its `generate_step`: the prompt in steps of `--prefill-step-size` evaluating only the
cache states, then the logits of the last prompt position, then greedy decoding with the next step
queued (`mx.async_eval`) before the current token is read. Both pipeline the same way. Prompt
tok/s counts the prompt up to the first generated token; generation tok/s counts the tokens after
the first over the time after it. `--concurrency 1,2,4,8` measures N requests at once instead
(see concurrency.py), against mlx-lm's BatchGenerator with `--vs mlx-lm`.
"""

from __future__ import annotations

import copy
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import click
import mlx.core as mx

from ..errors import UserError
from ..model.config import ModelConfig, TextConfig
from ..model.gated_delta import BACKENDS, ENV_VAR
from ..model.model import Model
from ..weights import loading
from .concurrency import RunResult, engine_run, run_levels

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
FAST_BLAS = ("openblas", "mkl", "blis")

_ROPE = {
    "rope_type": "default",
    "rope_theta": 10000000.0,
    "partial_rotary_factor": 0.25,
    "mrope_section": [11, 11, 10],
    "mrope_interleaved": True,
}

# Text dimensions of the public Qwen3.5 checkpoints. 0.8b and 9b are from spec §1; 2b and 4b are
# from their public config.json files as we know them (no download here to confirm). `tiny` is for
# smoke tests only.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        vocab_size=512,
        tie_word_embeddings=False,
        rope_parameters=dict(_ROPE, mrope_section=[2, 1, 1]),
    ),
    "0.8b": dict(
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=16,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        vocab_size=248320,
        tie_word_embeddings=True,
        rope_parameters=_ROPE,
    ),
    "2b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=16,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        vocab_size=248320,
        tie_word_embeddings=True,
        rope_parameters=_ROPE,
    ),
    "4b": dict(
        hidden_size=2560,
        intermediate_size=9216,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        vocab_size=248320,
        tie_word_embeddings=True,
        rope_parameters=_ROPE,
    ),
    "9b": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        vocab_size=248320,
        tie_word_embeddings=False,
        rope_parameters=_ROPE,
    ),
}


def size_config(size: str) -> dict[str, Any]:
    """A config.json dict (HF layout, text only) with the text dimensions of `size`."""
    text = copy.deepcopy(SIZES[size])
    text.update(
        model_type="qwen3_5_text",
        linear_conv_kernel_dim=4,
        full_attention_interval=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=262144,
        hidden_act="silu",
    )
    n = text["num_hidden_layers"]
    text["layer_types"] = [
        "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)
    ]
    return {
        "model_type": "qwen3_5",
        "text_config": text,
        "tie_word_embeddings": text["tie_word_embeddings"],
    }


_LAYER_KEY = re.compile(
    r"^(model\.language_model\.|language_model\.model\.|model\.)layers\.(\d+)\."
)


def cut_layers(
    config: dict[str, Any], weights: dict[str, mx.array] | None, layers: int
) -> dict[str, Any]:
    """Keep the first `layers` decoder layers: returns the new config dict; drops the other
    layers' tensors from `weights` in place."""
    config = copy.deepcopy(config)
    text = config.get("text_config") or config
    total = int(text.get("num_hidden_layers", 0))
    if not 1 <= layers <= total:
        raise UserError(f"--layers must be between 1 and {total} (the model's depth), got {layers}")
    text["num_hidden_layers"] = layers
    if text.get("layer_types"):
        text["layer_types"] = list(text["layer_types"][:layers])
    if weights is not None:
        for key in list(weights):
            m = _LAYER_KEY.match(key)
            if m and int(m.group(2)) >= layers:
                del weights[key]
    return config


def random_hf_weights(text: TextConfig, dtype: mx.Dtype, seed: int = 0) -> dict[str, mx.array]:
    """Random weights under their original HF names and layout: zero-centred (1+w) norms, conv1d
    as [C, 1, K], A_log in fp32. Each tensor is evaluated as soon as it is drawn, so the peak stays
    at the weights themselves."""
    key = mx.random.key(seed)
    out: dict[str, mx.array] = {}

    def draw(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0, dt=None) -> None:
        nonlocal key
        key, sub = mx.random.split(key)
        out[name] = mx.random.normal(shape, dt or dtype, loc=mean, scale=std, key=sub)
        mx.eval(out[name])

    H, inter = text.hidden_size, text.intermediate_size
    Hv, Dv, K = text.linear_num_value_heads, text.linear_value_head_dim, text.linear_conv_kernel_dim
    nh, nkv, hd = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    p = "model.language_model."
    draw(p + "embed_tokens.weight", (text.vocab_size, H), 0.02)
    for i in range(text.num_hidden_layers):
        q = f"{p}layers.{i}."
        draw(q + "input_layernorm.weight", (H,), 0.05)
        draw(q + "post_attention_layernorm.weight", (H,), 0.05)
        if text.is_linear(i):
            a = q + "linear_attn."
            draw(a + "in_proj_qkv.weight", (text.conv_dim, H), 0.02)
            draw(a + "in_proj_z.weight", (Hv * Dv, H), 0.02)
            draw(a + "in_proj_b.weight", (Hv, H), 0.02)
            draw(a + "in_proj_a.weight", (Hv, H), 0.02)
            draw(a + "conv1d.weight", (text.conv_dim, 1, K), 0.3)
            draw(a + "dt_bias", (Hv,), 0.5, mean=1.0)
            # A = exp(A_log) in roughly [1, 16], as Qwen initialises it.
            key, sub = mx.random.split(key)
            out[a + "A_log"] = mx.log(mx.random.uniform(1.0, 16.0, (Hv,), key=sub))
            draw(a + "norm.weight", (Dv,), 0.05, mean=1.0)
            draw(a + "out_proj.weight", (H, Hv * Dv), 0.02)
        else:
            a = q + "self_attn."
            draw(a + "q_proj.weight", (2 * nh * hd, H), 0.02)
            draw(a + "k_proj.weight", (nkv * hd, H), 0.02)
            draw(a + "v_proj.weight", (nkv * hd, H), 0.02)
            draw(a + "o_proj.weight", (H, nh * hd), 0.02)
            draw(a + "q_norm.weight", (hd,), 0.05)
            draw(a + "k_norm.weight", (hd,), 0.05)
        draw(q + "mlp.gate_proj.weight", (inter, H), 0.02)
        draw(q + "mlp.up_proj.weight", (inter, H), 0.02)
        draw(q + "mlp.down_proj.weight", (H, inter), 0.02)
    draw(p + "norm.weight", (H,), 0.05)
    if not text.tie_word_embeddings:
        draw("lm_head.weight", (text.vocab_size, H), 0.02)
    mx.eval(out)
    return out


def build_ours(raw: dict[str, mx.array], config: ModelConfig, dtype: mx.Dtype | None) -> Model:
    """Our model from original-layout (or any readable) tensors, as `loading.load_model` does."""
    return loading.model_from_weights(raw, replace(config, vision=None), dtype, "bench weights")


def _check_mlx_lm_layout(text: TextConfig, config: dict[str, Any]) -> None:
    """mlx-lm's qwen3_5 derives the layer kinds from full_attention_interval alone and needs a
    full-attention layer at index interval - 1; refuse what it would run differently or crash on."""
    interval = int((config.get("text_config") or config).get("full_attention_interval", 4))
    derived = [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention"
        for i in range(text.num_hidden_layers)
    ]
    if text.num_hidden_layers < interval:
        raise UserError(
            f"mlx-lm's qwen3_5 needs at least one full-attention layer: use --layers {interval} "
            "or more with --vs mlx-lm"
        )
    if derived != text.layer_types:
        raise UserError(
            "mlx-lm's qwen3_5 derives layer kinds from full_attention_interval and would run this "
            "checkpoint's layer_types differently; drop --vs mlx-lm"
        )


def build_mlx_lm(raw: dict[str, mx.array], config: dict[str, Any], dtype: mx.Dtype | None):
    """mlx-lm's own qwen3_5 model on the same tensors, through mlx-lm's own sanitize."""
    from mlx_lm.models import qwen3_5

    config = copy.deepcopy(config)
    config.pop("vision_config", None)
    _check_mlx_lm_layout(ModelConfig.from_dict(config).text, config)
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(config))
    weights = model.sanitize(dict(raw))
    loading.quantize_like_checkpoint(model, weights, config)
    if dtype is not None:
        keep = model.cast_predicate
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and keep(k) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model


def _greedy_step(model: Any, tokens: mx.array, cache: list[Any]) -> tuple[mx.array, mx.array]:
    logits = model(tokens[None], cache=cache)[:, -1, :]
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    return mx.argmax(logprobs, axis=-1), logprobs


def timed_run(
    model: Any, prompt: mx.array, generation_tokens: int, prefill_step_size: int, stream: Any
) -> RunResult:
    """One generation of `generation_tokens` tokens after `prompt`, timed as mlx-lm times it."""
    cache = model.make_cache()
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    with mx.stream(stream):
        rest = prompt
        while rest.size > 1:
            n = min(prefill_step_size, rest.size - 1)
            model(rest[None, :n], cache=cache)  # logits stay unevaluated: only states are needed
            mx.eval([c.state for c in cache])
            rest = rest[n:]
            mx.clear_cache()
        y, logprobs = _greedy_step(model, rest, cache)
        mx.async_eval(y, logprobs)
        for n in range(generation_tokens):
            if n + 1 < generation_tokens:
                next_y, next_logprobs = _greedy_step(model, y, cache)
                mx.async_eval(next_y, next_logprobs)
            y.item()
            if n == 0:
                first = time.perf_counter()
            if n + 1 < generation_tokens:
                y, logprobs = next_y, next_logprobs
    end = time.perf_counter()
    generated_after_first = generation_tokens - 1
    return RunResult(
        prompt_tps=prompt.size / (first - tic),
        generation_tps=generated_after_first / (end - first) if generated_after_first else 0.0,
        peak_gb=mx.get_peak_memory() / 1e9,
    )


def slow_blas_warning(
    platform: str | None = None, preload: str | None = None, maps: str | None = None
) -> str | None:
    """A one-line warning when MLX on Linux runs its bundled reference BLAS, else None.

    MLX's Linux wheel links a slow reference BLAS (~6 GFLOP/s fp32 matmul); a fast BLAS takes over
    only when preloaded, so it shows both in LD_PRELOAD and among the mapped libraries.
    """
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux"):
        return None
    preload = os.environ.get("LD_PRELOAD", "") if preload is None else preload
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            maps = ""
    preloaded = [p for p in re.split(r"[:\s]+", preload) if p]
    mapped = {line.split()[-1] for line in maps.splitlines() if "/" in line}
    for lib in preloaded:
        name = os.path.basename(lib).lower()
        real = os.path.realpath(lib)
        fast = any(b in name or b in real.lower() for b in FAST_BLAS) or "blas" in name
        if fast and (lib in mapped or real in mapped):
            return None
    return (
        "warning: MLX is using its bundled reference BLAS, which is very slow on Linux; rerun "
        f"with LD_PRELOAD={OPENBLAS} (Debian/Ubuntu package libopenblas0-pthread)"
    )


def _prompt_tokens(n: int, vocab: int, seed: int) -> mx.array:
    return mx.random.randint(0, min(vocab, 240000), (n,), key=mx.random.key(seed + 1))


@dataclass
class Entry:
    label: str
    model: Any
    backend: str | None  # our gated delta backend; None = the default rule (or not ours)


def _with_backend(backend: str | None, fn: Callable[[], RunResult]) -> RunResult:
    saved = os.environ.get(ENV_VAR)
    if backend is not None:
        os.environ[ENV_VAR] = backend
    try:
        return fn()
    finally:
        if saved is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved


def _print_row(run: str, label: str, r: RunResult, width: int) -> None:
    click.echo(
        f"{run:<7}{label:<{width}}{r.prompt_tps:>14.2f}{r.generation_tps:>12.2f}{r.peak_gb:>10.3f}",
    )


def _median(results: list[RunResult]) -> RunResult:
    return RunResult(
        statistics.median(r.prompt_tps for r in results),
        statistics.median(r.generation_tps for r in results),
        statistics.median(r.peak_gb for r in results),
    )


def load_source(
    model_path: str | None, size: str | None, layers: int | None, dtype: mx.Dtype | None, seed: int
) -> tuple[dict[str, Any], dict[str, mx.array], str]:
    """(config dict, original-layout tensors, description) for --model or --config."""
    if (model_path is None) == (size is None):
        raise UserError("pass exactly one of --model (a checkpoint) or --config (random weights)")
    if model_path is not None:
        model_dir = loading.resolve_model_path(model_path)
        config = loading.load_config(model_dir).raw
        raw = loading.read_weights(model_dir)
        if layers is not None:
            config = cut_layers(config, raw, layers)
        return config, raw, f"model {model_path}"
    config = size_config(size)
    if layers is not None:
        config = cut_layers(config, None, layers)
    text = ModelConfig.from_dict(config).text
    raw = random_hf_weights(text, dtype or mx.float32, seed)
    return config, raw, f"config {size} (random weights)"


@click.command()
@click.option("--model", "model_path", help="Checkpoint: local dir, Hub repo id or tiny-random.")
@click.option(
    "--config",
    "size",
    type=click.Choice(list(SIZES)),
    help="Random weights with the real text dimensions of this Qwen3.5 size (no download).",
)
@click.option("--layers", type=int, help="Keep only the first N decoder layers.")
@click.option("-p", "--prompt-tokens", default=2048, show_default=True, type=click.IntRange(1))
@click.option("-g", "--generation-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    help="Weights dtype [--config: float32; --model: as stored].",
)
@click.option("--prefill-step-size", default=2048, show_default=True, type=click.IntRange(1))
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(1))
@click.option("--vs", type=click.Choice(["mlx-lm"]), help="Also run mlx-lm's model, alternating.")
@click.option(
    "--gdn-backend",
    "backends",
    multiple=True,
    type=click.Choice(BACKENDS),
    help=f"Force our gated delta backend ({ENV_VAR}); repeat to compare several.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--concurrency",
    callback=lambda ctx, param, value: _levels(value),
    help="Stream counts, e.g. 1,2,4,8: aggregate and per-stream generation tok/s with that many "
    "requests at once (mlx-lm's BatchGenerator with --vs mlx-lm).",
)
def main(
    model_path,
    size,
    layers,
    prompt_tokens,
    generation_tokens,
    dtype,
    prefill_step_size,
    repeats,
    vs,
    backends,
    seed,
    concurrency,
) -> None:
    """Prompt tok/s, generation tok/s and peak memory (optionally against mlx-lm)."""
    try:
        _main(
            model_path,
            size,
            layers,
            prompt_tokens,
            generation_tokens,
            dtype,
            prefill_step_size,
            repeats,
            vs,
            backends,
            seed,
            concurrency,
        )
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


def _main(
    model_path,
    size,
    layers,
    prompt_tokens,
    generation_tokens,
    dtype,
    prefill_step_size,
    repeats,
    vs,
    backends,
    seed,
    concurrency=None,
) -> None:
    warning = slow_blas_warning()
    if warning:
        click.echo(warning, err=True)
    dt = loading.parse_dtype(dtype)
    config, raw, what = load_source(model_path, size, layers, dt, seed)
    model_config = ModelConfig.from_dict(config)
    text = model_config.text
    ours = build_ours(raw, model_config, dt)
    entries = [Entry(f"mlx-qwen35[{b}]", ours, b) for b in backends] or [
        Entry("mlx-qwen35", ours, None)
    ]
    if vs == "mlx-lm":
        entries.append(Entry("mlx-lm", build_mlx_lm(raw, config, dt), None))
    del raw
    mx.clear_cache()

    stream = mx.new_stream(mx.default_device())
    prompt = _prompt_tokens(prompt_tokens, text.vocab_size, seed)
    dtype_name = dtype or str(ours.language_model.model.embed_tokens.weight.dtype).split(".")[-1]
    click.echo(
        f"{what}, {text.num_hidden_layers} layers, {dtype_name}, device {mx.default_device()}; "
        f"prompt {prompt_tokens} tokens, generation {generation_tokens} tokens, prefill step "
        f"{prefill_step_size}"
    )
    if concurrency:
        models = [("mlx-qwen35", ours)] + [
            (e.label, e.model) for e in entries if e.label == "mlx-lm"
        ]
        run_levels(
            models,
            concurrency,
            prompt_tokens,
            generation_tokens,
            prefill_step_size,
            repeats,
            text.vocab_size,
            seed,
        )
        return

    def run(e: Entry, prompt: mx.array, n: int, step: int) -> RunResult:
        if e.label == "mlx-lm":
            return timed_run(e.model, prompt, n, step, stream)
        return _with_backend(e.backend, lambda: engine_run(e.model, prompt, n, step))

    for e in entries:  # warm-up: first-call costs (allocations, lazy setup) stay out of the timing
        run(e, prompt[:8], 2, 8)

    width = max(len(e.label) for e in entries) + 2
    click.echo(f"{'run':<7}{'model':<{width}}{'prompt tok/s':>14}{'gen tok/s':>12}{'peak GB':>10}")
    results: dict[str, list[RunResult]] = {e.label: [] for e in entries}
    for r in range(repeats):
        for e in entries:
            res = run(e, prompt, generation_tokens, prefill_step_size)
            results[e.label].append(res)
            _print_row(str(r + 1), e.label, res, width)
    medians = {label: _median(rs) for label, rs in results.items()}
    if repeats > 1:
        for label, m in medians.items():
            _print_row("median", label, m, width)
    if vs == "mlx-lm":
        theirs = medians["mlx-lm"]
        for e in entries[:-1]:
            m = medians[e.label]
            click.echo(
                f"{e.label} / mlx-lm: prompt {_ratio(m.prompt_tps, theirs.prompt_tps)}, "
                f"generation {_ratio(m.generation_tps, theirs.generation_tps)}, "
                f"peak memory {_ratio(m.peak_gb, theirs.peak_gb)}"
            )


def _levels(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        levels = [int(v) for v in value.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"give stream counts like 1,2,4,8, not {value!r}")
    return levels


def _ratio(ours: float, theirs: float) -> str:
    # -g 1 has no tokens after the first, so no generation rate to compare.
    return f"{ours / theirs:.2f}x" if theirs > 0 else "n/a"


if __name__ == "__main__":
    main()
