"""The engine's request API: scripted batching equality, seeded sampling that batching does not
change, several submitting threads, cut sets of top_k/top_p/min_p, penalties, failing logits
processors, bad requests, and batch_generate."""

from __future__ import annotations

import copy
import threading

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35.engine.generate import batch_generate, generate
from mlx_qwen35.engine.request import Request, SamplingParams
from mlx_qwen35.engine.scheduler import Engine, engine_for
from mlx_qwen35.errors import UserError
from mlx_qwen35.weights.loading import load, load_model
from mlx_qwen35.weights.scripted import script_model

VOCAB = 320


def successor(t: int) -> int:
    return (7 * t + 3) % 300


@pytest.fixture(scope="module")
def scripted(hf_checkpoint):
    """The perturbed base checkpoint, scripted: greedy output after t is successor(t)."""
    _, path = hf_checkpoint("base")
    model = load_model(path)
    script_model(model, {t: successor(t) for t in range(300)})
    return model


@pytest.fixture(scope="module")
def base(hf_checkpoint):
    _, path = hf_checkpoint("base")
    return load_model(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mlx_qwen35.weights.tiny_random import ensure_tiny_random

    return load(str(ensure_tiny_random(tmp_path_factory.mktemp("cache"))))


def script(prompt: list[int], n: int) -> list[int]:
    out, t = [], prompt[-1]
    for _ in range(n):
        t = successor(t)
        out.append(t)
    return out


def test_scripted_rows_follow_their_script_under_any_batching(scripted):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 300, n).tolist() for n in (3, 17, 9, 30, 1, 12)]
    limits = [5, 20, 8, 13, 25, 2]
    engine = Engine(scripted, max_batch_size=4, prefill_step_size=8)
    handles = []
    for p, n in zip(prompts, limits, strict=True):
        handles.append(engine.submit(Request(prompt=p, max_tokens=n)))
        engine.step()
    for p, n, h in zip(prompts, limits, handles, strict=True):
        assert [e.token for e in h] == script(p, n)
    assert engine.num_running == 0


def test_stop_ids_end_a_row_with_the_stop_token(scripted):
    prompt = [5, 9]
    tokens = script(prompt, 6)
    engine = Engine(scripted)
    h = engine.submit(Request(prompt=prompt, max_tokens=10, stop_token_ids={tokens[3]}))
    events = list(h)
    assert [e.token for e in events] == tokens[:4]
    assert events[-1].finish_reason == "stop" and h.stats.finish_reason == "stop"
    assert [e.finish_reason for e in events[:-1]] == [None] * 3


def fixed_logits(seed: int):
    """A processor that replaces the logits by a fixed table row chosen by the last token, so
    the tokens drawn depend on the random stream alone, not on batching's rounding."""
    table = mx.array(np.random.default_rng(seed).normal(0, 2, (VOCAB, VOCAB)).astype(np.float32))

    def processor(tokens, logits):
        return table[tokens[-1]][None]

    return processor


@pytest.mark.parametrize(
    "sampling",
    [
        dict(temp=1.0, top_k=20, top_p=0.9, seed=5),
        dict(temp=0.8, top_p=0.7, min_p=0.05, seed=11),
        dict(temp=1.3, seed=2**64 - 1),
    ],
)
def test_a_seeded_request_samples_the_same_alone_and_in_a_batch(base, sampling):
    def req(**kw):
        return Request(prompt=[3, 4, 5], max_tokens=24, logits_processors=[fixed_logits(1)], **kw)

    target = req(sampling=SamplingParams(**sampling))
    alone = [e.token for e in Engine(base).submit(copy.copy(target))]
    engine = Engine(base, prefill_step_size=4)
    others = [
        engine.submit(
            Request(
                prompt=list(range(1, 20)), max_tokens=30, sampling=SamplingParams(temp=1.0, top_k=5)
            )
        ),
        engine.submit(req(sampling=SamplingParams(temp=0.5, top_p=0.5, seed=3))),
    ]
    engine.step()
    h = engine.submit(copy.copy(target))
    engine.step()
    others.append(engine.submit(Request(prompt=[9] * 11, max_tokens=4)))
    assert [e.token for e in h] == alone
    assert len(set(alone)) > 3  # it really sampled
    for o in others:
        list(o)
    again = [
        e.token
        for e in Engine(base).submit(req(sampling=SamplingParams(**{**sampling, "seed": 7})))
    ]
    assert again != alone


@pytest.mark.parametrize(
    "sampling, allowed",
    [
        (dict(temp=1.5, top_k=3), lambda lp: np.argsort(-lp)[:3]),
        (dict(temp=1.5, min_p=0.3), lambda lp: np.flatnonzero(lp >= lp.max() + np.log(0.3))),
        (dict(temp=1.5, top_p=0.3), lambda lp: nucleus(lp, 0.3)),
        (dict(temp=1.5, top_k=50, top_p=0.3), lambda lp: nucleus(lp, 0.3)),
    ],
)
def test_every_sampled_token_is_in_the_cut_set(base, sampling, allowed):
    engine = Engine(base)
    h = engine.submit(
        Request(prompt=[1, 2, 3], max_tokens=40, sampling=SamplingParams(seed=0, **sampling))
    )
    seen = set()
    for e in h:
        lp = np.array(e.logprobs)
        assert e.token in set(allowed(lp).tolist())
        seen.add(e.token)
    assert len(seen) > 1


def nucleus(lp: np.ndarray, top_p: float) -> np.ndarray:
    order = np.argsort(-lp)
    probs = np.exp(lp[order])
    above = np.cumsum(probs) - probs
    return order[above < top_p]


def test_penalties_and_top_logprobs(base):
    engine = Engine(base)
    plain = [e.token for e in engine.submit(Request(prompt=[7, 8], max_tokens=30))]
    assert len(set(plain)) < len(plain)  # greedy repeats itself
    presence = SamplingParams(presence_penalty=1000.0)
    penalised = [e.token for e in engine.submit(Request([7, 8], 30, presence))]
    assert len(set(penalised)) == len(penalised) and penalised[0] == plain[0]
    frequency = SamplingParams(frequency_penalty=1000.0)
    assert [e.token for e in engine.submit(Request([7, 8], 30, frequency))] == penalised
    repetition = SamplingParams(repetition_penalty=1e6, repetition_context_size=4)
    rep = [e.token for e in engine.submit(Request([7, 8], 30, repetition))]
    window = [7, 8, *rep]
    assert all(t not in window[max(0, i - 4) : i] for i, t in enumerate(rep, start=2))
    top = list(engine.submit(Request([7, 8], 3, SamplingParams(top_logprobs=4))))
    for e in top:
        ids = [t for t, _ in e.top_logprobs]
        lp = np.array(e.logprobs)
        assert ids == np.argsort(-lp)[:4].tolist() and ids[0] == e.token
        assert np.allclose([v for _, v in e.top_logprobs], lp[ids], atol=1e-5)


def test_a_failing_logits_processor_fails_only_its_request(scripted):
    def broken(tokens, logits):
        if tokens.size > 6:
            raise ValueError("grammar broke")
        return logits

    engine = Engine(scripted)
    bad = engine.submit(Request(prompt=[1, 2, 3], max_tokens=10, logits_processors=[broken]))
    good = engine.submit(Request(prompt=[4, 5], max_tokens=10))
    got = []
    with pytest.raises(ValueError, match="grammar broke"):
        for e in bad:
            got.append(e.token)
    assert got == script([1, 2, 3], len(got)) and bad.stats.finish_reason == "error"
    assert [e.token for e in good] == script([4, 5], 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=[]), "non-empty list"),
        (dict(prompt=[VOCAB]), "token ids must be integers"),
        (dict(max_tokens=0), "max_tokens must be a positive integer"),
        (dict(sampling=SamplingParams(top_p=0)), "top_p"),
        (dict(sampling=SamplingParams(seed=-1)), "seed must be an integer"),
        (dict(sampling=SamplingParams(top_logprobs=-2)), "top_logprobs"),
        (dict(boundaries=[99]), "boundaries"),
        (dict(input_embeddings=mx.zeros((2, 5))), "input_embeddings must be"),
        (dict(position_ids=mx.zeros((3, 2))), "position_ids must be"),
        (dict(prefill_step_size=0), "prefill_step_size"),
    ],
)
def test_bad_requests_are_refused_at_submit(base, kwargs, match):
    with pytest.raises(UserError, match=match):
        Engine(base).submit(Request(**{"prompt": [1, 2, 3], "max_tokens": 4, **kwargs}))


def test_threads_submitting_at_once_batch_together(scripted):
    engine = Engine(scripted)
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(4)
    sizes = []

    def worker(i: int) -> None:
        barrier.wait()
        for k in range(2):
            prompt = [i + 1, 10 * k + i]
            # Seeds and penalties make state on the sampler's side (the margin keeps the script).
            sampling = SamplingParams(temp=0.5, top_k=3, seed=i, presence_penalty=0.5 * k)
            h = engine.submit(Request(prompt=prompt, max_tokens=12 + i, sampling=sampling))
            results[2 * i + k] = (prompt, [e.token for e in h])
            sizes.append(engine.num_running)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    for prompt, tokens in results.values():
        assert tokens == script(prompt, len(tokens)) and len(tokens) >= 12


def test_background_loop_serves_several_threads(scripted):
    engine = Engine(scripted)
    engine.start()
    try:
        out = {}

        def worker(i: int) -> None:
            out[i] = [e.token for e in engine.submit(Request(prompt=[i + 40], max_tokens=9))]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(out[i] == script([i + 40], 9) for i in range(3))
    finally:
        engine.stop()
    assert engine._thread is None


def test_generate_calls_on_threads_share_the_models_engine(tiny):
    model, processor = tiny
    expected = {
        i: generate(model, processor, f"Tell me about {i} rivers.", max_tokens=8) for i in range(3)
    }
    got = {}

    def worker(i: int) -> None:
        got[i] = generate(model, processor, f"Tell me about {i} rivers.", max_tokens=8)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    assert engine_for(model) is engine_for(model, processor)


def test_batch_generate_matches_generate(tiny):
    model, processor = tiny
    prompts = ["Hi", "Name a river", [{"role": "user", "content": "Count to five"}]]
    out = batch_generate(
        model,
        processor,
        prompts,
        max_tokens=[6, 9, 4],
        return_token_ids=True,
        return_logprobs=True,
    )
    for prompt, text, ids, lps, n in zip(
        prompts, out.texts, out.token_ids, out.logprobs, [6, 9, 4], strict=True
    ):
        assert text == generate(model, processor, prompt, max_tokens=n)
        assert len(ids) == len(lps) <= n and all(lp <= 0 for lp in lps)
    assert out.stats.generation_tokens >= sum(len(i) for i in out.token_ids)
    assert out.stats.prompt_tokens > 0 and out.caches is None
    with pytest.raises(UserError, match="max_tokens has 2 values for 3 prompts"):
        batch_generate(model, processor, prompts, max_tokens=[1, 2])


class Flaky:
    """The model, failing its `fail_at`-th decode forward."""

    def __init__(self, model, fail_at: int):
        self.model, self.calls, self.fail_at = model, 0, fail_at

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise MemoryError("out of memory in the forward")
        return self.model(*args, **kwargs)


def test_a_failed_forward_ends_the_batch_and_the_engine_goes_on(scripted):
    engine = Engine(Flaky(scripted, fail_at=3))
    handles = [engine.submit(Request(prompt=[i + 1], max_tokens=8)) for i in range(2)]
    for h in handles:
        with pytest.raises(MemoryError, match="out of memory"):
            list(h)
        assert h.stats.finish_reason == "error"
    assert not engine.has_work()
    assert [e.token for e in engine.submit(Request(prompt=[5], max_tokens=4))] == script([5], 4)
