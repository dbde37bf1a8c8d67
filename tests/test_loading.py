"""Loading: original HF checkpoints (sharded, with MTP beside), our own format, dtype handling,
and one clear error line for every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import hf_logits
from mlx.utils import tree_flatten

from mlx_qwen35.errors import UserError
from mlx_qwen35.model.config import FORMAT_KEY
from mlx_qwen35.weights.loading import load_model, resolve_model_path

IDS = np.random.RandomState(0).randint(0, 300, size=(1, 19))


def logits_of(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_sharded_checkpoint_with_mtp_beside_matches_reference(hf_checkpoint):
    hf, path = hf_checkpoint("base", sharded=True, with_mtp=True)
    assert len(list(path.glob("model-*.safetensors"))) > 2
    assert rel_err(logits_of(load_model(path)), hf_logits(hf, IDS)) < 1e-4


def save_our_format(model, path: Path) -> None:
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))


def test_our_format_round_trip_is_not_shifted_twice(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint("tied")
    model = load_model(path)
    save_our_format(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config[FORMAT_KEY] == 1
    again = load_model(tmp_path / "ours")
    np.testing.assert_array_equal(logits_of(again), logits_of(model))
    assert rel_err(logits_of(again), hf_logits(hf, IDS)) < 1e-4


def test_bfloat16_keeps_a_log_and_norms_in_float32(hf_checkpoint):
    hf, path = hf_checkpoint("base")
    model = load_model(path, dtype="bfloat16")
    params = dict(tree_flatten(model.parameters()))
    layer = "language_model.model.layers.0."
    assert params[layer + "linear_attn.A_log"].dtype == mx.float32
    assert params[layer + "input_layernorm.weight"].dtype == mx.float32
    assert params[layer + "linear_attn.in_proj_qkv.weight"].dtype == mx.bfloat16
    out = model(mx.array(IDS))
    assert out.dtype == mx.bfloat16
    # bf16 stays close to the fp32 reference (loose bound: 8-bit mantissa through 4 layers)
    assert rel_err(np.array(out.astype(mx.float32)), hf_logits(hf, IDS)) < 5e-2


@pytest.fixture
def broken_copy(hf_checkpoint, tmp_path):
    def make(variant: str = "base", sharded: bool = False) -> Path:
        _, path = hf_checkpoint(variant, sharded=sharded)
        dst = tmp_path / "broken"
        shutil.copytree(path, dst)
        return dst

    return make


def one_line_error(path, match: str, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        resolve_model_path(str(tmp_path / "nope"))


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model_path(str(f))


def test_unreachable_hub_names_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="tiny-random") as info:
        resolve_model_path("someone/not-a-cached-model")
    assert "\n" not in str(info.value)


def test_no_config(tmp_path):
    (tmp_path / "m").mkdir()
    one_line_error(tmp_path / "m", "no config.json")


def test_wrong_model_type(broken_copy):
    path = broken_copy()
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    one_line_error(path, "model_type is 'llama'")


def test_config_field_out_of_range(broken_copy):
    path = broken_copy()
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["linear_num_value_heads"] = 3  # not a multiple of 2 key heads
    (path / "config.json").write_text(json.dumps(cfg))
    one_line_error(path, "multiple of linear_num_key_heads")


def test_corrupt_shard(broken_copy):
    path = broken_copy(sharded=True)
    shard = max(path.glob("model-*.safetensors"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    message = one_line_error(path, "corrupt or truncated")
    assert shard.name in message


def test_missing_shard(broken_copy):
    path = broken_copy(sharded=True)
    sorted(path.glob("model-*.safetensors"))[1].unlink()
    one_line_error(path, "missing")


def test_weights_that_do_not_match_the_config(broken_copy):
    path = broken_copy()
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    one_line_error(path, "do not match config.json")


def test_unknown_dtype(hf_checkpoint):
    _, path = hf_checkpoint("base")
    one_line_error(path, "dtype 'float8'", dtype="float8")
