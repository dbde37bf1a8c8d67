"""Chat sessions: cache reuse between turns (counted prefill, logits equal to a fresh prefill),
snapshots, thinking budget, tool calls, images, interruption, save/load and corrupted files."""

from __future__ import annotations

import json
import os
import struct

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_qwen35.engine.session import (
    ChatSession,
    common_prefix_length,
    snapshot_nbytes,
    thinking_budget_processor,
)
from mlx_qwen35.errors import UserError
from mlx_qwen35.inputs.render import safe_encoder
from mlx_qwen35.inputs.tools import ToolCall, ToolCallWarning
from mlx_qwen35.model.config import TextConfig
from mlx_qwen35.weights.loading import load, load_model
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

GREEDY = dict(temp=0.0, presence_penalty=0.0)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = ensure_tiny_random(tmp_path_factory.mktemp("cache"))
    model, processor = load(str(path))
    return Counting(model), processor


class Counting:
    """The model, counting the tokens that go through prefill (hidden_states calls); decoding
    steps go through __call__ and are not counted."""

    def __init__(self, model):
        self.model = model
        self.prefilled = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def hidden_states(self, inputs, cache=None, **kwargs):
        x = inputs if inputs is not None else kwargs["input_embeddings"]
        self.prefilled += x.shape[1]
        return self.model.hidden_states(inputs, cache, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def rendered_ids(processor, messages, generation=True, **kwargs) -> list[int]:
    text = processor.apply_chat_template(messages, add_generation_prompt=generation, **kwargs)
    return processor.encode(text)


def fresh_logprobs(model, ids) -> mx.array:
    return log_softmax(model.model(mx.array([ids]))[0, -1])


class Script:
    """A logits processor that makes the model write `tokens`, then lets it go on."""

    def __init__(self, tokens):
        self.tokens, self.step = list(tokens), 0

    def __call__(self, history, logits):
        if self.step < len(self.tokens):
            hit = mx.arange(logits.shape[-1]) == self.tokens[self.step]
            logits = mx.where(hit, 0.0, -1e9) + mx.zeros_like(logits)
        self.step += 1
        return logits


def ban(*token_ids):
    ids = mx.array(list(token_ids))

    def processor(history, logits):
        hit = (mx.arange(logits.shape[-1])[:, None] == ids[None]).any(axis=1)
        return mx.where(hit, -1e9, logits)

    return processor


def turn(chat, counter, *args, **kwargs):
    counter.prefilled = 0
    reply = chat.send(*args, **kwargs)
    pieces = list(reply)
    return pieces, reply.result


def test_reuse_counts_and_logits_across_turns_that_drop_thinking(tiny):
    model, processor = tiny
    think_end = processor.encode("</think>")[0]
    chat = ChatSession(
        model, processor, system="Be brief.", thinking_budget=3, max_tokens=8, **GREEDY
    )
    previous_user_end = 0
    for n, text in enumerate(["Hello there", "Tell me about the river town.", "And Maria?"]):
        pieces, result = turn(chat, model, text)
        history = chat.history
        ids = rendered_ids(processor, history[:-1])
        assert result.prompt_tokens == len(ids)
        # Reuse goes back to the end of the previous user message: the previous answer renders
        # differently now (its thinking is dropped), everything before it is unchanged.
        assert result.reused_tokens == previous_user_end
        assert model.prefilled == result.prefilled_tokens == len(ids) - previous_user_end
        diff = mx.max(mx.abs(pieces[0].logprobs - fresh_logprobs(model, ids))).item()
        assert diff < 1e-4, diff
        # The thinking budget made every answer think (3 tokens, then </think>).
        assert result.thinking_tokens == 3 and result.tokens[3] == think_end
        assert history[-1]["reasoning_content"] == result.reasoning != ""
        if n:
            dropped = history[-3]["reasoning_content"]
            text_now = processor.apply_chat_template(history[:-1])
            assert dropped and dropped not in text_now
        previous_user_end = len(rendered_ids(processor, history[:-1], generation=False))
    assert n == 2 and previous_user_end > 0


def test_agent_turn_extends_the_live_cache(tiny):
    """A tool-calling answer renders back exactly as generated, so the whole cache is kept; the
    calls come back typed by the schema."""
    model, processor = tiny
    chat = ChatSession(model, processor, tools=[WEATHER], max_tokens=150, **GREEDY)
    answer = (
        "I will check.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\n"
        "Paris\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
    )
    im_end = processor.encode("<|im_end|>")
    chat.logits_processors = [Script(processor.encode(answer) + im_end)]
    _, first = turn(chat, model, "Weather in Paris for two days?")
    assert first.finish_reason == "stop"
    assert first.tool_calls == [ToolCall("get_weather", {"city": "Paris", "days": 2}, "call_1_0")]
    assert (first.reasoning, first.text, first.warnings) == ("I will check.", "", [])
    cached = chat.cached_tokens
    assert cached == first.prompt_tokens + len(first.tokens)  # the end-of-turn token is fed too

    chat.logits_processors = []
    call = first.tool_calls[0]
    result = call.result({"temp": 21, "sky": "clear"})
    pieces, second = turn(chat, model, tool_results=[result], max_tokens=2)
    history = chat.history
    assert history[-2] == {
        "role": "tool",
        "content": '{"temp": 21, "sky": "clear"}',
        "name": "get_weather",
        "tool_call_id": "call_1_0",
    }
    ids = rendered_ids(processor, history[:-1], tools=[WEATHER])
    assert (
        ids[:cached]
        == processor.encode(processor.apply_chat_template(history[:1], tools=[WEATHER]))
        + processor.encode(answer)
        + im_end
    )
    assert second.reused_tokens == cached
    assert model.prefilled == second.prefilled_tokens == len(ids) - cached
    diff = mx.max(mx.abs(pieces[0].logprobs - fresh_logprobs(model, ids))).item()
    assert diff < 1e-4, diff


def test_malformed_tool_call_comes_back_as_text_with_a_warning(tiny):
    model, processor = tiny
    chat = ChatSession(model, processor, tools=[WEATHER], enable_thinking=False, max_tokens=80)
    bad = "<tool_call>\n<function=book_flight>\n<parameter=to>\nRome\n</parameter>\n</function>"
    chat.logits_processors = [Script(processor.encode(bad) + processor.encode("<|im_end|>"))]
    with pytest.warns(ToolCallWarning, match="unknown tool 'book_flight'"):
        result = chat.ask("Book me a flight")
    assert result.tool_calls == [] and result.text == bad
    assert len(result.warnings) == 1
    assert chat.history[-1] == {"role": "assistant", "content": bad}


def test_thinking_budget_closes_a_long_thinking_and_the_model_answers(tiny):
    model, processor = tiny
    think_end = processor.encode("</think>")[0]
    blank = processor.encode("</think>\n\n")[1:]
    never_stop = ban(think_end, *processor.eos_token_ids)
    chat = ChatSession(model, processor, max_tokens=20, logits_processors=[never_stop], **GREEDY)
    endless = chat.ask("Think hard.")
    assert endless.thinking_tokens == 20 and think_end not in endless.tokens
    assert endless.finish_reason == "length" and endless.text == ""

    chat.reset()
    pieces, result = turn(chat, model, "Think hard.", thinking_budget=6)
    assert result.thinking_tokens == 6
    assert result.tokens[6 : 7 + len(blank)] == [think_end, *blank]
    assert result.tokens.count(think_end) == 1
    assert [p.thinking for p in pieces] == [True] * 7 + [False] * 13
    assert result.text and result.reasoning
    assert "".join(p.text for p in pieces[7:]).strip() == result.text
    assert result.reasoning in result.raw

    # A model that closes its thinking itself is left alone.
    chat.reset()
    chat.logits_processors = [Script(processor.encode("ok.</think>"))]
    result = chat.ask("Quick one.", thinking_budget=6)
    assert result.thinking_tokens == len(processor.encode("ok.")) < 6
    assert result.tokens.count(think_end) == 1

    # Turning thinking off: no thinking block, no budget to apply.
    result = chat.ask("No thinking.", enable_thinking=False, thinking_budget=0)
    assert result.thinking_tokens == 0 and result.reasoning == ""


def test_budget_processor_forces_the_closing_sequence():
    proc = thinking_budget_processor(prompt_length=2, budget=2, forced=[7, 8])
    logits = mx.zeros((1, 10))
    assert proc(mx.array([1, 1, 3]), logits) is logits  # under budget
    forced = proc(mx.array([1, 1, 3, 4]), logits)
    assert mx.argmax(forced).item() == 7 and mx.isinf(forced).sum().item() == 9
    assert mx.argmax(proc(mx.array([1, 1, 3, 4, 7]), logits)).item() == 8
    assert proc(mx.array([1, 1, 3, 4, 7, 8]), logits) is logits  # done
    closed = proc(mx.array([1, 1, 7, 4]), logits)  # closed within the budget: untouched
    assert mx.array_equal(closed, logits).item()


def test_snapshot_memory_and_bound(tiny):
    spec = {
        "0.8B": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=8),
        "9B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=16),
    }
    sizes = {}
    for name, dims in spec.items():
        hv = 16 if name == "0.8B" else 32
        config = TextConfig.from_dict({"head_dim": 256, "linear_num_value_heads": hv, **dims})
        config.layer_types = [
            "full_attention" if (i + 1) % 4 == 0 else "linear_attention"
            for i in range(dims["num_hidden_layers"])
        ]
        sizes[name] = snapshot_nbytes(config)
    # 18 x (16*128*128*4 + 3*6144*2) and 24 x (32*128*128*4 + 3*8192*2)
    assert sizes == {"0.8B": 19_537_920, "9B": 51_511_296}

    model, processor = tiny
    chat = ChatSession(model, processor, max_tokens=3, max_snapshots=2, **GREEDY)
    for text in ["one", "two", "three", "four"]:
        chat.ask(text, enable_thinking=False)
    # Two message-boundary snapshots and the state after the last reply, each holding the
    # DeltaNet states (tiny-random runs in float32) and the KV of its prefix.
    one = snapshot_nbytes(model.args, mx.float32)
    args = model.args
    attention = sum(kind == "full_attention" for kind in args.layer_types)
    kv_per_token = attention * 2 * args.num_key_value_heads * args.head_dim * 4
    entries = chat.engine.prefix_cache.entries(chat._owner)
    assert len(chat._snapshots) == 2 and len(entries) == 3
    assert chat.snapshot_bytes == sum(one + e.length * kv_per_token for e in entries)
    # The last user message's end is kept: the next turn rolls back to it.
    last_user = len(rendered_ids(processor, chat.history[:-1], generation=False))
    assert chat._snapshots[-1].length == last_user
    result = chat.ask("five", enable_thinking=False)
    assert result.reused_tokens == last_user


def test_without_snapshots_a_changed_rendering_is_prefilled_again(tiny):
    model, processor = tiny
    chat = ChatSession(model, processor, max_tokens=4, max_snapshots=0, **GREEDY)
    chat.ask("Hi")
    pieces, result = turn(chat, model, "Again")
    assert result.reused_tokens == 0 and model.prefilled == result.prompt_tokens
    ids = rendered_ids(processor, chat.history[:-1])
    assert mx.max(mx.abs(pieces[0].logprobs - fresh_logprobs(model, ids))).item() < 1e-4


def test_images_across_turns(tiny):
    model, processor = tiny
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    square = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    chat = ChatSession(model, processor, enable_thinking=False, max_tokens=4, **GREEDY)
    seen = []
    for text, images in [("What is this?", [wide]), ("And now?", None), ("Compare", [square])]:
        pieces, result = turn(chat, model, text, images=images)
        seen += images or []
        prompt = processor.apply_chat_template(chat.history[:-1], enable_thinking=False)
        inputs = processor(text=prompt, images=seen)
        media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        embeddings, positions = model.prepare_inputs(inputs["input_ids"], **media)
        fresh = model.model(
            inputs["input_ids"], input_embeddings=embeddings, position_ids=positions
        )[0, -1]
        assert result.prompt_tokens == inputs["input_ids"].shape[1]
        assert model.prefilled == result.prefilled_tokens
        assert result.prefilled_tokens == result.prompt_tokens - result.reused_tokens
        diff = mx.max(mx.abs(pieces[0].logprobs - log_softmax(fresh))).item()
        assert diff < 1e-4, diff
    assert result.reused_tokens > 0
    assert chat.history[0]["content"][0] == {"type": "image"}


def test_interrupted_reply_is_kept_and_the_next_turn_is_right(tiny):
    model, processor = tiny
    chat = ChatSession(model, processor, max_tokens=50, enable_thinking=False, **GREEDY)
    reply = chat.send("Tell me a long story")
    for _ in range(3):
        next(reply)
    reply.close()
    assert reply.result.finish_reason == "interrupted" and len(reply.result.tokens) == 3
    assert chat.history[-1]["role"] == "assistant"
    pieces, result = turn(chat, model, "Go on", max_tokens=2)
    ids = rendered_ids(processor, chat.history[:-1], enable_thinking=False)
    assert mx.max(mx.abs(pieces[0].logprobs - fresh_logprobs(model, ids))).item() < 1e-4
    # A reply never read is finished by the next send.
    chat.send("Third", max_tokens=2)
    chat.send("Fourth", max_tokens=2).result  # noqa: B018
    assert [m["role"] for m in chat.history][-4:] == ["user", "assistant"] * 2


def test_a_reply_closed_before_it_starts_leaves_no_trace(tiny):
    model, processor = tiny
    rng = np.random.default_rng(2)
    a, b = (Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in "ab")
    chat = ChatSession(model, processor, enable_thinking=False, max_tokens=2, **GREEDY)
    reply = chat.send("Describe", images=[a])
    reply.close()
    assert reply.result.finish_reason == "interrupted" and chat.history == []
    # The same message with another image must not find the first one's processed pixels.
    pieces, result = turn(chat, model, "Describe", images=[b])
    prompt = processor.apply_chat_template(chat.history[:-1], enable_thinking=False)
    inputs = processor(text=prompt, images=[b])
    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    embeddings, positions = model.prepare_inputs(inputs["input_ids"], **media)
    fresh = model.model(inputs["input_ids"], input_embeddings=embeddings, position_ids=positions)
    diff = mx.max(mx.abs(pieces[0].logprobs - log_softmax(fresh[0, -1]))).item()
    assert diff < 1e-4, diff


def test_bad_input(tiny):
    model, processor = tiny
    chat = ChatSession(model, processor, **GREEDY)
    with pytest.raises(UserError, match="needs a message"):
        chat.send()
    with pytest.raises(UserError, match="thinking_budget"):
        chat.send("hi", thinking_budget=-1)
    with pytest.raises(UserError, match="context"):
        chat.send("river " * 5000)
    assert chat.history == []  # refused turns leave no trace
    with pytest.raises(UserError, match="max_snapshots"):
        ChatSession(model, processor, max_snapshots=-1)
    with pytest.raises(UserError, match="top_p"):
        ChatSession(model, processor, top_p=2.0)


def test_save_load_round_trip(tiny, tmp_path):
    model, processor = tiny
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    settings = dict(system="Be brief.", thinking_budget=2, max_tokens=6, **GREEDY)
    chat = ChatSession(model, processor, **settings)
    chat.ask("Look", images=[image])
    chat.ask("More please")
    path = tmp_path / "trip.session"
    chat.save(path)
    assert os.listdir(tmp_path) == ["trip.session"]  # atomic: no temp file left behind
    saved = [(e.length, e.kind) for e in chat.engine.prefix_cache.entries(chat._owner)]
    assert ("final" in {k for _, k in saved}) and len(saved) >= 2
    history = chat.history
    a = chat.send("Next")
    first_a = next(a)
    # A new process: nothing in the prefix cache but what the file brings.
    chat.engine.prefix_cache.clear()
    loaded = ChatSession.load(path, model, processor)
    assert loaded.history == history
    assert [(e.length, e.kind) for e in loaded.engine.prefix_cache.entries(loaded._owner)] == saved
    assert loaded.cached_tokens == max(n for n, _ in saved)
    b = loaded.send("Next")
    first_b = next(b)
    assert mx.array_equal(first_a.logprobs, first_b.logprobs).item()
    assert a.result.tokens == b.result.tokens
    assert a.result.reused_tokens == b.result.reused_tokens > 0
    # Rolling back past the image re-uses its processed form from the file.
    chat.engine.prefix_cache.clear()
    loaded.max_snapshots = chat.max_snapshots = 0
    c = loaded.send("Again")
    d = chat.send("Again")
    assert mx.array_equal(next(c).logprobs, next(d).logprobs).item()
    assert c.result.reused_tokens == 0


def corrupt_metadata(data: bytes, edit) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def test_corrupted_session_files_give_one_line_errors(tiny, tmp_path, hf_checkpoint):
    model, processor = tiny
    chat = ChatSession(model, processor, max_tokens=3, **GREEDY)
    chat.ask("Hello")
    good = tmp_path / "good.session"
    chat.save(good)
    data = good.read_bytes()

    def truncate_session(h):
        h["__metadata__"]["session"] = h["__metadata__"]["session"][:-9]

    def wrong_shape(h):
        state = json.loads(h["__metadata__"]["session"])
        state["entries"][-1]["tokens"] = state["entries"][-1]["tokens"][:-1]
        h["__metadata__"]["session"] = json.dumps(state)

    def other_format(h):
        h["__metadata__"]["format"] = "something.else"

    cases = {
        "half.session": (data[: len(data) // 2], "not a readable session file"),
        "noise.session": (b"\x00\x13garbage" * 10, "not a readable session file"),
        "json.session": (corrupt_metadata(data, truncate_session), "corrupted session file"),
        "shape.session": (corrupt_metadata(data, wrong_shape), "corrupted session file"),
        "format.session": (corrupt_metadata(data, other_format), "not a chat session file"),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=match) as info:
            ChatSession.load(tmp_path / name, model, processor)
        assert "\n" not in str(info.value) and name in str(info.value)
    with pytest.raises(UserError, match="no such session file"):
        ChatSession.load(tmp_path / "missing.session", model, processor)
    _, path = hf_checkpoint("hv3")
    with pytest.raises(UserError, match="different model"):
        ChatSession.load(good, load_model(path), processor)


class _FoldingEncoder:
    def __init__(self, encoder, vocab: int):
        self._e, self._vocab = encoder, vocab

    def __getattr__(self, name):
        return getattr(self._e, name)

    def encode(self, text):
        return [t % self._vocab for t in self._e.encode(text)]

    def encode_many(self, texts):
        return [[t % self._vocab for t in ids] for ids in self._e.encode_many(texts)]


class ModProcessor:
    """tiny-random's processor for a checkpoint with a smaller vocabulary: token ids are folded
    into the model's range (the tiny HF checkpoints come without a tokenizer)."""

    def __init__(self, processor, vocab: int):
        self._p, self._vocab = processor, vocab
        # Rendering tokenizes through the processor's safe encoder: fold its ids too.
        self.__dict__["_safe_encoder"] = _FoldingEncoder(safe_encoder(processor), vocab)

    def __getattr__(self, name):
        return getattr(self._p, name)

    def encode(self, text, add_special_tokens=False):
        return [t % self._vocab for t in self._p.encode(text, add_special_tokens)]

    @property
    def eos_token_ids(self):
        return {t % self._vocab for t in self._p.eos_token_ids}


@pytest.mark.parametrize("variant", ["hv3", "tied"])
def test_reuse_on_perturbed_checkpoints(tiny, hf_checkpoint, variant):
    """Hv/Hk = 3, Dk != Dv, attention as the first layer (hv3); a tied head (tied)."""
    _, tiny_processor = tiny
    _, path = hf_checkpoint(variant)
    model = Counting(load_model(path))
    processor = ModProcessor(tiny_processor, 300)
    chat = ChatSession(model, processor, system="Sys", thinking_budget=2, max_tokens=5, **GREEDY)
    expected_reuse = 0
    for text in ["First question", "Second one", "Third"]:
        pieces, result = turn(chat, model, text)
        ids = rendered_ids(processor, chat.history[:-1])
        assert result.reused_tokens == expected_reuse
        assert model.prefilled == result.prefilled_tokens == len(ids) - expected_reuse
        diff = mx.max(mx.abs(pieces[0].logprobs - fresh_logprobs(model, ids))).item()
        assert diff < 1e-4, diff
        assert result.thinking_tokens == 2
        expected_reuse = len(rendered_ids(processor, chat.history[:-1], generation=False))


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0
