"""Our converted checkpoints load unchanged in mlx-lm (text) and mlx-vlm (everything) with the same
logits as our runtime, quantized too; our loader reads what mlx-vlm's own converter writes."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_qwen35.weights.convert import convert
from mlx_qwen35.weights.loading import load_model
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

IDS = np.random.RandomState(1).randint(0, 700, size=(1, 29))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """tiny-random (original HF layout, with vision, MTP, tokenizer and processor configs)
    converted unquantized (fp32) and with the mixed recipe."""
    root = tmp_path_factory.mktemp("interop")
    source = ensure_tiny_random(root / "cache")
    # A user recipe that does quantize the vision tower (the built-in ones keep it unquantized).
    everything = root / "everything-4bit.json"
    everything.write_text(json.dumps({"default": {"bits": 4, "group_size": 32}}))
    return {
        "source": source,
        "fp32": convert(source, root / "fp32", progress=False).out,
        "mixed": convert(source, root / "mixed", recipe="mixed", progress=False).out,
        "vision4": convert(source, root / "vision4", recipe=everything, progress=False).out,
    }


def ours(path) -> np.ndarray:
    return np.array(load_model(path)(mx.array(IDS)))


def close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("which", ["fp32", "mixed"])
def test_mlx_lm_loads_the_text_part(outputs, which):
    mlx_lm = pytest.importorskip("mlx_lm")
    model, _ = mlx_lm.load(str(outputs[which]))
    if which == "mixed":
        head = model.language_model.lm_head
        assert isinstance(head, __import__("mlx.nn").nn.QuantizedLinear) and head.bits == 6
    theirs = np.array(model(mx.array(IDS)))
    assert close(theirs, ours(outputs[which])) < 1e-4


@pytest.mark.parametrize("which", ["fp32", "mixed", "vision4"])
def test_mlx_vlm_loads_everything(outputs, which):
    pytest.importorskip("mlx_vlm")
    from mlx_vlm.utils import load

    from mlx_qwen35.model.config import load_config

    model, processor = load(str(outputs[which]))
    assert processor is not None
    theirs = np.array(model.language_model(mx.array(IDS)).logits)
    assert close(theirs, ours(outputs[which])) < 1e-4

    # mlx-vlm took the vision tensors as written (no transform), and with an image in the
    # prompt its logits equal ours.
    on_disk = mx.load(str(next(outputs[which].glob("model*.safetensors"))))
    loaded = dict(tree_flatten(model.vision_tower.parameters()))
    for k, v in loaded.items():
        assert mx.array_equal(v, on_disk[f"vision_tower.{k}"]), k
    assert ("blocks.0.attn.qkv.scales" in loaded) == (which == "vision4")
    config = load_config(outputs[which])
    grid = mx.array([[1, 4, 6]])  # 24 patches -> 6 merged image tokens
    pixels = mx.random.normal((24, 3 * 2 * 16 * 16), key=mx.random.key(2))
    ids = mx.array(
        [
            [
                5,
                6,
                config.vision_start_token_id,
                *[config.image_token_id] * 6,
                config.vision_end_token_id,
                7,
                8,
                9,
            ]
        ]
    )
    theirs = np.array(model(ids, pixel_values=pixels, image_grid_thw=grid).logits)
    mine = np.array(load_model(outputs[which])(ids, pixel_values=pixels, image_grid_thw=grid))
    assert close(theirs, mine) < 1e-4


def test_mlx_vlm_sees_no_mtp_and_strict_loads(outputs):
    """mlx-vlm reads the shards named by the index: the MTP file stays invisible to it."""
    index = json.loads((outputs["mixed"] / "model.safetensors.index.json").read_text())
    assert not any(k.startswith("mtp.") for k in index["weight_map"])
    assert (outputs["mixed"] / "mtp.safetensors").is_file()


def test_our_loader_reads_mlx_vlm_conversions(outputs, tmp_path):
    pytest.importorskip("mlx_vlm")
    from mlx_vlm.convert import convert as vlm_convert

    out = tmp_path / "vlm"
    vlm_convert(str(outputs["source"]), str(out), dtype="float32")
    assert close(ours(out), ours(outputs["fp32"])) < 1e-5
