"""Speculative decoding is lossless: greedy output equals plain greedy decoding token for token
(a difference is allowed only where the plain run's top-2 logit gap is below 1e-4), with partial
acceptance so that rollbacks happen every few tokens, for a draft model and for the MTP head, on
the portable and the (emulated) Metal paths; under sampling the output distribution is the
target's (chi-square); every cache ends holding exactly the committed tokens."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mtp_fixture import with_mtp

from mlx_qwen35.engine.drafters import ModelDrafter
from mlx_qwen35.engine.request import Request, SamplingParams
from mlx_qwen35.engine.sampling import RowSampler, sample_batch
from mlx_qwen35.engine.scheduler import Engine
from mlx_qwen35.engine.speculative import Speculation, speculative_round
from mlx_qwen35.errors import UserError
from mlx_qwen35.model.cache import GatedDeltaCache, KVCache
from mlx_qwen35.weights.loading import load_config, load_model, model_from_weights, read_weights
from mlx_qwen35.weights.scripted import script_model, script_mtp, write_successors

GAP = 1e-4
PROMPT = np.random.RandomState(3).randint(0, 300, 12).tolist()


def noisy_copy(path: Path, sigma: float, seed: int = 1):
    """The checkpoint at `path` with every matrix perturbed: a draft that often agrees."""
    rng = np.random.RandomState(seed)
    raw = read_weights(path)
    for k, v in raw.items():
        if v.ndim == 2 and not k.startswith("mtp."):
            raw[k] = v + mx.array(sigma * rng.standard_normal(v.shape).astype(np.float32))
    return model_from_weights(raw, load_config(path))


def generate(model, n, prompt=PROMPT, draft=None, k=3, **kwargs):
    """(tokens, from_draft flags, stats, events) of one request on a fresh engine."""
    sampling = kwargs.pop("sampling", SamplingParams())
    engine = Engine(model, prefix_cache_bytes=kwargs.pop("prefix_cache_bytes", 0))
    request = Request(
        prompt=list(prompt),
        max_tokens=n,
        sampling=sampling,
        stop_token_ids=kwargs.pop("stop_token_ids", ()),
        draft_model=draft,
        num_draft_tokens=k,
        **kwargs,
    )
    handle = engine.submit(request)
    events = list(handle)
    return [e.token for e in events], [e.from_draft for e in events], handle.stats, events


def plain_greedy(model, n, prompt=PROMPT, **kwargs):
    tokens, _, _, events = generate(model, n, prompt, **kwargs)
    gaps = []
    for e in events:
        top2 = np.sort(np.array(e.logprobs))[-2:]
        gaps.append(float(top2[1] - top2[0]))
    return tokens, gaps


def assert_lossless(plain: tuple[list[int], list[float]], spec: list[int]) -> None:
    tokens, gaps = plain
    assert len(spec) == len(tokens)
    for i, (a, b) in enumerate(zip(tokens, spec, strict=True)):
        if a != b:
            assert gaps[i] < GAP, f"token {i} differs ({a} vs {b}) with a top-2 gap {gaps[i]}"
            return


def drive(model, spec, n, prompt=PROMPT, sampling=None):
    """The engine's speculative path for one row, driven by hand (prefill, first token, rounds)
    so that a test can look at every cache afterwards. Returns (tokens, target cache, drafted,
    accepted, the row's sampler)."""
    request = Request(prompt=prompt, max_tokens=n, sampling=sampling or SamplingParams())
    sampler = RowSampler(request, model.args.vocab_size)
    cache = model.make_cache()
    spec.start(prompt, 0)
    for s in range(0, len(prompt), 5):
        ids = prompt[s : s + 5]
        positions = spec.positions(cache, len(ids), {})
        hidden = model.hidden_states(mx.array([ids], mx.uint32), cache)
        spec.prefill(ids, {}, hidden, positions)
    token = sample_batch(model.language_model.logits(hidden[:, -1]), [sampler], None)[0]
    tokens = [int(token.item())]
    drafted = accepted = 0
    while len(tokens) < n:
        k = spec.budget(len(tokens) - 1, n)
        if k < 1:
            break
        rnd = speculative_round(model, cache, spec, sampler, token, k, frozenset())
        tokens += rnd.tokens + [int(rnd.next_token.item())]
        token = rnd.next_token
        drafted, accepted = drafted + k, accepted + rnd.accepted
    return tokens, cache, drafted, accepted, sampler


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
    plain = plain_greedy(model, 48)
    tokens, from_draft, stats, _ = generate(model, 48, draft=noisy_copy(target, 0.002), k=k)
    assert_lossless(plain, tokens)
    assert 0.2 < stats.accepted_tokens / stats.draft_tokens < 0.9  # rollbacks every few tokens
    assert sum(from_draft) == stats.accepted_tokens and not from_draft[0]


def test_mtp_greedy_is_lossless_with_partial_acceptance(semi_scripted):
    model = semi_scripted()
    plain = plain_greedy(model, 60)
    for k in (2, 4):
        tokens, _, stats, _ = generate(model, 60, draft="mtp", k=k)
        assert_lossless(plain, tokens)
        assert 0.2 < stats.accepted_tokens / stats.draft_tokens < 0.9


def cache_matches_fresh_prefill(model, cache, tokens: list[int]) -> None:
    """`cache` (one row) equals a fresh prefill of the tokens it holds (a prefix of `tokens`)."""
    kv = next(c for c in cache if isinstance(c, KVCache))
    n = kv.offset
    assert n <= len(tokens)
    ref = model.make_cache()
    model(mx.array(tokens[:n])[None], cache=ref)
    for ours, theirs in zip(cache, ref, strict=True):
        if isinstance(ours, KVCache):
            assert ours.offset == theirs.offset
            for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
                np.testing.assert_allclose(
                    np.array(a[..., :n, :]), np.array(b[..., :n, :]), atol=1e-4
                )
        else:
            for i in (0, 1):
                np.testing.assert_allclose(np.array(ours[i]), np.array(theirs[i]), atol=1e-4)


def test_every_cache_holds_exactly_the_committed_tokens(target, semi_scripted):
    """After a run with partial acceptance: the target cache, the draft model's cache and the
    MTP cache equal fresh computations over the committed sequence (chained MTP entries trimmed,
    realigned with the target's hidden states; rejected draft-model states restored)."""
    model = load_model(target)
    draft = noisy_copy(target, 0.002)
    spec = Speculation(model, Request(prompt=PROMPT, max_tokens=1, draft_model=draft), None)
    sampling = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.1)
    tokens, cache, _, accepted, sampler = drive(model, spec, 30, sampling=sampling)
    assert 0 < accepted
    seq = PROMPT + tokens
    cache_matches_fresh_prefill(model, cache, seq)
    # The sampler's penalty state: every committed token fed, no rejected draft.
    fresh = RowSampler(Request(prompt=PROMPT, max_tokens=30, sampling=sampling), 320)
    for t in tokens[:-1]:
        fresh.feed(mx.array([t], mx.uint32))
    for ours, ref in zip(sampler.state()[1:], fresh.state()[1:], strict=True):
        np.testing.assert_array_equal(np.array(ours), np.array(ref))
    drafter = spec.drafter
    fed = next(c.offset for c in drafter.cache if isinstance(c, KVCache))
    assert fed + len(drafter.pending) == len(seq) - 1  # the pending next token is not fed
    cache_matches_fresh_prefill(draft, drafter.cache, seq)

    model = semi_scripted()
    spec = Speculation(model, Request(prompt=PROMPT, max_tokens=1, draft_model="mtp"), None)
    tokens, *_ = drive(model, spec, 30)
    seq = mx.array(PROMPT + tokens, mx.uint32)
    mtp_cache = spec.drafter.cache[0]
    n = mtp_cache.offset
    hidden = model.hidden_states(seq[None, :n])
    fresh = model.mtp.make_cache()
    model.mtp(model.embed(seq[None, 1 : n + 1]), hidden, fresh)
    for a, b in ((mtp_cache.keys, fresh[0].keys), (mtp_cache.values, fresh[0].values)):
        np.testing.assert_allclose(np.array(a[..., :n, :]), np.array(b[..., :n, :]), atol=1e-4)


def test_scripted_mtp_accepts_everything(semi_scripted):
    model = semi_scripted()
    perm = np.random.RandomState(0).permutation(model.args.vocab_size)
    script_model(model, dict(enumerate(perm.tolist())))
    tokens, from_draft, stats, _ = generate(model, 42, draft="mtp", k=3)
    assert stats.accepted_tokens == stats.draft_tokens == 30
    # pending token, 3 drafts, then the round's next token is pending for the next round
    assert from_draft == [False] + [True, True, True, False] * 10 + [False]
    expect = [int(perm[PROMPT[-1]])]
    while len(expect) < 42:
        expect.append(int(perm[expect[-1]]))
    assert tokens == expect


def test_greedy_with_penalties_is_lossless(target):
    """Processors and penalties see the drafts before each verified position, as plain decoding
    sees the tokens it fed."""
    model = load_model(target)
    sampling = SamplingParams(repetition_penalty=1.5, presence_penalty=2.0, frequency_penalty=0.5)
    plain = plain_greedy(model, 40, sampling=sampling)
    draft = noisy_copy(target, 0.002)
    tokens, _, stats, _ = generate(model, 40, draft=draft, sampling=sampling)
    assert_lossless(plain, tokens)
    assert stats.accepted_tokens > 0


def test_lossless_with_emulated_metal_kernels(target, semi_scripted, monkeypatch):
    from metal_emu import emulate_metal, skip_unless_kernels_can_run

    skip_unless_kernels_can_run()
    model = load_model(target)
    draft = noisy_copy(target, 0.002)
    mtp_model = semi_scripted()
    plain = plain_greedy(model, 24)
    plain_mtp = plain_greedy(mtp_model, 24)
    emu = emulate_metal(monkeypatch)
    monkeypatch.setenv("MLX_QWEN35_GDN_BACKEND", "metal")
    tokens, _, stats, _ = generate(model, 24, draft=draft)
    assert_lossless(plain, tokens)
    assert 0 < stats.accepted_tokens < stats.draft_tokens
    tokens, _, stats, _ = generate(mtp_model, 24, draft="mtp")
    assert_lossless(plain_mtp, tokens)
    assert 0 < stats.accepted_tokens < stats.draft_tokens
    per_token = [c for c in emu.calls if dict(c.template).get("PerTok")]
    assert per_token, "verification must take its per-token states from the kernel"


def test_a_round_is_cut_at_the_first_stop_token(semi_scripted):
    """A stop token among the accepted drafts ends the reply there, and the state kept after the
    reply (cache_final) holds exactly the tokens fed, as a fresh prefill would."""
    model = semi_scripted()
    perm = np.random.RandomState(0).permutation(model.args.vocab_size)
    script_model(model, dict(enumerate(perm.tolist())))
    chain = [int(perm[PROMPT[-1]])]
    while len(chain) < 12:
        chain.append(int(perm[chain[-1]]))
    engine = Engine(model)
    handle = engine.submit(
        Request(
            prompt=PROMPT,
            max_tokens=30,
            stop_token_ids=[chain[6]],
            draft_model="mtp",
            num_draft_tokens=4,
            cache_final=True,
        )
    )
    events = list(handle)
    assert [e.token for e in events] == chain[:7]
    assert events[-1].from_draft and events[-1].finish_reason == "stop"
    seq = PROMPT + chain[:7]
    entry = engine.prefix_cache.lookup(seq + [0], ())
    assert entry is not None and entry.length == len(seq)
    cache_matches_fresh_prefill(model, entry.make_cache(), seq)


@pytest.mark.parametrize("kind", ["model", "mtp"])
def test_a_speculating_row_steps_aside_in_a_batch_and_resumes(
    target, semi_scripted, kind, monkeypatch
):
    """Two requests at once: they decode together plainly while the drafter keeps up (catching
    up every few steps), and when the short one ends the long one speculates again; both
    replies equal plain decoding."""
    from mlx_qwen35.engine import drafters

    monkeypatch.setattr(drafters, "CATCH_UP_EVERY", 3)
    if kind == "model":
        model, draft = load_model(target), noisy_copy(target, 0.002)
    else:
        model, draft = semi_scripted(), "mtp"
    other = np.random.RandomState(9).randint(0, 300, 7).tolist()
    plain_long = plain_greedy(model, 40)
    plain_short = plain_greedy(model, 12, prompt=other)
    engine = Engine(model, prefix_cache_bytes=0)
    long = engine.submit(Request(prompt=PROMPT, max_tokens=40, draft_model=draft))
    short = engine.submit(Request(prompt=other, max_tokens=12))
    events_short = list(short)
    events_long = list(long)
    assert_lossless(plain_short, [e.token for e in events_short])
    assert_lossless(plain_long, [e.token for e in events_long])
    flags = "".join("d" if e.from_draft else "." for e in events_long)
    assert "." * 10 in flags  # one token per step while batched with the other request
    assert "d" in flags[flags.index("." * 10) + 10 :]  # speculating again once alone


def test_bad_speculation_settings_are_one_clear_error(target):
    model = load_model(target)
    engine = Engine(model)

    def submit(**kwargs):
        engine.submit(Request(prompt=PROMPT, max_tokens=4, **kwargs))

    for k in (0, 8, 2.5, True):
        with pytest.raises(UserError, match="num_draft_tokens must be an integer from 1 to 7"):
            submit(draft_model=model, num_draft_tokens=k)
    with pytest.raises(UserError, match="no MTP head"):
        submit(draft_model="mtp")
    with pytest.raises(UserError, match="draft_model 'medusa'"):
        submit(draft_model="medusa")
    with pytest.raises(UserError, match="draft_vocab must be a positive number"):
        submit(draft_model=model, draft_vocab=0)


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
    counts: dict[tuple[int, ...], int] = {}
    n, drafted, accepted = 1000, 0, 0
    engine = Engine(model, prefix_cache_bytes=0)
    for seed in range(n):
        sampling = SamplingParams(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k, seed=seed)
        if subset:  # by hand: a draft vocabulary of chosen ids
            spec = Speculation(model, Request(prompt=prompt, max_tokens=4, draft_model=draft), None)
            spec.drafter = ModelDrafter(draft, head_ids)
            spec.k = 2
            tokens, _, d, a, _ = drive(model, spec, 4, prompt, sampling)
        else:
            handle = engine.submit(
                Request(
                    prompt=prompt,
                    max_tokens=4,
                    sampling=sampling,
                    draft_model=draft,
                    num_draft_tokens=2,
                    stop_token_ids=(),
                )
            )
            tokens = [e.token for e in handle]
            d, a = handle.stats.draft_tokens, handle.stats.accepted_tokens
        key = tuple(tokens[:3])
        assert key in joint, f"{key} is outside the target's support"
        counts[key] = counts.get(key, 0) + 1
        drafted, accepted = drafted + d, accepted + a
    assert 0.1 < accepted / drafted < 0.9  # both acceptance and residual draws happen
    expected = {k: p * n for k, p in joint.items()}
    small = [k for k, e in expected.items() if e < 5]
    cells = [(counts.get(k, 0), e) for k, e in expected.items() if e >= 5]
    cells.append((sum(counts.get(k, 0) for k in small), sum(expected[k] for k in small)))
    stat = sum((o - e) ** 2 / e for o, e in cells if e > 0)
    assert chi2_pvalue(stat, len(cells) - 1) > 1e-3, (stat, len(cells))


def test_a_stateful_processor_makes_speculation_step_aside(target):
    """A processor that must see each token once, in order (a grammar matcher), never sees a
    draft: the request decodes plainly."""
    model = load_model(target)

    class Counting:
        stateful = True

        def __init__(self):
            self.calls = 0

        def __call__(self, tokens, logits):
            self.calls += 1
            return logits

    counting = Counting()
    tokens, flags, stats, _ = generate(
        model, 12, draft=noisy_copy(target, 0.002), logits_processors=[counting]
    )
    assert stats.draft_tokens == 0 and not any(flags)
    assert counting.calls == 12  # once per token
    assert tokens == plain_greedy(model, 12)[0]
