"""Chat template rendering (tiny-random's Qwen3.5-style template), thinking control, parsing of
replies, and the Processor's text path."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from mlx_qwen35.errors import UserError
from mlx_qwen35.inputs.messages import build_messages, parse_tool_calls, split_thinking
from mlx_qwen35.inputs.processor import Processor
from mlx_qwen35.model.config import load_config
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> Processor:
    path = ensure_tiny_random(tmp_path_factory.mktemp("cache"))
    return Processor.from_pretrained(path, load_config(path))


def render(processor, messages, **kwargs) -> str:
    return processor.apply_chat_template(messages, **kwargs)


@pytest.mark.parametrize(
    "enable_thinking, tail",
    [
        (None, "<think>\n"),
        (True, "<think>\n"),
        (False, "<think>\n\n</think>\n\n"),
    ],
)
def test_generation_prompt_and_thinking(processor, enable_thinking, tail):
    text = render(processor, build_messages("Hi there"), enable_thinking=enable_thinking)
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n" + tail


def test_none_leaves_enable_thinking_undefined(processor, monkeypatch):
    # mlx-lm's wrapper would pass enable_thinking=True; None must reach the template as undefined.
    probe = "{{ 'defined' if enable_thinking is defined else 'undefined' }}"
    monkeypatch.setattr(processor.tokenizer._tokenizer, "chat_template", probe)
    assert render(processor, build_messages("x")) == "undefined"
    assert render(processor, build_messages("x"), enable_thinking=False) == "defined"


def test_system_and_no_generation_prompt(processor):
    text = render(processor, build_messages("Hi", system="Be brief."), add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_reasoning_kept_after_the_last_query_only(processor):
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>\nr2\n</think>\n\na2"},
    ]
    text = render(processor, messages, add_generation_prompt=False)
    assert text == (
        "<|im_start|>user\nq1<|im_end|>\n"
        "<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr2\n</think>\n\na2<|im_end|>\n"
    )
    # Inline reasoning in an earlier turn is dropped too.
    messages[1] = {"role": "assistant", "content": "<think>r1</think>a1"}
    assert "r1" not in render(processor, messages)


def test_tools_calls_and_results(processor):
    messages = [
        {"role": "system", "content": "You help with travel."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "reasoning_content": "Two cities, two calls.",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
                {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rain"},
    ]
    text = render(processor, messages, tools=[WEATHER])
    head = "<|im_start|>system\n# Tools\n\nThese functions are available:\n\n<tools>\n"
    assert text.startswith(head + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>")
    assert "\n\nYou help with travel.<|im_end|>\n" in text
    # The tool results are not a new user query: the reasoning of the calling turn stays.
    assert (
        "<|im_start|>assistant\n<think>\nTwo cities, two calls.\n</think>\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n"
        "</function>\n</tool_call><|im_end|>\n"
    ) in text
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    # mlx-lm recognises the XML call format from the template.
    assert processor.tokenizer.tool_call_start == "<tool_call>"


def test_image_and_video_parts(processor):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "and"},
                {"type": "video", "video": "clip.mp4"},
                {"type": "text", "text": "What changed?"},
            ],
        }
    ]
    text = render(processor, messages)
    assert text.startswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and"
        "<|vision_start|><|video_pad|><|vision_end|>What changed?<|im_end|>\n"
    )
    numbered = render(processor, messages, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in numbered and "Video 1: <|vision_start|>" in numbered
    ids = processor.encode(text)
    assert ids.count(processor.config.image_token_id) == 1
    assert ids.count(processor.config.video_token_id) == 1


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "first message"),
        ([{"role": "system", "content": [{"type": "image"}]}], "cannot contain images"),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
            "not valid JSON",
        ),
    ],
)
def test_bad_messages(processor, messages, match):
    with pytest.raises(UserError, match=match):
        render(processor, messages)


def test_split_thinking():
    assert split_thinking("Let me see.\n</think>\n\nIt is 4.") == ("Let me see.", "It is 4.")
    assert split_thinking("<think>\nhm\n</think>\n\nYes") == ("hm", "Yes")
    assert split_thinking("<think>\nstill thinking") == ("still thinking", "")
    assert split_thinking("Just an answer.") == ("", "Just an answer.")


def test_parse_tool_calls_reads_what_the_template_writes(processor):
    messages = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"name": "get_weather", "arguments": {"city": "New York", "days": 3}},
                {"name": "plan", "arguments": {"stops": ["a", "b"], "note": "line 1\nline 2"}},
            ],
        },
    ]
    text = render(processor, messages, add_generation_prompt=False)
    assert parse_tool_calls(text) == [
        {"name": "get_weather", "arguments": {"city": "New York", "days": 3}},
        {"name": "plan", "arguments": {"stops": ["a", "b"], "note": "line 1\nline 2"}},
    ]
    assert parse_tool_calls("no calls here") == []


def test_processor_left_pads_batches(processor):
    short, long = "Hi", "The river town woke slowly."
    out = processor(text=[short, long])
    ids, mask = out["input_ids"], out["attention_mask"]
    n_short, n_long = len(processor.encode(short)), len(processor.encode(long))
    assert ids.shape == mask.shape == (2, n_long) and ids.dtype == mx.int32
    assert mask[0].tolist() == [0] * (n_long - n_short) + [1] * n_short
    assert ids[0, n_long - n_short :].tolist() == processor.encode(short)
    assert ids[0, 0].item() == processor.tokenizer.pad_token_id
    assert ids[1].tolist() == processor.encode(long) and mx.all(mask[1]).item()
    single = processor(text=long)
    assert single["input_ids"].shape == (1, n_long)


def test_processor_media_needs_a_media_processor(processor):
    text_only = Processor(processor.tokenizer, processor.config)
    with pytest.raises(UserError, match="no image processor"):
        text_only(text="<|vision_start|><|image_pad|><|vision_end|>", images=["img"])
    with pytest.raises(UserError, match="no video processor"):
        text_only(text="<|vision_start|><|video_pad|><|vision_end|>", videos=[["f1", "f2"]])


def test_processor_delegates_media_expansion(processor):
    pad = "<|image_pad|>"

    def images(texts, items):
        assert items == ["a", "b"]
        return [t.replace(pad, pad * 3) for t in texts], {"pixel_values": mx.zeros((24, 4))}

    with_media = Processor(processor.tokenizer, processor.config, image_processor=images)
    out = with_media(text=f"x{pad}y{pad}", images=["a", "b"])
    assert out["input_ids"][0].tolist().count(processor.config.image_token_id) == 6
    assert out["pixel_values"].shape == (24, 4)


def test_eos_ids_are_im_end_and_generation_config(processor):
    tok = processor.tokenizer
    expected = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    assert processor.eos_token_ids == expected


def test_from_pretrained_without_tokenizer_files(tmp_path, processor):
    with pytest.raises(UserError, match="no tokenizer.json"):
        Processor.from_pretrained(tmp_path, processor.config)
