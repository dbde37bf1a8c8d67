"""Quantized KV cache at model level: accuracy against the unquantized run and against mlx-lm's
own quantized cache on the same weights, size, conversion after quantized_kv_start, and the
extras our caches carry (rope_delta, key_mask, trim) through left padding, images and chunked
prefills."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import build_hf_model, save_hf_checkpoint

from mlx_qwen35.errors import UserError
from mlx_qwen35.model import attention as attention_module
from mlx_qwen35.model.cache import (
    GatedDeltaCache,
    KVCache,
    QuantizedKVCache,
    check_kv_settings,
    maybe_quantize_kv_cache,
)
from mlx_qwen35.weights.loading import load_config, load_model, read_weights

# mlx-lm's qwen3_5 derives layer kinds from full_attention_interval (layer 3 is full attention);
# head_dim 64 is a multiple of the default kv_group_size 64.
LAYERS = (
    ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"]
)
HEAD_DIM = 64
ROPE = {
    "rope_type": "default",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.25,
    "mrope_section": [2, 3, 3],
    "mrope_interleaved": True,
}
PROMPT = np.random.RandomState(0).randint(0, 300, size=1000)
DECODE = np.random.RandomState(1).randint(0, 300, size=20)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = build_hf_model(
        "base",
        num_hidden_layers=len(LAYERS),
        layer_types=LAYERS,
        head_dim=HEAD_DIM,
        rope_parameters=ROPE,
        seed=3,
    )
    return save_hf_checkpoint(hf, tmp_path_factory.mktemp("kv") / "hf", keep_vision=False)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def decode_logprobs(model, cache, quantize, kv_bits, group_size=64) -> np.ndarray:
    """Prefill PROMPT[:-1] in one step, quantize the cache as mlx-lm's generate_step does after
    it (quantized_kv_start 0), then feed PROMPT[-1] and DECODE one token at a time: the 21
    log-probability vectors, [21, vocab]."""
    model(mx.array(PROMPT[None, :-1]), cache=cache)
    quantize(cache, 0, group_size, kv_bits)
    out = []
    for t in [PROMPT[-1], *DECODE]:
        logits = model(mx.array([[int(t)]]), cache=cache)[0, -1].astype(mx.float32)
        out.append(np.array(logits - mx.logsumexp(logits)))
    return np.stack(out)


@pytest.fixture(scope="module")
def reference(model):
    return decode_logprobs(model, model.make_cache(), maybe_quantize_kv_cache, None)


@pytest.fixture(scope="module")
def mlx_lm_errors(checkpoint):
    """mlx-lm's own model and quantized cache on the same weights: {bits: error vs its own
    unquantized run}."""
    pytest.importorskip("mlx_lm")
    from mlx_lm.generate import maybe_quantize_kv_cache as theirs_quantize
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_qwen35.bench.cli import build_mlx_lm

    theirs = build_mlx_lm(read_weights(checkpoint), load_config(checkpoint).raw, None)
    ref = decode_logprobs(theirs, make_prompt_cache(theirs), theirs_quantize, None)
    return {
        bits: rel_err(
            decode_logprobs(theirs, make_prompt_cache(theirs), theirs_quantize, bits), ref
        )
        for bits in (4, 8)
    }


@pytest.mark.parametrize("bits, tol", [(8, 2e-3), (4, 1e-2)])
def test_quantized_logprobs_stay_close_and_match_mlx_lm_accuracy(
    model, reference, mlx_lm_errors, bits, tol
):
    cache = model.make_cache()
    ours = decode_logprobs(model, cache, maybe_quantize_kv_cache, bits)
    assert all(isinstance(c, (QuantizedKVCache, GatedDeltaCache)) for c in cache)
    assert all(c.bits == bits for c in cache if isinstance(c, QuantizedKVCache))
    err = rel_err(ours, reference)
    assert 0 < err < tol  # 0 would mean nothing was quantized
    # At least as accurate as mlx-lm's cache (same rule, same quantizer: equal up to rounding).
    assert err <= mlx_lm_errors[bits] * 1.02 + 1e-6


def greedy(model, cache, steps, kv_bits=None, start=0):
    logits = model(mx.array(PROMPT[None, :200]), cache=cache)
    maybe_quantize_kv_cache(cache, start, 64, kv_bits)
    tokens = []
    for _ in range(steps):
        tokens.append(int(mx.argmax(logits[0, -1])))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)
        maybe_quantize_kv_cache(cache, start, 64, kv_bits)
    return tokens


def test_greedy_tokens_from_8_bit_cache_match_unquantized(model):
    assert greedy(model, model.make_cache(), 12, 8) == greedy(model, model.make_cache(), 12)


def test_4_bit_cache_holds_under_a_third_of_the_bf16_bytes(checkpoint):
    model = load_model(checkpoint, dtype="bfloat16")
    caches = []
    for bits in (None, 4):
        cache = model.make_cache()
        model(mx.array(PROMPT[None, :768]), cache=cache)
        maybe_quantize_kv_cache(cache, 0, 64, bits)
        for t in DECODE:  # both grow past their first 768 positions the same way
            model(mx.array([[int(t)]]), cache=cache)
        mx.eval([c.state for c in cache])
        caches.append(cache)
    plain, quant = caches
    kv_plain = sum(c.nbytes for c in plain if isinstance(c, KVCache))
    kv_quant = sum(c.nbytes for c in quant if isinstance(c, QuantizedKVCache))
    assert plain[3].keys.dtype == mx.bfloat16 and kv_plain > 0
    assert kv_quant <= 0.3 * kv_plain
    # The recurrent states are not part of the KV format: same bytes either way.
    gdn = [sum(c.nbytes for c in x if isinstance(c, GatedDeltaCache)) for x in (plain, quant)]
    assert gdn[0] == gdn[1] > 0


def test_conversion_waits_for_quantized_kv_start_and_keeps_the_extras():
    cache = [GatedDeltaCache(), KVCache()]
    keys = mx.random.normal((2, 2, 10, 64), key=mx.random.key(0))
    values = mx.random.normal((2, 2, 10, 64), key=mx.random.key(1))
    cache[1].update_and_fetch(keys, values)
    cache[1].rope_delta = mx.array([-3, 5])
    cache[1].key_mask = mx.array([[False] * 2 + [True] * 8, [True] * 10])
    maybe_quantize_kv_cache(cache, 11, 64, 8)
    assert type(cache[1]) is KVCache  # 10 positions < quantized_kv_start 11
    maybe_quantize_kv_cache(cache, 10, 64, None)
    assert type(cache[1]) is KVCache  # no kv_bits: never
    maybe_quantize_kv_cache(cache, 10, 64, 8)
    q = cache[1]
    assert type(q) is QuantizedKVCache and type(cache[0]) is GatedDeltaCache
    assert (q.offset, q.bits, q.group_size) == (10, 8, 64)
    assert q.rope_delta.tolist() == [-3, 5]
    assert q.key_mask.tolist() == cache[1].key_mask.tolist()
    assert q.keys[0].shape[2] == 256  # the capacity carries over
    k_back = mx.dequantize(*q.keys, group_size=64, bits=8)[:, :, :10]
    assert rel_err(np.array(k_back), np.array(keys)) < 1e-2
    # Growing past the first step keeps the stored positions and adds the new ones.
    more = mx.random.normal((2, 2, 300, 64), key=mx.random.key(2))
    k_all, v_all = q.update_and_fetch(more, more)
    assert k_all[0].shape[2] == 310 and q.offset == 310
    back = np.array(mx.dequantize(*k_all, group_size=64, bits=8))
    assert rel_err(back[:, :, :10], np.array(keys)) < 1e-2
    assert rel_err(back[:, :, 10:], np.array(more)) < 1e-2
    assert q.trim(302) == 302 and q.offset == 8 and q.key_mask.shape == (2, 8)


def test_bad_kv_settings_are_user_errors():
    with pytest.raises(UserError, match="kv_bits must be one of 4, 8"):
        check_kv_settings(3)
    with pytest.raises(UserError, match="kv_group_size must be one of 32, 64, 128"):
        check_kv_settings(4, 48)
    with pytest.raises(UserError, match="quantized_kv_start must be >= 0"):
        check_kv_settings(8, 64, -1)
    with pytest.raises(UserError, match="64 does not divide the model's head_dim 96; use kv_gr"):
        check_kv_settings(8, 64, 0, head_dim=96)
    with pytest.raises(UserError, match="head_dim 48; run without kv_bits"):
        check_kv_settings(8, 32, 0, head_dim=48)
    check_kv_settings(None, 64, 0, head_dim=48)  # no quantization: any head_dim


def chunked_logits(model, ids, kv_bits, start, step, pad_mask=None, first=None):
    """Logits of the last position after prefilling `ids` [B, T] in steps of `step` (the first
    one `first` tokens long), with mlx-lm's conversion rule after each step."""
    cache = model.make_cache()
    bounds = [0, *range(first or step, ids.shape[1], step), ids.shape[1]]
    for a, b in zip(bounds, bounds[1:], strict=False):
        kwargs = {}
        if pad_mask is not None:
            kwargs["attention_mask"] = mx.array(pad_mask[:, a:b])
        logits = model(mx.array(ids[:, a:b]), cache=cache, **kwargs)
        maybe_quantize_kv_cache(cache, start, 64, kv_bits)
    return np.array(logits[:, -1]), cache


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_prefill_paths_agree(model, monkeypatch, bits):
    """A prompt that crosses quantized_kv_start mid-prefill: the CPU path (dequantize + BLAS),
    the quantized-matmul path the GPU takes, and that path cut into many query blocks give the
    same logits; and they stay close to the unquantized prefill."""
    ids = PROMPT[None, :300]
    cpu, cache = chunked_logits(model, ids, bits, 100, 64)
    assert isinstance(cache[3], QuantizedKVCache)
    monkeypatch.setattr(attention_module, "on_cpu", lambda: False)
    qmm, _ = chunked_logits(model, ids, bits, 100, 64)
    monkeypatch.setattr(attention_module, "SCORE_BUDGET", 4 * 64 * 7)
    blocked, _ = chunked_logits(model, ids, bits, 100, 64)
    assert rel_err(qmm, cpu) < 1e-5
    assert rel_err(blocked, qmm) < 1e-5
    plain, _ = chunked_logits(model, ids, None, 100, 64)
    assert rel_err(log_softmax(cpu), log_softmax(plain)) < (1e-2 if bits == 4 else 2e-3)


def test_unquantized_attention_in_query_blocks_matches(model, monkeypatch):
    ids = PROMPT[None, :300]
    whole, _ = chunked_logits(model, ids, None, 0, 300)
    monkeypatch.setattr(attention_module, "on_cpu", lambda: False)
    fused = chunked_logits(model, ids, None, 0, 300)[0]
    monkeypatch.setattr(attention_module, "SCORE_BUDGET", 4 * 300 * 5)
    blocked = chunked_logits(model, ids, None, 0, 100)[0]
    assert rel_err(fused, whole) < 1e-5
    assert rel_err(blocked, whole) < 1e-5


@pytest.mark.parametrize("gpu_paths", [False, True])
def test_left_padded_rows_match_their_solo_runs_with_a_quantized_cache(
    model, monkeypatch, gpu_paths
):
    """Two left-padded rows crossing quantized_kv_start in a chunked prefill, then decoding: each
    row gives what it gives alone (quantization is per position: padding changes nothing)."""
    if gpu_paths:
        monkeypatch.setattr(attention_module, "on_cpu", lambda: False)
        monkeypatch.setattr(attention_module, "SCORE_BUDGET", 4 * 160 * 9)
    long, short = PROMPT[:150], PROMPT[300:420]
    batch = np.zeros((2, 150), dtype=np.int64)
    batch[0], batch[1, 30:] = long, short
    pad = np.ones((2, 150), dtype=np.int32)
    pad[1, :30] = 0
    last, cache = chunked_logits(model, batch, 8, 64, 40, pad)
    nxt = mx.array([[5], [7]])
    step = np.array(model(nxt, cache=cache)[:, -1])
    for row, ids in enumerate((long, short)):
        # The same steps over the row's real tokens, converted after the same step.
        solo_last, solo_cache = chunked_logits(
            model, ids[None], 8, 64 - 30 * row, 40, first=40 - 30 * row
        )
        solo_step = np.array(model(nxt[row : row + 1], cache=solo_cache)[:, -1])
        # Not bit-exact: rotary over explicit positions (padded rows) rounds differently from
        # the offset fast path, and a last-bit change can move a value to the next quantization
        # level. Visible padding would be off by ~1e-1.
        assert rel_err(last[row], solo_last[0]) < 1e-3
        assert rel_err(step[row], solo_step[0]) < 1e-3


def test_image_prompt_continues_its_position_walk_over_a_quantized_cache(tmp_path):
    """An image prompt (3-D positions, rope_delta < 0) prefilled in two steps, converted after
    the first, then decoded: the cache keeps rope_delta through the conversion, and the
    logprobs stay within the 8-bit bound of the unquantized run."""
    from test_multimodal import Prompt

    hf = build_hf_model(vision=True, head_dim=HEAD_DIM, rope_parameters=ROPE, seed=4)
    model = load_model(save_hf_checkpoint(hf, tmp_path / "vision", keep_vision=True))
    p = Prompt(seed=2).text(40).image(8, 8).text(30).image(4, 6).text(20)
    ids = mx.array(p.array())
    emb, pos = model.prepare_inputs(ids, **p.media)
    T, cut = ids.shape[1], 70
    runs = []
    for bits in (None, 8):
        cache = model.make_cache()
        for a, b in ((0, cut), (cut, T)):
            logits = model(None, cache, input_embeddings=emb[:, a:b], position_ids=pos[..., a:b])
            maybe_quantize_kv_cache(cache, cut, 64, bits)
        out = [logits[0, -1]]
        for t in DECODE[:5]:
            out.append(model(mx.array([[int(t)]]), cache=cache)[0, -1])
        runs.append((cache, np.stack([log_softmax(np.array(x)) for x in out])))
    (plain, ref), (quant, ours) = runs
    i = next(i for i, c in enumerate(plain) if isinstance(c, KVCache))
    assert isinstance(quant[i], QuantizedKVCache)
    expected = int(np.array(pos).max()) + 1 - T  # images advance positions by less than T
    assert quant[i].rope_delta.tolist() == plain[i].rope_delta.tolist() == [expected]
    assert expected < 0
    assert model.next_positions(quant).tolist() == model.next_positions(plain).tolist()
    assert 0 < rel_err(ours, ref) < 2e-3


def test_quantized_rows_merge_filter_and_extract_like_each_row_alone(model):
    """Rows of different lengths, each prefilled alone into a quantized cache, stacked into one
    batch (left padding), decoded together, one row dropped, one copied out: every row gives
    what it gives alone, and the batch refuses a cache of another format."""
    prompts = [PROMPT[:90], PROMPT[100:137], PROMPT[200:261]]
    step_ids = [[11, 12, 13], [21, 22, 23], [31, 32, 33]]

    def prefilled(ids):
        cache = model.make_cache()
        model(mx.array(ids[None]), cache=cache)
        maybe_quantize_kv_cache(cache, 0, 64, 4)
        return cache

    solo = []
    for ids, steps in zip(prompts, step_ids, strict=True):
        cache = prefilled(ids)
        solo.append([np.array(model(mx.array([[t]]), cache=cache)[0, -1]) for t in steps])
    rows = [prefilled(ids) for ids in prompts]
    batch = [type(layers[0]).merge(list(layers)) for layers in zip(*rows, strict=True)]
    assert isinstance(batch[3], QuantizedKVCache) and batch[3].batch_size == 3
    assert batch[3].row_padding() == [0, 53, 29]
    for s in range(2):
        out = model(mx.array([[ids[s]] for ids in step_ids]), cache=batch)[:, -1]
        for r in range(3):
            assert rel_err(np.array(out[r]), solo[r][s]) < 1e-5
    for c in batch:
        c.filter([2, 1])  # drop the longest row: the padding both others share goes too
    assert batch[3].offset == 61 + 2 and batch[3].row_padding() == [0, 24]
    out = model(mx.array([[step_ids[2][2]], [step_ids[1][2]]]), cache=batch)[:, -1]
    assert rel_err(np.array(out[0]), solo[2][2]) < 1e-5
    assert rel_err(np.array(out[1]), solo[1][2]) < 1e-5
    row = [c.extract(1) for c in batch]
    assert isinstance(row[3], QuantizedKVCache) and row[3].offset == 37 + 3
    assert row[3].keys[0].shape[0] == 1 and row[3].kv_format == (4, 64)
    plain = model.make_cache()
    model(mx.array(prompts[0][None]), cache=plain)
    with pytest.raises(ValueError, match="different formats"):
        QuantizedKVCache.merge([batch[3], plain[3]])


def test_a_fill_only_step_fills_the_same_caches_and_skips_the_last_attention(model, monkeypatch):
    """A prefill step that only needs the caches: the same states as a full step, and the last
    layer (full attention here) never runs its attention."""
    ids = mx.array(PROMPT[None, :300])
    full, fill = model.make_cache(), model.make_cache()
    model.hidden_states(ids, full)
    calls = []
    real = attention_module.attention
    monkeypatch.setattr(
        "mlx_qwen35.model.layers.attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    assert model.hidden_states(ids, fill, fill_only=True) is None
    assert len(calls) == 1  # layer 3's attention ran, layer 7's (the last) did not
    mx.eval([c.state for c in full + fill])
    for a, b in zip(full, fill, strict=True):
        for x, y in zip(a.state[:2], b.state[:2], strict=True):
            assert np.array_equal(np.array(x), np.array(y))
    nxt = mx.array([[7]])
    assert np.array_equal(np.array(model(nxt, cache=full)), np.array(model(nxt, cache=fill)))


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_the_fit_estimate_matches_the_measured_caches(checkpoint, bits):
    """weights/fit.py's KV cache and recurrent states against the arrays a bf16 run holds after
    3000 prompt tokens in 2048-token steps and 20 decode steps (the KV in `bits`)."""
    from mlx_qwen35.weights import fit

    model = load_model(checkpoint, dtype="bfloat16")
    ids = np.random.RandomState(5).randint(0, 300, size=3000)
    cache = model.make_cache()
    for a in range(0, 3000, 2048):
        model.hidden_states(mx.array(ids[None, a : a + 2048]), cache, fill_only=True)
        maybe_quantize_kv_cache(cache, 1000, 64, bits)
    for t in DECODE:
        model(mx.array([[int(t)]]), cache=cache)
    mx.eval([c.state for c in cache])
    kv = sum(c.nbytes for c in cache if not isinstance(c, GatedDeltaCache))
    recurrent = sum(c.nbytes for c in cache if isinstance(c, GatedDeltaCache))
    est = fit.estimate(
        load_config(checkpoint), 0, 3020, activation_bytes=2, kv_bits=bits, capacity=(10**12, "x")
    )
    assert abs(est.kv_cache - kv) <= 0.05 * kv
    assert abs(est.recurrent - recurrent) <= 0.05 * recurrent
    summary = est.summary()
    assert est.kv_format == f"{bits or 16}-bit" and f"3020 tokens, {bits or 16}-bit" in summary
    assert summary.endswith(" left")
