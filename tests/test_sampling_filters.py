"""top_p, top_k and min_p do what they say, through the public front doors.

The model is tiny-random after weight surgery that fixes its next-token distribution: every
residual branch is silenced and every token embeds to the same vector, so the head sees one
hidden state at every position and gives the same probabilities after any prefix. Four tokens
('a' .30, 'b' .20, 'c' .15, 'd' .10) carry most of the mass and the last .25 is spread thin over
a few hundred tokens that decode to text other than those letters. Each filter keeps a different
known set, leaving out at least a quarter of the mass: 64 seeded draws land outside the set at
once if the filter is ignored (all 64 inside has odds below 1e-8).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_qwen35
from mlx_qwen35.weights.scripted import silence_layers
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

FAVOURED = {"a": 0.30, "b": 0.20, "c": 0.15, "d": 0.10}
TAIL_MASS = 0.25
DRAWS = 64
PROMPT = "Say something."
# filter -> the letters it keeps, given FAVOURED (the tail tokens are ~6e-4 each):
#   top_p .4: 'a' alone holds .30 < .4, 'a'+'b' hold .50 >= .4          -> a, b
#   top_k 3:                                                             -> a, b, c
#   min_p .25: keeps p >= .25 * .30 = .075                               -> a, b, c, d
FILTERS = {
    "top_p": (dict(top_p=0.4), "ab"),
    "top_k": (dict(top_k=3), "abc"),
    "min_p": (dict(min_p=0.25), "abcd"),
}
OFF = dict(top_p=1.0, top_k=0, min_p=0.0)


class Known:
    """The model, its processor, and the distribution it samples from."""

    def __init__(self, model, processor, probs: np.ndarray, letter_of: dict[int, str]):
        self.model, self.processor, self.probs, self.letter_of = model, processor, probs, letter_of

    def ids(self, letters: str) -> set[int]:
        return {t for t, c in self.letter_of.items() if c in letters}


@pytest.fixture(scope="module")
def known(tmp_path_factory) -> Known:
    path = ensure_tiny_random(tmp_path_factory.mktemp("cache"))
    model, processor = mlx_qwen35.load(str(path))
    vocab = model.args.vocab_size
    letter_of = {}
    for letter in FAVOURED:
        (token,) = processor.encode(letter)
        letter_of[token] = letter
    # Tail: plain ASCII tokens whose text has some character other than the favoured letters
    # (so a tail token shows in decoded text too); everything else (special tokens, byte
    # fragments) is ruled out.
    tail = [
        t
        for t in range(vocab)
        if t not in letter_of
        and t not in processor.eos_token_ids
        and (text := processor.decode([t])).isascii()
        and text.strip()
        and text.isprintable()
        and not set(text) <= set(FAVOURED)
        and processor.encode(text) == [t]
    ]
    assert len(tail) > 100
    logits = np.full(vocab, -1e4, np.float32)
    for token, letter in letter_of.items():
        logits[token] = np.log(FAVOURED[letter])
    logits[tail] = np.log(TAIL_MASS / len(tail))
    fix_next_token_logits(model, logits)

    probs = np.array(mx.softmax(model(mx.array([processor.encode(PROMPT)]))[0], axis=-1))
    want = np.exp(logits - logits.max())
    want /= want.sum()
    assert np.abs(probs - want).max() < 1e-5  # same distribution at every position
    return Known(model, processor, probs[-1], letter_of)


def fix_next_token_logits(model, logits: np.ndarray) -> None:
    """Make the model give `logits` after every token (in place): residual branches silenced,
    every embedding the same vector u with rms 1 (so the final norm, weight 1, leaves it as is),
    and head row v = logits[v] * u / |u|^2."""
    text = model.language_model
    silence_layers(model)
    hidden = model.args.hidden_size
    u = np.random.default_rng(0).standard_normal(hidden).astype(np.float32)
    u *= np.sqrt(hidden) / np.linalg.norm(u)
    embed = text.model.embed_tokens
    embed.weight = mx.broadcast_to(mx.array(u), embed.weight.shape).astype(embed.weight.dtype)
    text.lm_head.weight = mx.array(np.outer(logits, u) / hidden).astype(text.lm_head.weight.dtype)
    text.model.norm.weight = mx.ones_like(text.model.norm.weight)
    mx.eval(model.parameters())


def kept(probs: np.ndarray, *, top_p: float, top_k: int, min_p: float) -> set[int]:
    """The tokens each filter keeps, computed here (the textbook definitions), intersected."""
    order = np.argsort(-probs)
    keep = set(range(probs.size))
    if top_p < 1:
        before = np.cumsum(probs[order]) - probs[order]  # mass strictly above each token
        keep &= set(order[before < top_p].tolist())
    if top_k > 0:
        keep &= set(order[:top_k].tolist())
    if min_p > 0:
        keep &= set(np.flatnonzero(probs >= min_p * probs.max()).tolist())
    return keep


def check_draws(known: Known, tokens: list[int], letters: str) -> None:
    allowed = known.ids(letters)
    assert len(tokens) == DRAWS
    outside = [t for t in tokens if t not in allowed]
    assert not outside, f"{len(outside)} of {DRAWS} draws outside the kept set, e.g. {outside[:5]}"
    assert set(tokens) == allowed  # filtered to the set, not below it (greedy would pass above)


def test_the_distribution_and_the_kept_sets(known):
    """The expected sets follow from the model's real probabilities, with margins wide enough
    that any boundary convention agrees."""
    for name, (setting, letters) in FILTERS.items():
        assert kept(known.probs, **{**OFF, **setting}) == known.ids(letters), name
    for token, letter in known.letter_of.items():
        assert abs(known.probs[token] - FAVOURED[letter]) < 1e-4


def test_unfiltered_sampling_reaches_the_tail(known):
    """The control: with no filter about a quarter of the draws fall outside 'abcd' (the
    sampler is not quietly filtered by defaults), so every filter test below fails if its
    filter is ignored."""
    tokens = [
        r.token
        for r in mlx_qwen35.stream_generate(
            known.model, known.processor, PROMPT, DRAWS, temp=1.0, seed=0, **OFF
        )
    ]
    outside = sum(t not in known.ids("abcd") for t in tokens)
    assert 0.1 * DRAWS < outside < 0.4 * DRAWS


@pytest.mark.parametrize("name", FILTERS)
def test_stream_generate_samples_only_kept_tokens(known, name):
    setting, letters = FILTERS[name]
    responses = list(
        mlx_qwen35.stream_generate(
            known.model, known.processor, PROMPT, DRAWS, temp=1.0, seed=1, **{**OFF, **setting}
        )
    )
    assert responses[-1].finish_reason == "length"
    check_draws(known, [r.token for r in responses], letters)


def test_generate_text_has_only_kept_letters(known):
    setting, letters = FILTERS["top_p"]
    text = mlx_qwen35.generate(
        known.model, known.processor, PROMPT, DRAWS, temp=1.0, seed=2, **{**OFF, **setting}
    )
    assert len(text) == DRAWS  # one letter per draw: every tail token has other characters
    assert set(text) == set(letters)


@pytest.mark.parametrize(
    "name, thinking", [("top_p", True), ("top_p", False), ("top_k", False), ("min_p", False)]
)
def test_chat_session_samples_only_kept_tokens(known, name, thinking):
    """Each of the session's modes has its own recommended defaults, which explicit settings
    override; a second turn (reusing the cache) samples under the same settings."""
    setting, letters = FILTERS[name]
    chat = mlx_qwen35.ChatSession(
        known.model,
        known.processor,
        enable_thinking=thinking,
        max_tokens=DRAWS,
        temp=1.0,
        presence_penalty=0.0,
        seed=3,
        **{**OFF, **setting},
    )
    result = chat.ask(PROMPT)
    assert result.finish_reason == "length"
    check_draws(known, result.tokens, letters)
    if name == "top_p":
        check_draws(known, chat.ask("Again.").tokens, letters)
