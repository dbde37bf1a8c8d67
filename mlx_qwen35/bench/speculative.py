"""`python -m mlx_qwen35.bench --draft-model mtp|PATH|SIZE [--num-draft-tokens K]
[--draft-vocab N] [--scripted]`: speculative decoding against plain decoding in the same run.

Both decode greedily from the same prompt through the engine, alternating run by run; the
figures to quote are the ratios. Printed: acceptance (kept / proposed drafts), generation tok/s of
both and their ratio, and the cost model measured on the warm caches:

    t_step     one plain decode step (target forward on 1 token + head + argmax)
    t_verify   one verification (target forward on k + 1 tokens, per-token states, k + 1 heads)
    t_draft    one draft step (MTP layer or draft model, its head over N or all ids, argmax)
    speedup(a) = E(a) * t_step / (k * t_draft + t_verify),  E(a) = (1 - a^(k+1)) / (1 - a)

where a is the per-draft acceptance (independent drafts), E(a) the expected tokens per round, with
the break-even acceptance where speedup = 1. With --draft-vocab the full-head draft step is
measured too, to show where the cheaper head turns a loss into a gain.

Random weights accept almost nothing, so --scripted makes the target a bigram puppet at its real
dimensions (weights/scripted.py: layers silenced, a successor table in the head, the MTP head or
the draft model scripted alike): every draft is accepted by construction, and the run measures
the real end-to-end gain at that acceptance. A scripted model needs an untied head, so tied sizes
get one (the same matmul per step). With --draft-vocab the script stays inside the N draft ids.
--draft-model SIZE (with --config) draws a random draft of that size, e.g. 0.8b for 9b.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import mlx.core as mx
import numpy as np

from ..engine.drafters import ModelDrafter, MTPDrafter
from ..engine.request import Request
from ..engine.scheduler import Engine
from ..engine.speculative import _positions, check_num_draft_tokens
from ..engine.speculative import head_ids as speculative_head_ids
from ..errors import UserError
from ..model.cache import GatedDeltaCache, KVCache
from ..model.config import ModelConfig, TextConfig
from ..weights import loading
from ..weights.scripted import script_model

ACCEPTANCES = (0.5, 0.7, 0.9)
COST_REPEATS = 7


def random_mtp_weights(text: TextConfig, dtype: mx.Dtype, seed: int = 0) -> dict[str, mx.array]:
    """A random MTP head under its HF names (zero-centred norms), as shipped checkpoints hold."""
    key = mx.random.key(seed + 7)
    H, inter = text.hidden_size, text.intermediate_size
    nh, nkv, hd = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    shapes = {
        "mtp.fc.weight": (H, 2 * H),
        "mtp.layers.0.self_attn.q_proj.weight": (2 * nh * hd, H),
        "mtp.layers.0.self_attn.k_proj.weight": (nkv * hd, H),
        "mtp.layers.0.self_attn.v_proj.weight": (nkv * hd, H),
        "mtp.layers.0.self_attn.o_proj.weight": (H, nh * hd),
        "mtp.layers.0.mlp.gate_proj.weight": (inter, H),
        "mtp.layers.0.mlp.up_proj.weight": (inter, H),
        "mtp.layers.0.mlp.down_proj.weight": (H, inter),
    }
    norms = {
        "mtp.pre_fc_norm_embedding.weight": H,
        "mtp.pre_fc_norm_hidden.weight": H,
        "mtp.norm.weight": H,
        "mtp.layers.0.input_layernorm.weight": H,
        "mtp.layers.0.post_attention_layernorm.weight": H,
        "mtp.layers.0.self_attn.q_norm.weight": hd,
        "mtp.layers.0.self_attn.k_norm.weight": hd,
    }
    out = {}
    for name, shape in shapes.items():
        key, sub = mx.random.split(key)
        out[name] = mx.random.normal(shape, dtype, scale=0.02, key=sub)
    for name, n in norms.items():
        key, sub = mx.random.split(key)
        out[name] = mx.random.normal((n,), dtype, scale=0.05, key=sub)
    mx.eval(out)
    return out


def with_mtp_config(config: dict[str, Any], untie: bool) -> dict[str, Any]:
    config = copy.deepcopy(config)
    text = config.get("text_config") or config
    text["mtp_num_hidden_layers"] = 1
    if untie:
        text["tie_word_embeddings"] = False
        config["tie_word_embeddings"] = False
    return config


def puppet_table(ids: np.ndarray, seed: int) -> dict[int, int]:
    """A successor table that walks every id of `ids` in one random cycle."""
    order = np.random.RandomState(seed).permutation(ids)
    return dict(zip(order.tolist(), np.roll(order, -1).tolist(), strict=True))


def _median_time(fn: Callable[[], Any], undo: Callable[[], None]) -> float:
    fn()
    undo()
    times = []
    for _ in range(COST_REPEATS):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
        undo()
    return statistics.median(times)


def cost_model(model: Any, drafter: Any, prompt: mx.array, k: int, stream: Any) -> dict[str, float]:
    """t_step, t_verify and t_draft in seconds, measured on caches warm with the prompt; each
    measured call is undone (KV trimmed, DeltaNet states restored) so every repeat sees the same
    cache."""
    with mx.stream(stream):
        cache = model.make_cache()
        positions = _positions(cache, prompt.size)
        hidden = model.hidden_states(prompt[None], cache)
        drafter.prefill(prompt, None, hidden, positions)
        mx.eval([c.state for c in cache])
        gdn = [c for c in cache if isinstance(c, GatedDeltaCache)]
        saved = [(c[0], c[1]) for c in gdn]
        token = prompt[-1:]

        def undo(n: int) -> Callable[[], None]:
            def restore() -> None:
                for c, (conv, state) in zip(gdn, saved, strict=True):
                    c[0], c[1] = conv, state
                    c.steps = None
                for c in cache:
                    if isinstance(c, KVCache):
                        c.trim(n)

            return restore

        def step() -> None:
            mx.eval(mx.argmax(model(token[None], cache=cache)[:, -1], axis=-1))

        tokens = mx.concatenate([token] * (k + 1))

        def verify() -> None:
            for c in gdn:
                c.record_steps = True
            hidden = model.hidden_states(tokens[None], cache)
            for c in gdn:
                c.record_steps = False
            mx.eval(mx.argmax(model.language_model.logits(hidden), axis=-1), [c.steps for c in gdn])

        times = {
            "step": _median_time(step, undo(1)),
            "verify": _median_time(verify, undo(k + 1)),
        }
        times["draft"] = _draft_step_time(drafter, token, _positions(cache, 1))
    return times


def _draft_step_time(drafter: Any, token: mx.array, position: mx.array) -> float:
    """One draft step on the drafter's warm cache: its layer(s), its head, the argmax."""
    if isinstance(drafter, MTPDrafter):
        hidden = mx.zeros((1, 1, drafter.model.args.hidden_size), mx.float32)

        def step() -> None:
            o = drafter.mtp(
                drafter.model.embed(token[None]), hidden, drafter.cache, position_ids=position
            )
            mx.eval(mx.argmax(drafter.head(o[:, -1]), axis=-1))

        def undo() -> None:
            for c in drafter.cache:
                c.trim(1)

        return _median_time(step, undo)
    gdn = [c for c in drafter.cache if isinstance(c, GatedDeltaCache)]
    saved = [(c[0], c[1]) for c in gdn]

    def draft_step() -> None:
        hidden = drafter.model.hidden_states(token[None], drafter.cache)
        mx.eval(mx.argmax(drafter.head(hidden[:, -1]), axis=-1))

    def restore() -> None:
        for c, (conv, state) in zip(gdn, saved, strict=True):
            c[0], c[1] = conv, state
        for c in drafter.cache:
            if isinstance(c, KVCache):
                c.trim(1)

    return _median_time(draft_step, restore)


def expected_tokens(a: float, k: int) -> float:
    return k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def predicted_speedup(a: float, k: int, t: dict[str, float]) -> float:
    return expected_tokens(a, k) * t["step"] / (k * t["draft"] + t["verify"])


def break_even(k: int, t: dict[str, float]) -> float | None:
    """The acceptance where speculation starts to pay (None: it pays even at 0 / never)."""
    lo, hi = 0.0, 1.0
    if predicted_speedup(lo, k, t) >= 1:
        return 0.0
    if predicted_speedup(hi, k, t) < 1:
        return None
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted_speedup(mid, k, t) < 1 else (lo, mid)
    return hi


def print_cost_model(label: str, k: int, t: dict[str, float]) -> None:
    be = break_even(k, t)
    click.echo(
        f"cost model ({label}): t_verify/t_step {t['verify'] / t['step']:.2f}, "
        f"t_draft/t_step {t['draft'] / t['step']:.3f}; predicted speedup "
        + ", ".join(f"{predicted_speedup(a, k, t):.2f}x at {a}" for a in ACCEPTANCES)
        + f"; break-even acceptance {'never' if be is None else f'{be:.2f}'}"
    )


def timed_engine(
    model: Any,
    prompt: mx.array,
    g: int,
    step: int,
    draft: Any = None,
    k: int = 3,
    draft_vocab: int | None = None,
    processor: Any = None,
) -> tuple[Any, Any]:
    """One greedy generation of g tokens through the engine, plain or speculative, timed as
    `cli.timed_run` times plain decoding. Returns (RunResult, the request's stats)."""
    from .cli import RunResult

    mx.clear_cache()
    mx.reset_peak_memory()
    engine = Engine(model, processor, prefix_cache_bytes=0, prefill_step_size=step)
    request = Request(
        prompt=prompt.tolist(),
        max_tokens=g,
        stop_token_ids=(),
        draft_model=draft,
        num_draft_tokens=k,
        draft_vocab=draft_vocab,
    )
    tic = time.perf_counter()
    handle = engine.submit(request)
    for n, _ in enumerate(handle):
        if n == 0:
            first = time.perf_counter()
    end = time.perf_counter()
    result = RunResult(
        prompt_tps=prompt.size / (first - tic),
        generation_tps=(g - 1) / (end - first) if g > 1 else 0.0,
        peak_gb=mx.get_peak_memory() / 1e9,
    )
    return result, handle.stats


def _draft_source(
    spec: str, config: dict[str, Any], layers: int | None, dtype: mx.Dtype | None, seed: int
) -> tuple[dict[str, Any], dict[str, mx.array], str]:
    from .cli import SIZES, load_source

    if spec in SIZES and not Path(spec).exists():
        return load_source(None, spec, None, dtype, seed + 1)
    return load_source(spec, None, None, dtype, seed)


def bench_speculative(
    *,
    config: dict[str, Any],
    raw: dict[str, mx.array],
    what: str,
    model_path: str | None,
    dtype: mx.Dtype | None,
    draft_model: str,
    num_draft_tokens: int,
    draft_vocab: int | None,
    scripted: bool,
    prompt_tokens: int,
    generation_tokens: int,
    prefill_step_size: int,
    repeats: int,
    seed: int,
) -> None:
    from .cli import _median, _print_row, build_ours

    k = check_num_draft_tokens(num_draft_tokens)
    text = ModelConfig.from_dict(config).text
    mtp = draft_model == "mtp"
    if mtp and not any(key.startswith("mtp.") for key in raw):
        if model_path is not None:
            raise UserError(f"{model_path} has no MTP head; pass --draft-model PATH instead")
        raw.update(random_mtp_weights(text, dtype or mx.float32, seed))
    untie = scripted and text.tie_word_embeddings
    config = with_mtp_config(config, untie) if mtp or untie else config
    if untie:  # the puppet's head is rewritten; only its shape matters here
        raw["lm_head.weight"] = mx.zeros((text.vocab_size, text.hidden_size), mx.float32)
    target = build_ours(raw, ModelConfig.from_dict(config), dtype)
    raw.clear()  # the caller's dict too: tensors the puppet replaces must not stay alive
    vocab = text.vocab_size
    processor = _processor(model_path)
    head_ids = speculative_head_ids(target, processor, draft_vocab)
    draft = None
    if not mtp:
        d_config, d_raw, d_what = _draft_source(draft_model, config, None, dtype, seed)
        d_text = ModelConfig.from_dict(d_config).text
        if d_text.vocab_size != vocab:
            raise UserError(
                f"the draft model has {d_text.vocab_size} vocabulary rows, the target {vocab}; "
                "use a draft of the same family (same tokenizer)"
            )
        if scripted and d_text.tie_word_embeddings:
            d_config = with_mtp_config(d_config, True)
            d_raw["lm_head.weight"] = mx.zeros((vocab, d_text.hidden_size), mx.float32)
        draft = build_ours(d_raw, ModelConfig.from_dict(d_config), dtype)
        d_raw.clear()
        what += f"; draft {d_what}"
    pool = head_ids if head_ids is not None else np.arange(vocab)
    if scripted:
        table = puppet_table(pool, seed)
        script_model(target, table)
        if draft is not None:
            script_model(draft, table)
    prompt = mx.array(np.random.RandomState(seed + 1).choice(pool, prompt_tokens), mx.uint32)

    def make_drafter(ids: np.ndarray | None = head_ids) -> Any:
        return MTPDrafter(target, ids) if mtp else ModelDrafter(draft, ids)

    stream = mx.new_stream(mx.default_device())
    click.echo(
        f"{what}, {text.num_hidden_layers} layers{', scripted' if scripted else ''}; prompt "
        f"{prompt_tokens} tokens, generation {generation_tokens} tokens; draft "
        f"{'MTP head' if mtp else draft_model}, k = {k}"
        + (f", draft vocab {len(head_ids)} ids" if head_ids is not None else "")
    )
    draft_arg = "mtp" if mtp else draft
    runs = {
        "plain": lambda g, step: timed_engine(target, prompt, g, step, processor=processor),
        "speculative": lambda g, step: timed_engine(
            target, prompt, g, step, draft_arg, k, draft_vocab, processor
        ),
    }
    for run in runs.values():  # warm-up: first-call costs stay out of the timing
        run(5, 8)
    width = 13
    click.echo(
        f"{'run':<7}{'decoding':<{width}}{'prompt tok/s':>14}{'gen tok/s':>12}{'peak GB':>10}"
    )
    results: dict[str, list[Any]] = {"plain": [], "speculative": []}
    stats = []
    for r in range(repeats):
        for label, run in runs.items():
            res, st = run(generation_tokens, prefill_step_size)
            results[label].append(res)
            if label == "speculative":
                stats.append(st)
            _print_row(str(r + 1), label, res, width)
    p, s = _median(results["plain"]), _median(results["speculative"])
    if repeats > 1:
        _print_row("median", "plain", p, width)
        _print_row("median", "speculative", s, width)
    drafted = sum(st.draft_tokens for st in stats)
    accepted = sum(st.accepted_tokens for st in stats)
    acceptance = accepted / drafted if drafted else 0.0
    click.echo(
        f"acceptance {acceptance:.3f} ({accepted}/{drafted} drafts); "
        f"speculative / plain: generation "
        + (f"{s.generation_tps / p.generation_tps:.2f}x" if p.generation_tps else "n/a")
    )
    t = cost_model(target, make_drafter(), prompt, k, stream)
    print_cost_model("draft head over all ids" if head_ids is None else "draft vocab", k, t)
    if head_ids is not None:
        full = dict(t, draft=cost_model(target, make_drafter(None), prompt, k, stream)["draft"])
        print_cost_model("draft head over all ids", k, full)
    click.echo(
        f"predicted at the measured acceptance {acceptance:.2f}: "
        f"{predicted_speedup(acceptance, k, t):.2f}x"
    )


def _processor(model_path: str | None) -> Any:
    """The checkpoint's processor (its tokenizer ranks the draft vocabulary); None for random
    weights, whose draft vocabulary is then the first N ids (Qwen's ids follow its merges)."""
    if model_path is None:
        return None
    from ..inputs.processor import Processor

    model_dir = loading.resolve_model_path(model_path)
    return Processor.from_pretrained(model_dir, loading.load_config(model_dir))
