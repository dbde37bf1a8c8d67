"""Bench runs through the engine: one request as `generate` runs it, and several at once.

`engine_run` times one request submitted to the engine (the path of generate, ChatSession and the
server), so the single-stream figures include the scheduler's own cost. `--concurrency 1,2,4,8`
submits N requests at once for each level N and reports the aggregate generation tok/s and the
per-stream share. With `--vs mlx-lm`, mlx-lm's `BatchGenerator` runs the same prompts on its own
model with the same weights, level by level, alternating with ours.

Aggregate rate at N streams: prompts are prefilled one chunk per step while the rows already
running keep decoding, so the window counted is the one where all N rows decode together: from
the step that hands out the last stream's first token to the step of the first stream's last
token; the tokens handed out inside it over its length. At N = 1 this is the usual generation
rate (tokens after the first over the time after the first).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import click
import mlx.core as mx

from ..engine.request import Request
from ..engine.scheduler import Engine
from .cli import RunResult


@dataclass
class LevelResult:
    streams: int
    aggregate_tps: float

    @property
    def per_stream_tps(self) -> float:
        return self.aggregate_tps / self.streams


def engine_run(
    model: Any,
    prompt: mx.array,
    generation_tokens: int,
    prefill_step_size: int,
    kv: tuple[int | None, int, int] = (None, 64, 5000),
) -> RunResult:
    """One request through the engine, timed as mlx-lm times its generate. kv: (kv_bits,
    kv_group_size, quantized_kv_start)."""
    engine = Engine(model, prefill_step_size=prefill_step_size, prefix_cache_bytes=0)
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    kv_bits, kv_group_size, quantized_kv_start = kv
    request = Request(
        prompt=prompt.tolist(),
        max_tokens=generation_tokens,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
    )
    handle = engine.submit(request)
    first = tic
    for n, _ in enumerate(handle):
        if n == 0:
            first = time.perf_counter()
    end = time.perf_counter()
    after_first = generation_tokens - 1
    return RunResult(
        prompt_tps=prompt.size / (first - tic),
        generation_tps=after_first / (end - first) if after_first else 0.0,
        peak_gb=mx.get_peak_memory() / 1e9,
    )


def window_rate(stamps: list[list[float]]) -> float:
    """Tokens per second while every stream decodes (see the module docstring); `stamps`: when
    each stream's tokens were handed out."""
    start = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    count = sum(1 for s in stamps for t in s if start < t <= end)
    return count / (end - start) if end > start and count else 0.0


def ours_concurrent(
    model: Any, prompts: list[list[int]], generation_tokens: int, prefill_step_size: int
) -> float:
    engine = Engine(
        model,
        max_batch_size=len(prompts),
        prefill_step_size=prefill_step_size,
        prefix_cache_bytes=0,
    )
    handles = [engine.submit(Request(prompt=p, max_tokens=generation_tokens)) for p in prompts]
    stamps: list[list[float]] = [[] for _ in handles]
    while engine.has_work():
        engine.step()
        now = time.perf_counter()
        for handle, s in zip(handles, stamps, strict=True):
            s.extend([now] * (len(handle.tokens) - len(s)))
    return window_rate(stamps)


def mlx_lm_concurrent(
    model: Any, prompts: list[list[int]], generation_tokens: int, prefill_step_size: int
) -> float:
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(
        model,
        max_tokens=generation_tokens,
        completion_batch_size=len(prompts),
        prefill_batch_size=len(prompts),
        prefill_step_size=prefill_step_size,
    )
    try:
        uids = gen.insert(prompts, [generation_tokens] * len(prompts))
        stamps: dict[int, list[float]] = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            now = time.perf_counter()
            for r in responses:
                stamps[r.uid].append(now)
    finally:
        gen.close()
    return window_rate(list(stamps.values()))


def run_levels(
    entries: list[tuple[str, Any]],
    levels: list[int],
    prompt_tokens: int,
    generation_tokens: int,
    prefill_step_size: int,
    repeats: int,
    vocab: int,
    seed: int,
) -> None:
    """Print aggregate and per-stream generation tok/s of every run as it finishes, then the
    medians per level (and their scale against 1 stream) and ours over mlx-lm's aggregate.
    Levels and models alternate within each repeat, so a machine's load drifting over time
    weighs on all of them alike."""
    runs = {"mlx-qwen35": ours_concurrent, "mlx-lm": mlx_lm_concurrent}
    prompts = {
        level: [
            mx.random.randint(
                0, min(vocab, 240000), (prompt_tokens,), key=mx.random.key(seed + i)
            ).tolist()
            for i in range(level)
        ]
        for level in levels
    }
    for level in levels:  # first-call costs at each batch size stay out of the timing
        for label, model in entries:
            runs[label](model, [p[:8] for p in prompts[level]], 3, prefill_step_size)
    width = max(len(label) for label, _ in entries) + 2
    click.echo(
        f"{'run':<8}{'streams':<9}{'model':<{width}}{'aggregate gen tok/s':>21}{'per stream':>12}"
        f"{'vs 1 stream':>13}"
    )
    rates: dict[tuple[str, int], list[float]] = {}
    for r in range(repeats):
        for level in levels:
            for label, model in entries:
                rate = runs[label](model, prompts[level], generation_tokens, prefill_step_size)
                rates.setdefault((label, level), []).append(rate)
                click.echo(
                    f"{r + 1:<8}{level:<9}{label:<{width}}{rate:>21.2f}{rate / level:>12.2f}"
                )
    medians = {key: statistics.median(v) for key, v in rates.items()}
    for level in levels:
        for label, _ in entries:
            rate = medians[(label, level)]
            one = medians.get((label, 1), 0.0)
            scale = f"{rate / one:.2f}x" if one > 0 else "n/a"
            click.echo(
                f"{'median':<8}{level:<9}{label:<{width}}{rate:>21.2f}{rate / level:>12.2f}"
                f"{scale:>13}"
            )
    if len(entries) > 1:
        for level in levels:
            ours, theirs = medians[("mlx-qwen35", level)], medians[("mlx-lm", level)]
            ratio = f"{ours / theirs:.2f}x" if theirs > 0 else "n/a"
            click.echo(f"{level} streams: mlx-qwen35 / mlx-lm aggregate generation {ratio}")
