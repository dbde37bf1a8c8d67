"""tiny-random: deterministic bytes, atomic caching, the original HF layout, a real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mlx_qwen35.model.config import load_config
from mlx_qwen35.weights.tiny_random import (
    ADDED_TOKENS,
    CACHE_ENV,
    NAME,
    VERSION,
    ensure_tiny_random,
    write_tiny_random,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return ensure_tiny_random(tmp_path_factory.mktemp("cache"))


def _weights(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_files_are_identical_byte_for_byte(tiny, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    write_tiny_random(again)
    names = sorted(p.name for p in tiny.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= set(names)
    for name in names:
        assert (tiny / name).read_bytes() == (again / name).read_bytes(), name


def test_ensure_builds_once_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = ensure_tiny_random()
    assert path == tmp_path / f"{NAME}-v{VERSION}"
    config = path / "config.json"
    stamp = config.stat().st_mtime_ns
    assert ensure_tiny_random() == path
    assert config.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary dir left behind


def test_config_follows_the_qwen35_layout(tiny):
    raw = json.loads((tiny / "config.json").read_text())
    assert raw["model_type"] == "qwen3_5" and raw["text_config"]["model_type"] == "qwen3_5_text"
    cfg = load_config(tiny)
    text = cfg.text
    assert text.layer_types == ["linear_attention"] * 3 + ["full_attention"] + [
        "linear_attention"
    ] * 3 + ["full_attention"]
    assert text.linear_num_value_heads == 2 * text.linear_num_key_heads
    assert text.num_attention_heads == 4 * text.num_key_value_heads
    assert sum(text.rope.mrope_section) == text.rotary_dim // 2
    assert not cfg.tie_word_embeddings and cfg.format_version is None
    assert cfg.vision is not None and cfg.vision.out_hidden_size == text.hidden_size


def test_weights_are_in_the_original_hf_layout(tiny):
    cfg = load_config(tiny).text
    w = _weights(tiny)
    index = json.loads((tiny / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(w)
    lm = "model.language_model.layers"
    c = cfg.conv_dim
    assert w[f"{lm}.0.linear_attn.conv1d.weight"].shape == (c, 1, cfg.linear_conv_kernel_dim)
    assert w[f"{lm}.0.linear_attn.A_log"].dtype == np.float32
    assert w[f"{lm}.3.self_attn.q_proj.weight"].shape == (
        2 * cfg.num_attention_heads * cfg.head_dim,
        cfg.hidden_size,
    )
    # Zero-centred (1 + w) norms, perturbed; the gated norm holds plain w around 1.
    norm = w[f"{lm}.0.input_layernorm.weight"]
    assert abs(norm.mean()) < 0.1 and norm.std() > 0.05
    assert abs(w[f"{lm}.0.linear_attn.norm.weight"].mean() - 1) < 0.1
    decay = np.exp(w[f"{lm}.0.linear_attn.A_log"])
    assert np.all((decay >= 1) & (decay <= 16))
    assert w["lm_head.weight"].shape == (cfg.vocab_size, cfg.hidden_size)
    assert w["model.visual.patch_embed.proj.weight"].shape == (32, 3, 2, 16, 16)
    assert w["model.visual.merger.linear_fc2.weight"].shape == (cfg.hidden_size, 128)
    assert "mtp.fc.weight" in w and "mtp.layers.0.self_attn.q_norm.weight" in w


def test_tokenizer_loads_in_mlx_lm_and_transformers(tiny):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, load
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(tiny)
    wrapper = load(tiny)
    assert isinstance(wrapper._detokenizer, BPEStreamingDetokenizer)
    assert 500 <= len(hf) <= 1000
    text = "Maria paid 1234 for café 🙂 <|im_start|>user\n<think>x</think>\n\n  end"
    ids = raw.encode(text).ids
    assert hf.encode(text, add_special_tokens=False) == ids
    assert wrapper.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == text
    digits = [raw.id_to_token(i) for i in raw.encode("1234").ids]
    assert digits == ["1", "2", "3", "4"]  # digits split singly
    assert raw.encode("cafe\u0301").ids == raw.encode("café").ids  # NFC
    assert hf.chat_template is not None and wrapper.has_chat_template


def test_special_tokens_sit_at_the_end_of_the_vocab(tiny):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny)
    raw = json.loads((tiny / "config.json").read_text())
    ids = [hf.convert_tokens_to_ids(t) for t, _ in ADDED_TOKENS]
    n = len(hf)
    assert ids == list(range(n - len(ADDED_TOKENS), n))
    tok = dict(zip([t for t, _ in ADDED_TOKENS], ids, strict=True))
    assert raw["image_token_id"] == tok["<|image_pad|>"]
    assert raw["video_token_id"] == tok["<|video_pad|>"]
    assert raw["vision_start_token_id"] == tok["<|vision_start|>"]
    assert raw["vision_end_token_id"] == tok["<|vision_end|>"]
    assert raw["text_config"]["vocab_size"] >= n
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == {tok["<|im_end|>"], tok["<|endoftext|>"]}
    # Special ones are skipped when decoding; think/tool markers are not (as in Qwen's vocab).
    assert hf.decode([tok["<|im_end|>"], tok["<think>"]], skip_special_tokens=True) == "<think>"


def test_transformers_reference_loads_every_tensor(tiny):
    import torch
    from transformers import Qwen3_5ForConditionalGeneration

    model, info = Qwen3_5ForConditionalGeneration.from_pretrained(tiny, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[10, 20, 30, 40, 50]])).logits[0, -1]
    used = len(json.loads((tiny / "tokenizer.json").read_text())["model"]["vocab"]) + len(
        ADDED_TOKENS
    )
    assert logits[:used].std() > 1.0  # not degenerate
    assert torch.all(logits[used:] == 0)  # padded rows can never win
