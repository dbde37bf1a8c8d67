"""The prefix cache: where a request resumes (longest boundary that is a strict prefix, never inside
media, media keys must match), what it reports, the reply state an agent's next request extends,
and the least-recently-used bound in bytes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35.engine.prefix_cache import PrefixCache, PrefixEntry
from mlx_qwen35.engine.request import MediaSpan, Request
from mlx_qwen35.engine.scheduler import Engine
from mlx_qwen35.weights.loading import load_model

TOL = 1e-4


@pytest.fixture(scope="module")
def base(hf_checkpoint):
    _, path = hf_checkpoint("base")
    return load_model(path)


def first_logprobs(engine: Engine, request: Request) -> tuple[np.ndarray, object]:
    handle = engine.submit(request)
    event = next(handle)
    handle.cancel()
    return np.array(event.logprobs), handle.stats


def fresh(model, prompt: list[int]) -> np.ndarray:
    logits = model(mx.array([prompt]))[0, -1]
    return np.array(logits - mx.logsumexp(logits))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


PROMPT = list(np.random.default_rng(0).integers(0, 300, 20))
PROMPT = [int(t) for t in PROMPT]


def test_a_request_resumes_from_the_longest_boundary_it_starts_with(base):
    engine = Engine(base, prefill_step_size=4)
    list(engine.submit(Request(prompt=PROMPT, max_tokens=2, boundaries=[5, 12, 16])))
    assert [e.length for e in engine.prefix_cache.entries()] == [5, 12, 16]
    # Shares 12 tokens (and a 13th that differs): resumes at 12.
    other = PROMPT[:12] + [(PROMPT[12] + 1) % 300] + PROMPT[13:]
    lp, stats = first_logprobs(engine, Request(prompt=other, max_tokens=3))
    assert (stats.cached_tokens, stats.prefilled_tokens) == (12, len(other) - 12)
    assert rel_err(lp, fresh(base, other)) < TOL
    # Exactly the 16 tokens of a boundary: one token must run, so it resumes at 12.
    lp, stats = first_logprobs(engine, Request(prompt=PROMPT[:16], max_tokens=3))
    assert stats.cached_tokens == 12 and rel_err(lp, fresh(base, PROMPT[:16])) < TOL
    # Nothing in common: from scratch.
    _, stats = first_logprobs(engine, Request(prompt=[1, 2, 3], max_tokens=2))
    assert stats.cached_tokens == 0 and stats.prefilled_tokens == 3


def test_media_spans_are_never_resumed_inside_and_keys_must_match(base):
    engine = Engine(base, prefill_step_size=4)
    spans = [MediaSpan(3, 9, "cat")]
    list(engine.submit(Request(PROMPT, 2, boundaries=[6, 10, 14], media_spans=spans)))
    # 6 lies inside the span: no snapshot there.
    assert [e.length for e in engine.prefix_cache.entries()] == [10, 14]
    _, stats = first_logprobs(engine, Request(PROMPT, 2, media_spans=spans))
    assert stats.cached_tokens == 14
    # The same tokens around other pixels: nothing past the span is theirs.
    _, stats = first_logprobs(engine, Request(PROMPT, 2, media_spans=[MediaSpan(3, 9, "dog")]))
    assert stats.cached_tokens == 0
    # A request whose own span covers 10 and 14 cannot resume there.
    _, stats = first_logprobs(engine, Request(PROMPT, 2, media_spans=[*spans, (12, 18)]))
    assert stats.cached_tokens == 10


def test_a_reply_state_is_what_the_next_request_extends(base):
    engine = Engine(base)
    first = engine.submit(Request(prompt=PROMPT[:8], max_tokens=5, cache_final=True))
    generated = [e.token for e in first]
    (final,) = engine.prefix_cache.entries()
    assert final.kind == "final" and final.tokens == tuple(PROMPT[:8] + generated[:-1])
    follow = list(final.tokens) + [4, 5, 6]
    lp, stats = first_logprobs(engine, Request(prompt=follow, max_tokens=2))
    assert stats.cached_tokens == final.length and stats.prefilled_tokens == 3
    assert rel_err(lp, fresh(base, follow)) < TOL


def test_a_given_prefix_is_used_and_must_fit(base):
    engine = Engine(base)
    list(engine.submit(Request(PROMPT, 2, boundaries=[9])))
    (entry,) = engine.prefix_cache.entries()
    engine.prefix_cache.clear()  # the request holds the entry itself
    _, stats = first_logprobs(engine, Request(PROMPT, 2, prefix=entry))
    assert stats.cached_tokens == 9
    from mlx_qwen35.errors import UserError

    with pytest.raises(UserError, match="prefix"):
        engine.submit(Request([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 2, prefix=entry))


def test_without_room_nothing_is_kept(base):
    engine = Engine(base, prefix_cache_bytes=0)
    list(engine.submit(Request(PROMPT, 2, boundaries=[5, 10], cache_final=True)))
    assert len(engine.prefix_cache) == 0


def entry(tokens: tuple[int, ...], nbytes: int, owner=None) -> PrefixEntry:
    layers = [("gdn", (mx.zeros((nbytes // 4 - 1,), mx.float32), mx.zeros((1,), mx.float32)))]
    return PrefixEntry(tokens, layers, owners={owner} if owner is not None else set())


def test_least_recently_used_entries_go_first_within_the_byte_bound():
    cache = PrefixCache(max_bytes=1000)
    a, b, c = entry((1,), 400), entry((1, 2), 400), entry((1, 2, 3), 400)
    assert cache.insert(a) and cache.insert(b) and cache.nbytes == 800
    assert cache.lookup([1, 2, 9]) is b
    assert cache.lookup([1, 9]) is a  # a is now the most recently used
    cache.insert(c)  # over the bound: b, the least recently used, goes
    assert cache.entries() == [a, c] and cache.nbytes == 800
    assert not cache.insert(entry((5,), 2000))  # alone beyond the bound: refused
    cache.max_bytes = 500
    assert cache.entries() == [c]


def test_owners_release_their_entries():
    cache = PrefixCache()
    one, two = object(), object()
    shared = entry((1, 2), 40, one)
    cache.insert(shared)
    cache.insert(entry((1, 2), 40, two))  # the same state: the entry gains an owner
    assert len(cache) == 1 and shared.owners == {one, two}
    cache.insert(entry((7,), 40))  # nobody's: lives by LRU alone
    cache.clear(one)
    assert cache.entries(two) == [shared]
    cache.release(shared, two)
    assert [e.tokens for e in cache.entries()] == [(7,)]
