"""Quantized KV caches through the engine: the cache changes format after exactly
quantized_kv_start tokens whatever the prefill steps; requests of different KV settings (and
rows crossing their threshold mid-decode) batch side by side and each gives what it gives alone;
the prefix cache serves a state only to requests that would have made it; bad settings are
refused at submit."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import build_hf_model, save_hf_checkpoint

from mlx_qwen35.engine.kv_settings import KVSettings
from mlx_qwen35.engine.request import Request
from mlx_qwen35.engine.scheduler import Engine
from mlx_qwen35.errors import UserError
from mlx_qwen35.model.cache import KVCache, QuantizedKVCache, maybe_quantize_kv_cache
from mlx_qwen35.weights.loading import load_model

LAYERS = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
ROPE = {
    "rope_type": "default",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.25,
    "mrope_section": [2, 3, 3],
    "mrope_interleaved": True,
}
RNG = np.random.default_rng(7)
PROMPTS = [[int(t) for t in RNG.integers(0, 300, n)] for n in (150, 41, 97, 63)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf = build_hf_model(
        "base", num_hidden_layers=4, layer_types=LAYERS, head_dim=64, rope_parameters=ROPE, seed=9
    )
    return load_model(save_hf_checkpoint(hf, tmp_path_factory.mktemp("kv") / "hf"))


def run(engine: Engine, request: Request) -> tuple[list[int], np.ndarray]:
    events = list(engine.submit(copy.copy(request)))
    return [e.token for e in events], np.stack([np.array(e.logprobs) for e in events])


def alone(model, request: Request) -> tuple[list[int], np.ndarray]:
    return run(Engine(model, prefix_cache_bytes=0), request)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def reference(model, prompt: list[int], n: int, bits: int, start: int) -> list[np.ndarray]:
    """The rule at model level: prefill up to quantized_kv_start, convert, prefill the rest,
    then decode greedily, converting after the step that reaches the start."""
    cache = model.make_cache()
    if start == 0:  # every position is stored quantized
        cache = [QuantizedKVCache(64, bits) if isinstance(c, KVCache) else c for c in cache]
    cuts = sorted({0, min(start, len(prompt)), len(prompt)})
    for a, b in zip(cuts, cuts[1:], strict=False):
        logits = model(mx.array([prompt[a:b]]), cache=cache)
        maybe_quantize_kv_cache(cache, start, 64, bits)
    out = []
    for _ in range(n):
        row = logits[0, -1]
        out.append(np.array(row - mx.logsumexp(row)))
        logits = model(mx.array([[int(np.argmax(out[-1]))]]), cache=cache)
        maybe_quantize_kv_cache(cache, start, 64, bits)
    return out


@pytest.mark.parametrize("start", [0, 100, 153])  # from the start; in the prompt; in decoding
def test_the_format_changes_at_quantized_kv_start_whatever_the_prefill_steps(model, start):
    request = Request(prompt=PROMPTS[0], max_tokens=8, kv_bits=8, quantized_kv_start=start)
    ref = reference(model, PROMPTS[0], 8, 8, start)
    plain = alone(model, Request(prompt=PROMPTS[0], max_tokens=8))[1]
    for step in (16, 37, 512):
        tokens, logprobs = alone(model, Request(**{**vars(request), "prefill_step_size": step}))
        assert tokens == [int(np.argmax(r)) for r in ref]
        assert max(rel_err(lp, r) for lp, r in zip(logprobs, ref, strict=True)) < 1e-5
    # Plain up to the step that reaches `start` (its logits still come from plain attention),
    # quantized from the next one.
    n_plain = max(0, start - len(PROMPTS[0]) + 1)
    if n_plain:
        assert rel_err(logprobs[:n_plain], plain[:n_plain]) < 1e-6
    assert rel_err(logprobs[n_plain:], plain[n_plain:]) > 1e-6


def test_requests_of_different_kv_settings_batch_like_each_alone(model):
    requests = [
        Request(prompt=PROMPTS[1], max_tokens=40),
        Request(prompt=PROMPTS[3], max_tokens=35, kv_bits=8, quantized_kv_start=0),
        # crosses its threshold mid-decode, while the others run
        Request(prompt=PROMPTS[2], max_tokens=20, kv_bits=4, quantized_kv_start=103),
        Request(prompt=PROMPTS[0][:60], max_tokens=15, kv_bits=8, kv_group_size=32,
                quantized_kv_start=40),
    ]  # fmt: skip
    expected = [alone(model, Request(**{**vars(r), "prefill_step_size": 16})) for r in requests]
    engine = Engine(model, prefill_step_size=16, prefix_cache_bytes=0)
    handles = [engine.submit(copy.copy(r)) for r in requests]
    formats = set()
    while engine.has_work():
        engine.step()
        if engine._cache is not None:
            formats.add(len(engine._cache.groups))
            for _, caches, _ in engine._cache.groups:
                kinds = {type(c) for c in caches[1::2]}
                assert len(kinds) == 1  # one format per batch
    assert max(formats) >= 3  # plain, 8-bit and 4-bit rows decoded side by side
    for handle, (tokens, logprobs) in zip(handles, expected, strict=True):
        got = list(handle)
        assert [e.token for e in got] == tokens
        err = max(rel_err(np.array(e.logprobs), lp) for e, lp in zip(got, logprobs, strict=True))
        # A plain row matches to rounding; in a quantized one, a last-bit difference in a key
        # (another batch shape rounds differently) may land it on the neighbouring level.
        assert err < (1e-5 if handle.request.kv_bits is None else 1e-3)


def test_the_prefix_cache_serves_a_state_only_to_requests_that_would_have_made_it(model):
    engine = Engine(model, prefill_step_size=32)
    kv8 = dict(kv_bits=8, quantized_kv_start=80)
    first = Request(prompt=PROMPTS[0][:120], max_tokens=3, boundaries=[50, 110], **kv8)
    list(engine.submit(first))
    entries = {e.length: e.kv_format for e in engine.prefix_cache.entries()}
    assert entries == {50: None, 110: (8, 64, 80)}  # plain below the start, quantized after
    assert engine.prefix_cache.entries()[1].layers[1][0] == "qkv"
    follow = Request(prompt=PROMPTS[0], max_tokens=5, **kv8)
    handle = engine.submit(copy.copy(follow))
    tokens = [e.token for e in handle]
    assert handle.stats.cached_tokens == 110
    assert tokens == alone(model, follow)[0]
    # Other settings: the plain state below every threshold serves, the quantized one does not.
    for other in (
        {},
        dict(kv_bits=4, quantized_kv_start=80),
        dict(kv_bits=8, quantized_kv_start=90),
    ):
        handle = engine.submit(Request(prompt=PROMPTS[0], max_tokens=1, **other))
        list(handle)
        assert handle.stats.cached_tokens == 50, other


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kv_bits=3), "kv_bits must be one of 4, 8"),
        (dict(kv_bits=4, kv_group_size=48), "kv_group_size must be one of 32, 64, 128"),
        (dict(kv_bits=4, kv_group_size=128), "does not divide the model's head_dim 64"),
        (dict(kv_bits=8, quantized_kv_start=-1), "quantized_kv_start must be >= 0"),
    ],
)
def test_bad_kv_settings_are_refused_at_submit(model, kwargs, match):
    with pytest.raises(UserError, match=match):
        Engine(model).submit(Request(prompt=[1, 2, 3], max_tokens=2, **kwargs))


def test_a_quantized_row_holds_quantized_layers_in_the_batch(model):
    engine = Engine(model, prefix_cache_bytes=0)
    handle = engine.submit(
        Request(prompt=PROMPTS[1], max_tokens=4, kv_bits=4, quantized_kv_start=0)
    )
    next(handle)
    ((_, caches, rows),) = engine._cache.groups
    assert rows == [0] and isinstance(caches[1], QuantizedKVCache) and caches[1].bits == 4
    handle.cancel()


def test_speculation_keeps_the_conversion_where_plain_decoding_puts_it(tmp_path):
    """A draft model's rounds never cross quantized_kv_start (they are cut short before it, and
    the step that reaches it decodes plainly), so speculative greedy output equals plain greedy
    output with the same KV settings. (8-bit: at 4 bits a verify block's last-bit rounding can
    move a later key to the neighbouring level, as another batch shape can.)"""
    from test_speculative import noisy_copy

    hf = build_hf_model(
        "base", num_hidden_layers=4, layer_types=LAYERS, head_dim=64, rope_parameters=ROPE, seed=9
    )
    path = save_hf_checkpoint(hf, tmp_path / "target")
    target, draft = load_model(path), noisy_copy(path, 0.002)
    prompt = PROMPTS[1]
    kv = dict(kv_bits=8, quantized_kv_start=len(prompt) + 10)
    plain, _ = alone(target, Request(prompt=prompt, max_tokens=30, **kv))
    engine = Engine(target, prefix_cache_bytes=0)
    handle = engine.submit(Request(prompt=prompt, max_tokens=30, draft_model=draft, **kv))
    while engine.has_work():
        engine.step()
        if engine.num_running:  # quantized exactly from the start on, whatever the rounds did
            (row,) = engine._running
            ((fmt, _, _),) = engine._cache.groups
            assert fmt == (
                (8, 64, kv["quantized_kv_start"]) if row.fed >= len(prompt) + 10 else None
            )
    assert [e.token for e in handle] == plain
    assert handle.stats.accepted_tokens > 0  # the draft really ran


def test_a_speculative_round_stops_short_of_quantized_kv_start():
    kv = KVSettings(kv_bits=4, quantized_kv_start=100)
    assert kv.draft_budget(90, 3) == 3  # verifies 91..94
    assert kv.draft_budget(97, 3) == 2  # verifies 98, 99, 100: the last one reaches the start
    assert kv.draft_budget(99, 3) == 0  # this step decodes plainly and converts after it
    assert kv.draft_budget(100, 3) == kv.draft_budget(5000, 3) == 3  # already quantized
    assert KVSettings().draft_budget(99, 3) == 3  # no kv_bits: nothing to keep
