"""Speculative decoding is lossless: greedy output equals plain greedy decoding token for token
(a difference is allowed only where the plain run's top-2 logit gap is below 1e-4), with partial
acceptance so that rollbacks happen every few tokens, for a draft model and for the MTP head, on
the portable and the (emulated) Metal paths; under sampling the output distribution is the
target's (chi-square); the caches never hold a token the consumer did not take."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mtp_fixture import with_mtp

from mlx_qwen35.engine.drafters import ModelDrafter, MTPDrafter
from mlx_qwen35.engine.generate import generate_step
from mlx_qwen35.engine.speculative import Sampling, SpeculativeDecoder
from mlx_qwen35.errors import UserError
from mlx_qwen35.model.cache import GatedDeltaCache, KVCache
from mlx_qwen35.weights.loading import load_config, load_model, model_from_weights, read_weights
from mlx_qwen35.weights.scripted import script_mtp, write_successors

GAP = 1e-4
PROMPT = mx.array(np.random.RandomState(3).randint(0, 300, 12), dtype=mx.uint32)


def noisy_copy(path: Path, sigma: float, seed: int = 1):
    """The checkpoint at `path` with every matrix perturbed: a draft that often agrees."""
    rng = np.random.RandomState(seed)
    raw = read_weights(path)
    for k, v in raw.items():
        if v.ndim == 2 and not k.startswith("mtp."):
            raw[k] = v + mx.array(sigma * rng.standard_normal(v.shape).astype(np.float32))
    return model_from_weights(raw, load_config(path))


def plain_greedy(model, prompt, n, **processors):
    sampler = make_sampler(0.0)
    steps = generate_step(model, prompt, max_tokens=n, sampler=sampler, **processors)
    tokens, gaps = [], []
    for token, logprobs in steps:
        top2 = np.sort(np.array(logprobs))[-2:]
        tokens.append(token)
        gaps.append(float(top2[1] - top2[0]))
    return tokens, gaps


def assert_lossless(plain: tuple[list[int], list[float]], spec: list[int]) -> None:
    tokens, gaps = plain
    assert len(spec) == len(tokens)
    for i, (a, b) in enumerate(zip(tokens, spec, strict=True)):
        if a != b:
            assert gaps[i] < GAP, f"token {i} differs ({a} vs {b}) with a top-2 gap {gaps[i]}"
            return


def run(model, drafter, k, n, sampling=None, prompt=PROMPT, **kwargs):
    dec = SpeculativeDecoder(
        model,
        prompt,
        drafter=drafter,
        num_draft_tokens=k,
        max_tokens=n,
        sampling=sampling or Sampling(temp=0.0),
        **kwargs,
    )
    out = list(dec)
    return [t for t, _, _ in out], [f for _, _, f in out], dec


@pytest.fixture(scope="module")
def target(hf_checkpoint):
    return hf_checkpoint("base")[1]


@pytest.fixture(scope="module")
def semi_scripted(hf_checkpoint, tmp_path_factory):
    """A real target (every layer counts) nudged towards a successor table, with an MTP head
    that drafts the table: the target follows it about two times in three, so MTP drafts are
    partly accepted and which ones depends on every layer's state."""
    _, path = hf_checkpoint("base")
    path = with_mtp(path, tmp_path_factory.mktemp("semi") / "semi")

    def build():
        model = load_model(path)
        for layer in model.layers:
            mixer = layer.linear_attn if layer.is_linear else layer.self_attn
            for proj in (getattr(mixer, "out_proj", None), getattr(mixer, "o_proj", None)):
                if proj is not None:
                    proj.weight = proj.weight * 2.5
            layer.mlp.down_proj.weight = layer.mlp.down_proj.weight * 2.5
        perm = np.random.RandomState(0).permutation(model.args.vocab_size)
        write_successors(model, dict(enumerate(perm.tolist())), margin=10)
        script_mtp(model)
        mx.eval(model.parameters())
        return model

    return build


def test_keep_steps_equals_running_fewer_tokens(target):
    model = load_model(target)
    ids = mx.array(np.random.RandomState(0).randint(0, 300, (2, 11)))
    cache = model.make_cache()
    model(ids[:, :6], cache=cache)
    gdn = [c for c in cache if isinstance(c, GatedDeltaCache)]
    for c in gdn:
        c.record_steps = True
    model(ids[:, 6:], cache=cache)
    keep = mx.array([2, 5])  # per row
    for c in gdn:
        c.record_steps = False
        c.keep_steps(keep)
    for row, n in enumerate([2, 5]):
        ref = model.make_cache()
        model(ids[row : row + 1, : 6 + n], cache=ref)
        ref_gdn = [c for c in ref if isinstance(c, GatedDeltaCache)]
        for ours, theirs in zip(gdn, ref_gdn, strict=True):
            for i in (0, 1):
                np.testing.assert_allclose(
                    np.array(ours[i][row]), np.array(theirs[i][0]), rtol=1e-5, atol=1e-6
                )
    with pytest.raises(RuntimeError, match="record_steps"):
        gdn[0].keep_steps(1)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_draft_model_greedy_is_lossless_with_partial_acceptance(target, k):
    model = load_model(target)
    plain = plain_greedy(model, PROMPT, 48)
    draft = noisy_copy(target, 0.002)
    drafter = ModelDrafter(draft)
    tokens, from_draft, dec = run(model, drafter, k, 48)
    assert_lossless(plain, tokens)
    assert 0.2 < dec.accepted / dec.drafted < 0.9  # rollbacks every few tokens
    assert sum(from_draft) == dec.accepted and not from_draft[0]
    # The draft's own cache followed the committed tokens (what it has not fed yet is pending).
    fed = PROMPT.tolist() + tokens[:-1]
    assert len(fed) - next(c.offset for c in drafter.cache if isinstance(c, KVCache)) == len(
        drafter.pending
    )
    cache_matches_fresh_prefill(draft, drafter.cache, fed)


def test_mtp_greedy_is_lossless_with_partial_acceptance(semi_scripted):
    model = semi_scripted()
    plain = plain_greedy(model, PROMPT, 60)
    for k in (2, 4):
        tokens, _, dec = run(model, MTPDrafter(model), k, 60)
        assert_lossless(plain, tokens)
        assert 0.2 < dec.accepted / dec.drafted < 0.9


def test_mtp_cache_holds_exactly_the_committed_pairs(semi_scripted):
    """After generation the MTP cache equals one computed afresh over the committed sequence
    with the target's hidden states: chained draft entries were trimmed and realigned."""
    model = semi_scripted()
    drafter = MTPDrafter(model)
    tokens, _, _ = run(model, drafter, 3, 30)
    seq = mx.concatenate([PROMPT, mx.array(tokens, dtype=mx.uint32)])
    n = drafter.cache[0].offset
    hidden = model.hidden_states(seq[None, :n])
    fresh = model.mtp.make_cache()
    model.mtp(model.embed(seq[None, 1 : n + 1]), hidden, fresh)
    ours, ref = drafter.cache[0].state, fresh[0].state
    assert ours[2] == ref[2] == n
    for a, b in zip(ours[:2], ref[:2], strict=True):
        np.testing.assert_allclose(np.array(a[..., :n, :]), np.array(b[..., :n, :]), atol=1e-4)


def test_scripted_mtp_accepts_everything(semi_scripted, tmp_path):
    from mlx_qwen35.weights.scripted import script_model

    model = semi_scripted()
    perm = np.random.RandomState(0).permutation(model.args.vocab_size)
    script_model(model, dict(enumerate(perm.tolist())))
    tokens, from_draft, dec = run(model, MTPDrafter(model), 3, 41)
    assert dec.accepted == dec.drafted and dec.rounds == 10
    assert from_draft == [False] + [True, True, True, False] * 10
    expect = [int(perm[int(PROMPT[-1])])]
    while len(expect) < 41:
        expect.append(int(perm[expect[-1]]))
    assert tokens == expect


def test_greedy_with_penalties_is_lossless(target):
    """Processors see the drafts before each verified position, as plain decoding sees them."""
    model = load_model(target)
    processors = dict(
        logits_processors=make_logits_processors(repetition_penalty=1.5),
        presence_processors=make_logits_processors(presence_penalty=2.0, presence_context_size=64),
    )
    plain = plain_greedy(model, PROMPT, 40, **processors)
    sampling = Sampling(temp=0.0, prompt=PROMPT, **processors)
    tokens, _, dec = run(model, ModelDrafter(noisy_copy(target, 0.002)), 3, 40, sampling)
    assert_lossless(plain, tokens)
    assert dec.accepted > 0


def test_lossless_with_emulated_metal_kernels(target, semi_scripted, monkeypatch):
    from metal_emu import emulate_metal, skip_unless_kernels_can_run

    skip_unless_kernels_can_run()
    model = load_model(target)
    draft = noisy_copy(target, 0.002)
    mtp_model = semi_scripted()
    plain = plain_greedy(model, PROMPT, 24)
    plain_mtp = plain_greedy(mtp_model, PROMPT, 24)
    emu = emulate_metal(monkeypatch)
    monkeypatch.setenv("MLX_QWEN35_GDN_BACKEND", "metal")
    tokens, _, dec = run(model, ModelDrafter(draft), 3, 24)
    assert_lossless(plain, tokens)
    assert 0 < dec.accepted < dec.drafted
    tokens, _, dec = run(mtp_model, MTPDrafter(mtp_model), 3, 24)
    assert_lossless(plain_mtp, tokens)
    assert 0 < dec.accepted < dec.drafted
    per_token = [c for c in emu.calls if dict(c.template).get("PerTok")]
    assert per_token, "verification must take its per-token states from the kernel"


def cache_matches_fresh_prefill(model, cache, tokens: list[int]) -> None:
    kv = next(c for c in cache if isinstance(c, KVCache))
    n = kv.offset
    assert n <= len(tokens)
    ref = model.make_cache()
    model(mx.array(tokens[:n])[None], cache=ref)
    for ours, theirs in zip(cache, ref, strict=True):
        if isinstance(ours, KVCache):
            assert ours.offset == theirs.offset
            np.testing.assert_allclose(
                np.array(ours.keys[..., :n, :]), np.array(theirs.keys[..., :n, :]), atol=1e-4
            )
        else:
            for i in (0, 1):
                np.testing.assert_allclose(np.array(ours[i]), np.array(theirs[i]), atol=1e-4)


def test_a_consumer_that_stops_mid_round_leaves_only_what_it_took(target):
    model = load_model(target)
    cache = model.make_cache()
    dec = SpeculativeDecoder(
        model,
        PROMPT,
        drafter=ModelDrafter(noisy_copy(target, 0.0005)),
        num_draft_tokens=4,
        max_tokens=40,
        sampling=Sampling(temp=0.0),
        cache=cache,
    )
    taken = []
    it = iter(dec)
    for token, _, _ in it:
        taken.append(token)
        if len(taken) == 7:
            break
    it.close()
    assert dec.accepted > 3  # the stop fell inside a round with accepted drafts
    cache_matches_fresh_prefill(model, cache, PROMPT.tolist() + taken)


def test_a_round_is_cut_at_the_first_stop_token(semi_scripted):
    model = semi_scripted()
    perm = np.random.RandomState(0).permutation(model.args.vocab_size)
    from mlx_qwen35.weights.scripted import script_model

    script_model(model, dict(enumerate(perm.tolist())))
    chain = [int(perm[int(PROMPT[-1])])]
    while len(chain) < 12:
        chain.append(int(perm[chain[-1]]))
    cache = model.make_cache()
    tokens, _, _ = run(model, MTPDrafter(model), 4, 30, cache=cache, stop_tokens=[chain[7]])
    assert tokens == chain[:8]
    cache_matches_fresh_prefill(model, cache, PROMPT.tolist() + tokens)


def test_bad_num_draft_tokens_is_one_clear_error(target):
    model = load_model(target)
    for k in (0, 8, 2.5, True):
        with pytest.raises(UserError, match="num_draft_tokens must be an integer from 1 to 7"):
            SpeculativeDecoder(
                model,
                PROMPT,
                drafter=ModelDrafter(model),
                num_draft_tokens=k,
                max_tokens=4,
                sampling=Sampling(temp=0.0),
            )


def chi2_pvalue(stat: float, df: int) -> float:
    """Upper tail of the chi-square distribution (Wilson-Hilferty; ample at these df)."""
    import math

    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.fixture(scope="module")
def small_target(tmp_path_factory):
    """Two layers (one of each kind): cheap enough for a few thousand generations."""
    import hf_reference

    hf = hf_reference.build_hf_model(
        "base", num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]
    )
    return hf_reference.save_hf_checkpoint(hf, tmp_path_factory.mktemp("small") / "small")


def exact_joint(model, prompt: list[int], depth: int, shape) -> dict[tuple[int, ...], float]:
    """P(t_1 .. t_depth) under plain sampling, enumerated over every sequence of the support."""
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], prob: float) -> None:
        if len(prefix) == depth:
            out[prefix] = prob
            return
        logits = model(mx.array([prompt + list(prefix)]))[:, -1, :]
        p = np.array(mx.exp(shape(logits - mx.logsumexp(logits, axis=-1, keepdims=True))))[0]
        for t in np.flatnonzero(p > 0):
            walk(prefix + (int(t),), prob * float(p[t]))

    walk((), 1.0)
    return out


@pytest.mark.parametrize("subset", [False, True])
def test_speculative_sampling_has_the_target_distribution(small_target, subset):
    """Joint distribution of the first three tokens (the second and third come from drafts,
    residuals or the bonus) against the exact plain-sampling distribution. The heads are
    sharpened so that a few tokens carry the mass and the draft agrees about half the time; an
    acceptance rule off by a factor of 2 moves the distribution by ~0.35 in total variation."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    model = load_model(small_target)
    draft = noisy_copy(small_target, 0.003)
    for m in (model, draft):
        m.language_model.lm_head.weight = m.language_model.lm_head.weight * 30
    temp, top_p, min_p, top_k = 0.8, 0.9, 0.02, 4

    def shape(lp):  # the plain sampler's distribution, by mlx-lm's own filters in its order
        lp = apply_top_k(apply_min_p(apply_top_p(lp, top_p), min_p), top_k) / temp
        return lp - mx.logsumexp(lp, axis=-1, keepdims=True)

    prompt = [3, 17, 99]
    joint = exact_joint(model, prompt, 3, shape)
    head_ids = None
    if subset:  # the draft cannot propose the likeliest first tokens: only residuals give them
        mass: dict[int, float] = {}
        for key, p in joint.items():
            mass[key[1]] = mass.get(key[1], 0.0) + p
        head_ids = np.setdiff1d(np.arange(320), sorted(mass, key=mass.get)[-2:])
    sampling = dict(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    counts: dict[tuple[int, ...], int] = {}
    n, drafted, accepted = 1000, 0, 0
    for seed in range(n):
        mx.random.seed(seed)
        tokens, _, dec = run(
            model,
            ModelDrafter(draft, head_ids),
            2,
            4,
            Sampling(**sampling),
            prompt=mx.array(prompt, dtype=mx.uint32),
        )
        key = tuple(tokens[:3])
        assert key in joint, f"{key} is outside the target's support"
        counts[key] = counts.get(key, 0) + 1
        drafted, accepted = drafted + dec.drafted, accepted + dec.accepted
    assert 0.1 < accepted / drafted < 0.9  # both acceptance and residual draws happen
    expected = {k: p * n for k, p in joint.items()}
    small = [k for k, e in expected.items() if e < 5]
    cells = [(counts.get(k, 0), e) for k, e in expected.items() if e >= 5]
    cells.append((sum(counts.get(k, 0) for k in small), sum(expected[k] for k in small)))
    stat = sum((o - e) ** 2 / e for o, e in cells if e > 0)
    assert chi2_pvalue(stat, len(cells) - 1) > 1e-3, (stat, len(cells))
