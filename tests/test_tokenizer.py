"""Our tokenizer (tokenizers + jinja2, no transformers) against transformers' own on the same
files: token ids, decoded text, special tokens, and chat templates rendered character for
character; the streaming detokenizer; and checkpoints whose tokenizer files are wrong."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from mlx_qwen35.errors import UserError
from mlx_qwen35.inputs.processor import Processor
from mlx_qwen35.inputs.tokenizer import Tokenizer
from mlx_qwen35.model.config import load_config
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

TEXTS = [
    "hello world",
    " leading space and trailing  ",
    "x<|im_end|>y<think>z</think><tool_call>",
    "é café 日本語 🙂 Ünïcöde\u0301 ﬁ",
    "a\n\n\tb  c   \r\n",
    "don't I'll 1234567 <|image_pad|>",
    "",
]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather <b>now</b> & later",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>\nr2\n</think>\n\na2", "tool_calls": None},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "reasoning": "One call.",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
    ],
    [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "and"},
                {"type": "video", "video": "clip.mp4"},
                {"type": "text", "text": "What changed?"},
            ],
        }
    ],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_random(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def ours(tiny) -> Tokenizer:
    return Tokenizer.from_dir(tiny)


@pytest.fixture(scope="module")
def hf(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_text_match_transformers(ours, hf, text):
    for special in (False, True):
        ids = ours.encode(text, add_special_tokens=special)
        assert ids == hf.encode(text, add_special_tokens=special)
    ids = ours.encode(text) + [ours.convert_tokens_to_ids("<|im_end|>")]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )


def test_special_tokens_match_transformers(ours, hf):
    assert ours.special_tokens_map == {k: v for k, v in hf.special_tokens_map.items() if v}
    assert (ours.eos_token_id, ours.pad_token_id, ours.unk_token_id, ours.bos_token_id) == (
        hf.eos_token_id,
        hf.pad_token_id,
        hf.unk_token_id,
        hf.bos_token_id,
    )
    assert len(ours) == len(hf) and ours.get_vocab() == hf.get_vocab()
    assert ours.convert_ids_to_tokens([1, 2]) == hf.convert_ids_to_tokens([1, 2])
    assert ours.convert_tokens_to_ids("no such token") is None


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"add_vision_id": True}])
@pytest.mark.parametrize("generation", [True, False])
def test_chat_template_renders_as_transformers(ours, hf, messages, kwargs, generation):
    for tools in (None, [WEATHER]):
        args = dict(tools=tools, add_generation_prompt=generation, **kwargs)
        expected = hf.apply_chat_template(messages, tokenize=False, **args)
        assert ours.apply_chat_template(messages, tokenize=False, **args) == expected
        assert ours.apply_chat_template(messages, **args) == hf.encode(expected)


def test_template_sources_and_variables(tmp_path, tiny, hf):
    """Named templates (tool_use for tools), the template inside tokenizer_config.json, special
    tokens as template variables, transformers' tojson, and raise_exception."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "D{{ eos_token }}{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "T{{ tools | tojson }}{{ pad_token }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    hi = [{"role": "user", "content": "héllo"}]
    assert tok.apply_chat_template(hi, tokenize=False) == "D<|im_end|>héllo"
    assert tok.apply_chat_template(hi, tools=[WEATHER], tokenize=False) == (
        "T" + json.dumps([WEATHER], ensure_ascii=False) + "<|endoftext|>"
    )
    config["chat_template"] = "{{ raise_exception('no ' + messages[0]['role']) }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="chat template: no user"):
        Processor(Tokenizer.from_dir(tmp_path), None).apply_chat_template(hi)
    # chat_template.jinja wins over tokenizer_config's (as in transformers).
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(hi, tokenize=False) == "J1"


def test_template_sees_only_plain_data(ours):
    class Image:
        def save(self, path):  # a method a template must never reach
            raise AssertionError("called")

    ours = Tokenizer(ours.backend, ours.special_tokens, "{{ messages[0]['content'][0]['image'] }}")
    messages = [{"role": "user", "content": [{"type": "image", "image": Image()}]}]
    assert ours.apply_chat_template(messages, tokenize=False) == "<Image>"


def _stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    detok = tok.detokenizer
    pieces = []
    for i in ids:
        detok.add_token(i)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    return pieces, detok.text


def test_streamed_text_is_the_decoded_text(ours):
    rng = random.Random(0)
    vocab = len(ours)
    for _ in range(50):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        pieces, text = _stream(ours, ids)
        assert "".join(pieces) == text == ours.decode(ids)


def test_stream_holds_back_split_characters(ours):
    ids = ours.encode("a🙂b")
    assert len(ids) > 3  # the emoji is several byte tokens
    pieces, text = _stream(ours, ids)
    assert pieces[0] == "a" and "🙂" in pieces and "\ufffd" not in "".join(pieces)
    # Cut inside the emoji: finalize() writes the incomplete character as decode() does.
    cut = ids[:2]
    pieces, text = _stream(ours, cut)
    assert pieces[-1] == "\ufffd" and text == ours.decode(cut)


def test_each_detokenizer_is_fresh(ours):
    first = ours.detokenizer
    first.add_token(ours.encode("x")[0])
    assert ours.detokenizer.text == "" and first.text == "x"


def test_tokenizer_config_without_tokenizer_json_is_refused(tmp_path, tiny):
    """transformers builds a 2-token tokenizer from tokenizer_config.json alone, and the model
    then writes an empty reply; refuse the checkpoint instead."""
    shutil.copy(tiny / "tokenizer_config.json", tmp_path)
    with pytest.raises(UserError, match="has tokenizer_config.json but no tokenizer.json"):
        Processor.from_pretrained(tmp_path, load_config(tiny))


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("tokenizer.json", "{not json", "cannot load the tokenizer"),
        ("tokenizer_config.json", "{not json", "not valid JSON"),
        ("tokenizer_config.json", "[1, 2]", "expected a JSON object"),
    ],
)
def test_broken_tokenizer_files(tmp_path, tiny, name, content, match):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / f, tmp_path / f)
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=match):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("generation_config.json", '{"eos_token_id": "x"}', "eos_token_id must be a token id"),
        ("generation_config.json", '{"eos_token_id": [1, true]}', "eos_token_id must be"),
        ("generation_config.json", "[1]", "expected a JSON object"),
        ("chat_template.jinja", b"\xff\xfe{{ x }}", "cannot read the chat template"),
    ],
)
def test_broken_generation_config_and_template(tmp_path, tiny, name, content, match):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / f, tmp_path / f)
    if isinstance(content, bytes):
        (tmp_path / name).write_bytes(content)
    else:
        (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=match) as info:
        Processor.from_pretrained(tmp_path, load_config(tiny))
    assert "\n" not in str(info.value)


def test_mlx_lm_generation_takes_our_tokenizer(tiny):
    """mlx-lm's utilities wrap a tokenizer that is not theirs in their TokenizerWrapper; ours
    survives that, so mlx-lm can still drive our model and processor."""
    import mlx_lm

    import mlx_qwen35

    model, processor = mlx_qwen35.load(str(tiny))
    ids = processor.encode(processor.apply_chat_template([{"role": "user", "content": "Hi"}]))
    ours = [r.token for r in mlx_qwen35.stream_generate(model, processor, ids, max_tokens=6)]
    theirs = [
        r.token for r in mlx_lm.stream_generate(model, processor.tokenizer, ids, max_tokens=6)
    ]
    assert ours and theirs[: len(ours)] == ours
