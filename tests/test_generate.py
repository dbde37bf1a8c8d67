"""The generation loop on tiny-random: greedy equals the full forward's argmax, seeds repeat,
end-of-turn ids stop, limits hold, bad settings are refused with a clear message."""

from __future__ import annotations

import copy

import mlx.core as mx
import pytest

from mlx_qwen35.engine.generate import generate, stream_generate
from mlx_qwen35.engine.request import Request
from mlx_qwen35.engine.scheduler import Engine
from mlx_qwen35.errors import UserError
from mlx_qwen35.inputs.processor import Processor
from mlx_qwen35.inputs.prompt import prompt_tokens
from mlx_qwen35.weights.loading import load
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

PROMPT = "Tell me about the river town."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = ensure_tiny_random(tmp_path_factory.mktemp("cache"))
    return load(str(path))


def tokens(model, processor, prompt=PROMPT, **kwargs) -> list[int]:
    return [r.token for r in stream_generate(model, processor, prompt, **kwargs)]


def test_greedy_matches_the_full_forward(tiny):
    model, processor = tiny
    ids = prompt_tokens(processor, PROMPT)
    # Tiny prefill steps: several cache-only chunks, then a last one that runs the head.
    out = tokens(model, processor, max_tokens=12, prefill_step_size=5)
    assert len(out) == 12
    assert out == tokens(model, processor, max_tokens=12)
    logits = model(mx.array([ids + out[:-1]]))[0, len(ids) - 1 :]
    assert mx.argmax(logits, axis=-1).tolist() == out


def test_prompt_forms_agree(tiny):
    model, processor = tiny
    text = generate(model, processor, PROMPT, max_tokens=8)
    messages = [{"role": "user", "content": PROMPT}]
    assert generate(model, processor, messages, max_tokens=8) == text
    ids = prompt_tokens(processor, PROMPT)
    assert generate(model, processor, ids, max_tokens=8) == text
    assert generate(model, processor, mx.array(ids), max_tokens=8) == text
    with_system = prompt_tokens(processor, PROMPT, system="Be brief.")
    assert with_system != ids and processor.decode(with_system).startswith("<|im_start|>system")
    no_think = prompt_tokens(processor, PROMPT, enable_thinking=False)
    assert processor.decode(no_think).endswith("<think>\n\n</think>\n\n")


def test_seed_makes_sampling_repeatable(tiny):
    model, processor = tiny
    settings = dict(max_tokens=16, temp=1.0, top_p=0.95, top_k=50)
    first = tokens(model, processor, seed=7, **settings)
    assert tokens(model, processor, seed=7, **settings) == first
    assert tokens(model, processor, seed=8, **settings) != first


def test_stops_at_an_end_of_turn_id(tiny, monkeypatch):
    model, processor = tiny
    greedy = tokens(model, processor, max_tokens=10)
    stop = greedy[4]
    assert stop not in greedy[:4]
    monkeypatch.setattr(
        processor.tokenizer, "eos_token_ids", processor.tokenizer.eos_token_ids | {stop}
    )
    responses = list(stream_generate(model, processor, PROMPT, max_tokens=10))
    assert [r.token for r in responses] == greedy[:5]
    last = responses[-1]
    assert last.finish_reason == "stop" and last.generation_tokens == 5
    assert all(r.finish_reason is None for r in responses[:-1])
    text = "".join(r.text for r in responses)
    assert text == processor.decode(greedy[:4])  # the stop token itself is not text


def test_max_tokens_and_response_fields(tiny):
    model, processor = tiny
    responses = list(stream_generate(model, processor, PROMPT, max_tokens=6))
    assert len(responses) == 6
    last = responses[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 6
    assert last.prompt_tokens == len(prompt_tokens(processor, PROMPT))
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    assert last.logprobs.shape == (processor.config.text.vocab_size,)
    assert "".join(r.text for r in responses) == processor.decode([r.token for r in responses])


def test_presence_penalty_forbids_repeats(tiny):
    model, processor = tiny
    plain = tokens(model, processor, max_tokens=40)
    assert len(set(plain)) < len(plain)  # the random model repeats itself when greedy
    penalised = tokens(model, processor, max_tokens=40, presence_penalty=1000.0)
    assert len(set(penalised)) == len(penalised)
    assert penalised[0] == plain[0]  # nothing generated yet, nothing penalised
    assert tokens(model, processor, max_tokens=40, repetition_penalty=5.0) != plain


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temp=-0.5), "temp must be a number >= 0"),
        (dict(temp=float("nan")), "temp must be"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), "top_p must be"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
        (dict(max_tokens=0), "max_tokens must be a positive integer"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a number > 0"),
        (dict(prefill_step_size=0), "prefill_step_size must be a positive integer"),
    ],
)
def test_bad_settings(tiny, kwargs, match):
    model, processor = tiny
    with pytest.raises(UserError, match=match):
        generate(model, processor, PROMPT, **kwargs)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("", "the prompt is empty"),
        ("  \n", "the prompt is empty"),
        ([], "the prompt is empty"),
        ([10**6], "token ids must be integers"),
    ],
)
def test_bad_prompts(tiny, prompt, match):
    model, processor = tiny
    with pytest.raises(UserError, match=match):
        generate(model, processor, prompt)


def test_prompt_beyond_the_context(tiny):
    model, processor = tiny
    config = copy.deepcopy(processor.config)
    config.text.max_position_embeddings = 40
    short = Processor(processor.tokenizer, config)
    with pytest.raises(UserError, match="the model's context is 40 tokens"):
        generate(model, short, [1] * 40)
    # A prompt that fits stops at the end of the context.
    responses = list(stream_generate(model, short, [1] * 37, max_tokens=50))
    assert len(responses) <= 3 and responses[-1].finish_reason in ("length", "stop")


def test_engine_takes_prepared_embeddings_and_positions(tiny):
    """The request fields the media path uses: embeddings and 3-D positions for the prompt,
    sliced per prefill chunk; decoding then continues from the position the cache records."""
    model, processor = tiny
    ids = prompt_tokens(processor, PROMPT)
    engine = Engine(model, processor)

    def run(**kwargs):
        return [e.token for e in engine.submit(Request(prompt=ids, max_tokens=6, **kwargs))]

    plain = run()
    T = len(ids)
    embeddings = model.embed(mx.array([ids]))[0]
    positions = mx.broadcast_to(mx.arange(T)[None], (3, T))
    assert run(input_embeddings=embeddings, position_ids=positions, prefill_step_size=4) == plain
    # Shifted positions: rotary sees only relative positions, so the tokens do not change, and
    # decoding must continue from the shifted position (not the cache offset) for that to hold.
    assert run(position_ids=positions + 100, cache_final=True) == plain
    # The cache holds the prompt and the tokens fed back (all but the last one).
    (final,) = engine.prefix_cache.entries()
    assert final.length == T + 5 and final.next_position == T + 5 + 100
    with pytest.raises(UserError, match=r"position_ids must be \[3, "):
        run(position_ids=positions[:, :-1])
    with pytest.raises(UserError, match="cover only the last"):
        run(input_embeddings=embeddings[1:])
