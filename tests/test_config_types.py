"""config.json fields of the wrong JSON type are one-line errors naming the field, for every
field the loader reads (text, rope, vision, token ids, quantization), not tracebacks."""

from __future__ import annotations

import copy
import json

import pytest
from click.testing import CliRunner

from mlx_qwen35.cli.generate import main
from mlx_qwen35.errors import UserError
from mlx_qwen35.model.config import ModelConfig, load_config
from mlx_qwen35.model.config_fields import typed, typed_list
from mlx_qwen35.weights.loading import quantize_like_checkpoint
from mlx_qwen35.weights.tiny_random import ensure_tiny_random


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_random(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def good(tiny) -> dict:
    return json.loads((tiny / "config.json").read_text())


def _set(config: dict, path: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return config


# (field path in config.json, bad value, what the error says)
BAD = [
    ("text_config.rms_norm_eps", "abc", "rms_norm_eps must be a number, got 'abc'"),
    ("text_config.rms_norm_eps", -1e-6, "rms_norm_eps must be > 0"),
    ("vision_config", "none", "vision_config must be a JSON object, got 'none'"),
    ("text_config", [1, 2], r"text_config must be a JSON object, got \[1, 2\]"),
    ("text_config.head_dim", "x", "head_dim must be an integer, got 'x'"),
    ("text_config.rope_parameters.mrope_section", 5, "mrope_section must be a list, got 5"),
    (
        "text_config.rope_parameters.mrope_section",
        ["a", 1, 2],
        "mrope_section must be a list of 3 integers",
    ),
    ("image_token_id", "x", "image_token_id must be an integer, got 'x'"),
    ("video_token_id", -5, "video_token_id must be >= 0"),
    ("text_config.num_hidden_layers", True, "num_hidden_layers must be an integer, got True"),
    ("text_config.hidden_size", 2.5, "hidden_size must be an integer"),
    ("text_config.layer_types", "linear", "layer_types must be a list"),
    ("text_config.layer_types", [{"a": 1}], "layer_types must be a list of strings"),
    ("text_config.tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
    ("text_config.rope_parameters", "big", "rope_parameters must be a JSON object"),
    ("text_config.rope_parameters.rope_theta", "1e7", "rope_parameters.rope_theta must be a num"),
    ("text_config.rope_parameters.rope_type", 3, "rope_type must be a string"),
    ("text_config.mtp_num_hidden_layers", "1", "mtp_num_hidden_layers must be an integer"),
    ("text_config.eos_token_id", [1, "x"], "eos_token_id must be a list of integers"),
    ("text_config.linear_conv_kernel_dim", "4", "linear_conv_kernel_dim must be an integer"),
    ("vision_config.depth", True, "vision_config.depth must be an integer, got True"),
    ("vision_config.hidden_act", 7, "vision_config.hidden_act must be a string"),
    ("vision_config.rope_theta", [1], "vision_config.rope_theta must be a number"),
    ("vision_config.deepstack_visual_indexes", "x", "deepstack_visual_indexes must be a list"),
    ("vision_config.model_type", None, None),  # null counts as absent: the default applies
]


@pytest.mark.parametrize("path, value, match", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_wrong_types_are_one_line_errors(good, path, value, match):
    config = _set(good, path, value)
    if match is None:
        ModelConfig.from_dict(config)
        return
    with pytest.raises(UserError, match=match) as info:
        ModelConfig.from_dict(config)
    assert str(info.value).startswith("config.json: ") and "\n" not in str(info.value)


def test_the_tiny_config_still_reads_the_same(good):
    config = ModelConfig.from_dict(good)
    assert config.text.to_dict() == ModelConfig.from_dict(config.to_dict()).text.to_dict()
    assert isinstance(config.text.rms_norm_eps, float) and isinstance(config.text.head_dim, int)


def test_quantization_block_types(tiny):
    for block, match in (
        ("4bit", "quantization must be a JSON object"),
        ({"bits": "4", "group_size": 64}, "quantization.bits must be an integer"),
        ({"bits": 4, "group_size": 0}, "quantization.group_size must be > 0"),
    ):
        with pytest.raises(UserError, match=match):
            quantize_like_checkpoint(None, {}, {"quantization": block})


def test_cli_says_it_in_one_line(tiny, good, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny.iterdir():
        (model / f.name).symlink_to(f)
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps(_set(good, "text_config.head_dim", "x")))
    result = CliRunner().invoke(main, ["--model", str(model), "-m", "1"])
    assert result.exit_code == 1 and not result.stdout
    assert result.stderr == "Error: config.json: head_dim must be an integer, got 'x'\n"
    with pytest.raises(UserError):
        load_config(model)


def test_helpers_for_new_fields():
    """The helpers other config sections (MoE) use: kinds, null as absent, bounds, lists."""
    d = {"n": 3, "f": 2, "b": False, "none": None, "l": [1, 2], "inf": float("inf")}
    assert typed(d, "n", int) == 3 and typed(d, "missing", int, 7) == 7
    assert typed(d, "none", int, 5) == 5
    assert typed(d, "f", float) == 2.0 and isinstance(typed(d, "f", float), float)
    assert typed(d, "b", bool) is False
    assert typed(d, "n", (int, str)) == 3
    assert typed_list(d, "l", int, length=2) == [1, 2]
    for name, kind, match in (
        ("b", int, "b must be an integer, got False"),
        ("inf", float, "inf must be a number"),
        ("l", dict, "l must be a JSON object"),
    ):
        with pytest.raises(UserError, match=match):
            typed(d, name, kind, where="")
    with pytest.raises(UserError, match=r"moe\.n must be >= 4"):
        typed(d, "n", int, where="moe.", minimum=4)
