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
(see concurrency.py), against mlx-lm's BatchGenerator with `--vs mlx-lm`; `--context` measures
long prompts, both models then on the generate_step loop (see context.py).
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
import mlx.core as mx

from ..errors import UserError
from ..model.cache import check_kv_settings
from ..model.config import ModelConfig
from ..model.gated_delta import BACKENDS, ENV_VAR
from .context import context_options, kv_hook, parse_contexts, run_contexts
from .models import (  # noqa: F401 -- re-exported: tests and scripts build models through here
    SIZES,
    build_mlx_lm,
    build_ours,
    cut_layers,
    load_source,
    random_hf_weights,
    size_config,
)

__all__ = ["SIZES", "cut_layers", "main", "random_hf_weights", "size_config"]

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
FAST_BLAS = ("openblas", "mkl", "blis")


@dataclass
class RunResult:
    prompt_tps: float
    generation_tps: float
    peak_gb: float
    cache_gb: float = 0.0  # the caches' arrays after the run
    resident_gb: float = 0.0  # memory in use before the run (the weights of every model loaded)


def _greedy_step(
    model: Any, tokens: mx.array, cache: list[Any], after_step: Callable | None = None
) -> tuple[mx.array, mx.array]:
    logits = model(tokens[None], cache=cache)[:, -1, :]
    if after_step is not None:
        after_step(cache)
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    return mx.argmax(logprobs, axis=-1), logprobs


def _fill(model: Any, tokens: mx.array, cache: list[Any]) -> None:
    """A prefill step that only fills the caches. mlx-lm's model: its logits stay unevaluated, so
    MLX never computes what only they need (the last layer's attention output); ours is told so
    (`fill_only`), as the engine does: it would otherwise compute long prompts' attention in
    bounded blocks whether read or not."""
    if hasattr(model, "hidden_states"):
        model.hidden_states(tokens, cache, fill_only=True)
    else:
        model(tokens, cache=cache)


def timed_run(
    model: Any,
    prompt: mx.array,
    generation_tokens: int,
    prefill_step_size: int,
    stream: Any,
    after_step: Callable[[list[Any]], None] | None = None,
) -> RunResult:
    """One generation of `generation_tokens` tokens after `prompt`, timed as mlx-lm times it.

    after_step(cache) runs after every model call, where mlx-lm's generate_step quantizes the KV
    cache (`maybe_quantize_kv_cache`)."""
    cache = model.make_cache()
    mx.clear_cache()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    with mx.stream(stream):
        rest = prompt
        while rest.size > 1:
            n = min(prefill_step_size, rest.size - 1)
            _fill(model, rest[None, :n], cache)
            if after_step is not None:
                after_step(cache)
            mx.eval([c.state for c in cache])
            rest = rest[n:]
            mx.clear_cache()
        y, logprobs = _greedy_step(model, rest, cache, after_step)
        mx.async_eval(y, logprobs)
        for n in range(generation_tokens):
            if n + 1 < generation_tokens:
                next_y, next_logprobs = _greedy_step(model, y, cache, after_step)
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
        cache_gb=sum(c.nbytes for c in cache) / 1e9,
        resident_gb=resident / 1e9,
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
    # -g 1 times no token after the first: no generation rate (as its ratio says).
    gen = f"{r.generation_tps:.2f}" if r.generation_tps > 0 else "n/a"
    click.echo(f"{run:<7}{label:<{width}}{r.prompt_tps:>14.2f}{gen:>12}{r.peak_gb:>10.3f}")


def _median(results: list[RunResult]) -> RunResult:
    return RunResult(
        **{f: statistics.median(getattr(r, f) for r in results) for f in RunResult.__annotations__}
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option(
    "--q-bits",
    type=click.Choice(["4", "8"]),
    help="Quantize --config's random weights by the 4bit or 8bit recipe, as they are drawn.",
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
    "--draft-model",
    help="Speculative decoding against plain: mtp (the model's MTP head), a draft checkpoint, "
    "or with --config a size (random weights).",
)
@click.option("--num-draft-tokens", default=3, show_default=True, type=int)
@click.option("--draft-vocab", type=click.IntRange(1), help="Draft heads score only N token ids.")
@click.option(
    "--scripted",
    is_flag=True,
    help="Make the models a bigram puppet whose drafts are always accepted (real dimensions).",
)
@click.option(
    "--concurrency",
    callback=lambda ctx, param, value: _levels(value),
    help="Stream counts, e.g. 1,2,4,8: aggregate and per-stream generation tok/s with that many "
    "requests at once (mlx-lm's BatchGenerator with --vs mlx-lm).",
)
@context_options
def main(
    model_path,
    size,
    layers,
    prompt_tokens,
    generation_tokens,
    dtype,
    q_bits,
    prefill_step_size,
    repeats,
    vs,
    backends,
    seed,
    draft_model,
    num_draft_tokens,
    draft_vocab,
    scripted,
    contexts,
    kv_bits,
    kv_group_size,
    quantized_kv_start,
    concurrency,
) -> None:
    """Prompt tok/s, generation tok/s and peak memory (optionally against mlx-lm, or speculative
    decoding against plain decoding, or at long contexts with --context)."""
    kv = (None if kv_bits is None else int(kv_bits), kv_group_size, quantized_kv_start)
    try:
        if draft_model is not None:
            _speculative(
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
                draft_model,
                num_draft_tokens,
                draft_vocab,
                scripted,
            )
            return
        if draft_vocab is not None or scripted:
            raise UserError("--draft-vocab and --scripted go with --draft-model")
        _main(
            model_path,
            size,
            layers,
            prompt_tokens,
            generation_tokens,
            dtype,
            q_bits,
            prefill_step_size,
            repeats,
            vs,
            backends,
            seed,
            contexts,
            kv,
            concurrency,
        )
    except UserError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


def _main(
    model_path,
    size,
    layers,
    prompt_tokens,
    generation_tokens,
    dtype,
    q_bits,
    prefill_step_size,
    repeats,
    vs,
    backends,
    seed,
    contexts=None,
    kv=(None, 64, 5000),
    concurrency=None,
) -> None:
    lengths = None if contexts is None else parse_contexts(contexts)
    if concurrency and (lengths is not None or kv[0] is not None):
        raise UserError("--concurrency measures unquantized batches: drop --context/--kv-bits")
    warning = slow_blas_warning()
    if warning:
        click.echo(warning, err=True)
    from ..weights import loading
    from .concurrency import engine_run, run_levels

    dt = loading.parse_dtype(dtype)
    bits = int(q_bits) if q_bits is not None else None
    config, raw, what = load_source(model_path, size, layers, dt, seed, bits, vs)
    model_config = ModelConfig.from_dict(config)
    text = model_config.text
    check_kv_settings(*kv, head_dim=text.head_dim)
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
    weight = ours.language_model.model.embed_tokens.weight
    dtype_name = dtype or ("float32" if size else str(weight.dtype).split(".")[-1])
    click.echo(
        f"{what}, {text.num_hidden_layers} layers, {dtype_name}, device {mx.default_device()}; "
        f"prompt {contexts or prompt_tokens} tokens, generation {generation_tokens} tokens, "
        f"prefill step {prefill_step_size}"
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

    hooks = {e.label: kv_hook(e.label, *kv) for e in entries}

    def run(e: Entry, prompt: mx.array, n: int, step: int) -> RunResult:
        # The context bench drives both models through the same loop and reads their caches
        # after it (cache MB, peak over weights + caches); otherwise ours runs as generate does.
        if e.label == "mlx-lm" or lengths is not None:
            return _with_backend(
                e.backend, lambda: timed_run(e.model, prompt, n, step, stream, hooks[e.label])
            )
        return _with_backend(e.backend, lambda: engine_run(e.model, prompt, n, step, kv))

    for e in entries:  # warm-up: first-call costs (allocations, lazy setup) stay out of the timing
        run(e, prompt[:8], 2, 8)

    if lengths is not None:
        run_contexts(
            entries,
            lengths,
            generation_tokens,
            repeats,
            kv,
            text.vocab_size,
            seed,
            lambda e, prompt: run(e, prompt, generation_tokens, prefill_step_size),
        )
        return

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


def _speculative(
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
    draft_model,
    num_draft_tokens,
    draft_vocab,
    scripted,
) -> None:
    from ..weights import loading
    from .speculative import bench_speculative

    if vs is not None or backends:
        raise UserError("--draft-model compares with plain decoding; drop --vs and --gdn-backend")
    warning = slow_blas_warning()
    if warning:
        click.echo(warning, err=True)
    dt = loading.parse_dtype(dtype)
    config, raw, what = load_source(model_path, size, layers, dt, seed)
    bench_speculative(
        config=config,
        raw=raw,
        what=what,
        model_path=model_path,
        dtype=dt,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
        draft_vocab=draft_vocab,
        scripted=scripted,
        prompt_tokens=prompt_tokens,
        generation_tokens=generation_tokens,
        prefill_step_size=prefill_step_size,
        repeats=repeats,
        seed=seed,
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
