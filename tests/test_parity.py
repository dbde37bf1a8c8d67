"""fp32 logits of our model vs transformers' Qwen3_5ForConditionalGeneration (the definition of
correct): within 1e-4 relative to the largest reference logit, on configs that stress the edges."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import hf_logits

from mlx_qwen35.weights.loading import load_model

TOL = 1e-4
VARIANTS = ["base", "tied", "hv_eq_hk", "hv3"]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def random_ids(batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 300, size=(batch, length))


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    cache = {}

    def get(variant):
        if variant not in cache:
            hf, path = hf_checkpoint(variant)
            cache[variant] = (hf, load_model(path))
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("length", [1, 5, 67, 300])
def test_full_forward_matches_reference(models, variant, length):
    hf, model = models(variant)
    ids = random_ids(2, length, seed=length)
    ours = np.array(model(mx.array(ids)))
    assert rel_err(ours, hf_logits(hf, ids)) < TOL


@pytest.mark.parametrize("variant", ["base", "hv3"])
def test_prefill_then_decode_matches_full_forward(models, variant):
    hf, model = models(variant)
    ids = random_ids(2, 67, seed=3)
    ref = hf_logits(hf, ids)
    cache = model.make_cache()
    pieces = [np.array(model(mx.array(ids[:, :40]), cache=cache))]
    for t in range(40, 67):
        pieces.append(np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)))
    assert rel_err(np.concatenate(pieces, axis=1), ref) < TOL


def test_prefill_in_uneven_steps_matches(models):
    hf, model = models("base")
    ids = random_ids(1, 50, seed=4)
    ref = hf_logits(hf, ids)
    cache = model.make_cache()
    pieces = [
        np.array(model(mx.array(ids[:, a:b]), cache=cache))
        for a, b in [(0, 17), (17, 18), (18, 50)]
    ]
    assert rel_err(np.concatenate(pieces, axis=1), ref) < TOL


def test_left_padded_batch_matches_reference_and_decodes(models):
    hf, model = models("base")
    ids = random_ids(2, 12, seed=5)
    mask = np.ones((2, 12), dtype=np.int64)
    mask[1, :4] = 0
    real = mask.astype(bool)
    ref = hf_logits(hf, ids, attention_mask=mask)
    full = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    assert rel_err(full[real], ref[real]) < TOL
    # the padded row equals the same row run alone, unpadded
    alone = hf_logits(hf, ids[1:, 4:])
    assert rel_err(full[1, 4:], alone[0]) < TOL
    cache = model.make_cache()
    pieces = [
        np.array(model(mx.array(ids[:, :8]), cache=cache, attention_mask=mx.array(mask[:, :8])))
    ]
    for t in range(8, 12):
        pieces.append(np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)))
    inc = np.concatenate(pieces, axis=1)
    assert rel_err(inc[real], ref[real]) < TOL


def test_three_d_positions_change_only_rotary(models):
    """Equal t/h/w position ids reproduce text positions; different h/w change the output."""
    _, model = models("base")
    ids = mx.array(random_ids(1, 9, seed=6))
    text = np.array(model(ids))
    pos = mx.broadcast_to(mx.arange(9)[None, None], (3, 1, 9))
    same = np.array(model(ids, position_ids=pos))
    np.testing.assert_allclose(same, text, rtol=0, atol=1e-5)
    # a uniform shift would keep every relative position; freeze h and w instead
    moved = mx.concatenate([pos[:1], mx.zeros_like(pos[1:])], axis=0)
    assert np.abs(np.array(model(ids, position_ids=moved)) - text).max() > 1e-3
