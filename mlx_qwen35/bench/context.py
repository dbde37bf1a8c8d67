"""`python -m mlx_qwen35.bench --context 4096,16384,65536 [--kv-bits 4|8] [--vs mlx-lm]`.

Long-context figures: for each prompt length, prompt tok/s, generation tok/s *at* that context
(the decode steps attend over the whole prompt), peak memory, the caches' bytes at the end, and
what the run held beyond the resident weights and those final caches ("over"): the prefill's
temporaries, which must stay bounded however long the prompt is.

The KV cache follows mlx-lm's rule in both models (`--kv-bits`, `--kv-group-size`,
`--quantized-kv-start`): after every model call, each KV cache holding at least
quantized_kv_start positions is replaced by its quantized copy; ours through
`model.cache.maybe_quantize_kv_cache`, mlx-lm's through its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import mlx.core as mx

from ..cli.options import options
from ..errors import UserError
from ..model.cache import maybe_quantize_kv_cache


def parse_contexts(text: str) -> list[int]:
    """Prompt lengths from "4096,16384,65536"."""
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        lengths = []
    if not lengths or any(n < 2 for n in lengths):
        raise UserError(
            f"--context takes prompt lengths of at least 2 tokens separated by commas, e.g. "
            f"4096,16384,65536; got {text!r}"
        )
    return lengths


def kv_hook(
    label: str, kv_bits: int | None, kv_group_size: int, quantized_kv_start: int
) -> Callable[[list[Any]], None] | None:
    """The per-step cache quantization of `label`'s model (None without kv_bits)."""
    if kv_bits is None:
        return None
    if label == "mlx-lm":
        from mlx_lm.generate import maybe_quantize_kv_cache as theirs

        return lambda cache: theirs(cache, quantized_kv_start, kv_group_size, kv_bits)
    return lambda cache: maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)


context_options = options(
    click.option(
        "--context",
        "contexts",
        help="Long-context mode: prompt lengths, e.g. 4096,16384,65536 (replaces -p).",
    ),
    click.option(
        "--kv-bits", type=click.Choice(["4", "8"]), help="Quantize the KV cache (both models)."
    ),
    click.option("--kv-group-size", default=64, show_default=True, type=int),
    click.option("--quantized-kv-start", default=5000, show_default=True, type=int),
)


def run_contexts(
    entries: list[Any],
    contexts: list[int],
    generation_tokens: int,
    repeats: int,
    kv: tuple[Any, int, int],
    vocab_size: int,
    seed: int,
    run: Callable[..., Any],
) -> None:
    """Print one block per context length. kv: (kv_bits, kv_group_size, quantized_kv_start);
    `run(entry, prompt)` times one run (cli.timed_run with the entry's backend and KV hook)."""
    from .cli import _median, _ratio  # cli imports this module

    kv_bits, kv_group_size, quantized_kv_start = kv
    kv_text = "unquantized KV" if kv_bits is None else f"{kv_bits}-bit KV (group {kv_group_size})"
    start = "" if kv_bits is None else f", quantized from {quantized_kv_start} tokens"
    click.echo(f"context bench: {kv_text}{start}, generation {generation_tokens} tokens")
    width = max(len(e.label) for e in entries) + 2
    header = (
        f"{'context':>8}  {'model':<{width}}{'prompt tok/s':>13}{'gen tok/s':>11}"
        f"{'peak GB':>9}{'cache MB':>11}{'over GB':>9}"
    )
    for length in contexts:
        prompt = mx.random.randint(
            0, min(vocab_size, 240000), (length,), key=mx.random.key(seed + length)
        )
        click.echo(header)
        medians = {}
        for e in entries:
            results = []
            for _ in range(repeats):
                results.append(run(e, prompt))
            m = _median(results)
            medians[e.label] = m
            over = m.peak_gb - m.resident_gb - m.cache_gb
            click.echo(
                f"{length:>8}  {e.label:<{width}}{m.prompt_tps:>13.2f}{m.generation_tps:>11.2f}"
                f"{m.peak_gb:>9.3f}{m.cache_gb * 1e3:>11.3f}{over:>9.3f}"
            )
        if "mlx-lm" in medians:
            theirs = medians["mlx-lm"]
            for label, m in medians.items():
                if label != "mlx-lm":
                    click.echo(
                        f"{length:>8}  {label} / mlx-lm: prompt "
                        f"{_ratio(m.prompt_tps, theirs.prompt_tps)}, generation "
                        f"{_ratio(m.generation_tps, theirs.generation_tps)}, peak over resident "
                        f"{_ratio(m.peak_gb - m.resident_gb, theirs.peak_gb - theirs.resident_gb)}"
                    )
