"""The converter: unquantized output equals the HF reference, the on-disk layout is ours (format
marker, folded norms, MLX conv layout, MTP aside), shards stream with an index, and every recipe
leaves the protected tensors alone."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import hf_logits
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch

from mlx_qwen35.weights import quality
from mlx_qwen35.weights.convert import convert
from mlx_qwen35.weights.convert_plan import INDEX_FILE, MTP_FILE
from mlx_qwen35.weights.loading import load_model
from mlx_qwen35.weights.recipes import builtin_names, load_recipe

RECIPES = ["4bit", "8bit", "mixed"]


def add_tokenizer(path: Path) -> None:
    """Tokenizer files for a test checkpoint (mlx-lm's load and convert need them)."""
    from mlx_qwen35.weights.tiny_random import build_tokenizer

    (path / "tokenizer.json").write_text(build_tokenizer().to_str())
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "bos_token": None}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def read_all(folder: Path, pattern: str = "model*.safetensors") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob(pattern)):
        out.update(load_file(f))
    return out


def read_mx(folder: Path, pattern: str = "model*.safetensors") -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for f in sorted(folder.glob(pattern)):
        out.update(mx.load(str(f)))
    return out


def bits_of(weights: dict, path: str, group_size: int = 32) -> int | None:
    """Bits of a packed layer from its shapes (None when it is stored unquantized)."""
    if f"{path}.scales" not in weights:
        return None
    in_dim = weights[f"{path}.scales"].shape[-1] * group_size
    return weights[f"{path}.weight"].shape[-1] * 32 // in_dim


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def sharded_mtp_source(hf_checkpoint):
    """The base checkpoint in 100 kB shards, with MTP tensors in a shard of their own."""
    return hf_checkpoint("base", sharded=True, with_mtp=True)


IDS = np.random.RandomState(0).randint(0, 300, size=(2, 37))


@pytest.mark.parametrize("variant", ["base", "tied"])
def test_unquantized_conversion_matches_hf_reference(hf_checkpoint, tmp_path, variant):
    hf, src = hf_checkpoint(variant)
    out = convert(src, tmp_path / "out", progress=False).out
    logits = np.array(load_model(out)(mx.array(IDS)))
    assert rel_err(logits, hf_logits(hf, IDS)) < 1e-4


def test_vision_conversion_matches_hf_reference(hf_checkpoint, tmp_path):
    from hf_reference import TOKEN_IDS

    hf, src = hf_checkpoint("base", vision=True)
    out = convert(src, tmp_path / "out", progress=False).out
    grid = np.array([[1, 4, 6]])  # 24 patches of 3 x 2 x 16 x 16 -> 6 image tokens
    pixels = np.random.RandomState(3).standard_normal((24, 1536)).astype(np.float32)
    image = [
        TOKEN_IDS["vision_start_token_id"],
        *[TOKEN_IDS["image_token_id"]] * 6,
        TOKEN_IDS["vision_end_token_id"],
    ]
    ids = np.array([[3, 17, *image, 40, 41, 42]])
    logits = load_model(out)(
        mx.array(ids), pixel_values=mx.array(pixels), image_grid_thw=mx.array(grid)
    )
    types = (ids == TOKEN_IDS["image_token_id"]).astype(ids.dtype)  # 1 marks image tokens
    ref = hf_logits(hf, ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=types)
    assert rel_err(np.array(logits), ref) < 1e-4


def test_flat_text_only_checkpoint(hf_checkpoint, tmp_path):
    """`Qwen3_5ForCausalLM` checkpoints: flat config, `model.layers.*` names."""
    from safetensors.numpy import save_file

    hf, src = hf_checkpoint("base")
    flat = tmp_path / "flat"
    flat.mkdir()
    tensors = read_all(src, "*.safetensors")
    save_file(
        {k.replace("model.language_model.", "model.", 1): v for k, v in tensors.items()},
        flat / "model.safetensors",
    )
    config = json.loads((src / "config.json").read_text())
    text = dict(config["text_config"], model_type="qwen3_5_text")
    (flat / "config.json").write_text(json.dumps(text))
    out = convert(flat, tmp_path / "out", dtype="float32", progress=False).out
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "qwen3_5" and written["text_config"]["hidden_size"] == 64
    logits = np.array(load_model(out)(mx.array(IDS)))
    assert rel_err(logits, hf_logits(hf, IDS)) < 1e-4


def test_output_layout_is_ours(sharded_mtp_source, tmp_path):
    hf, src = sharded_mtp_source
    out = convert(
        src, tmp_path / "out", dtype="bfloat16", max_shard_size=60_000, progress=False
    ).out
    config = json.loads((out / "config.json").read_text())
    assert config["mlx_qwen35_format"] == 1 and config["dtype"] == "bfloat16"
    assert "quantization" not in config and "vision_config" not in config

    raw = read_all(src, "*.safetensors")
    ours = read_mx(out)
    lm = "language_model.model"
    # (1 + w) folded in fp32, stored in the output dtype; the gated norm keeps plain w in fp32.
    norm = ours[f"{lm}.layers.0.input_layernorm.weight"]
    assert norm.dtype == mx.bfloat16
    want = raw["model.language_model.layers.0.input_layernorm.weight"] + 1.0
    np.testing.assert_allclose(np.array(norm.astype(mx.float32)), want, rtol=2**-8)
    gated = ours[f"{lm}.layers.0.linear_attn.norm.weight"]
    assert gated.dtype == mx.float32
    np.testing.assert_array_equal(
        np.array(gated), raw["model.language_model.layers.0.linear_attn.norm.weight"]
    )
    assert ours[f"{lm}.layers.0.linear_attn.A_log"].dtype == mx.float32
    conv_raw = raw["model.language_model.layers.0.linear_attn.conv1d.weight"]  # [C, 1, K]
    conv = np.array(ours[f"{lm}.layers.0.linear_attn.conv1d.weight"].astype(mx.float32))
    assert conv.shape == (conv_raw.shape[0], conv_raw.shape[2], 1)
    np.testing.assert_allclose(conv[:, :, 0], conv_raw[:, 0, :], rtol=2**-8)
    assert not any(k.startswith("mtp.") for k in ours)

    # MTP: its own file, norms folded, outside the index (so mlx-lm / mlx-vlm never read it).
    mtp = mx.load(str(out / MTP_FILE))
    assert set(mtp) == {k for k in raw if k.startswith("mtp.")}
    np.testing.assert_allclose(
        np.array(mtp["mtp.norm.weight"].astype(mx.float32)),
        raw["mtp.norm.weight"] + 1.0,
        rtol=2**-8,
    )
    index = json.loads((out / INDEX_FILE).read_text())
    assert MTP_FILE not in index["weight_map"].values()
    assert set(index["weight_map"]) == set(ours)

    # Streaming: several shards, each within the limit, each listed with its own tensors.
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    for f in shards:
        assert f.stat().st_size <= 60_000 + 4096  # a tensor group may not be split
        # The safetensors library (not MLX) accepts the streamed files and reads the same bytes.
        torch_tensors = load_torch(f)
        assert all(index["weight_map"][k] == f.name for k in torch_tensors)
        for k, v in torch_tensors.items():
            np.testing.assert_array_equal(v.float().numpy(), np.array(ours[k].astype(mx.float32)))
    logits = np.array(load_model(out, dtype="float32")(mx.array(IDS)))
    assert rel_err(logits, hf_logits(hf, IDS)) < 3e-2  # bf16 weights


def test_side_files_and_model_card(tmp_path):
    from mlx_qwen35.weights.tiny_random import ensure_tiny_random

    src = ensure_tiny_random(tmp_path / "cache")
    (src / "LICENSE").write_text("Apache License 2.0\n")
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    out = convert(src, tmp_path / "out", recipe="mixed", progress=False).out
    names = {p.name for p in out.iterdir()}
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "LICENSE",
        MTP_FILE,
        INDEX_FILE,
    ):
        assert name in names
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "mixed" in card and "mlx_lm" in card
    assert "mlx_vlm.generate" in card and "Size on disk" in card
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["depth"] == 2
    weights = read_mx(out)
    # Vision tower kept unquantized, patch embedding in MLX Conv3d layout [D, T, P, P, C].
    assert weights["vision_tower.patch_embed.proj.weight"].shape == (32, 2, 16, 16, 3)
    assert not any(k.startswith("vision_tower.") and k.endswith(".scales") for k in weights)


def test_no_vision_no_mtp(tmp_path):
    from mlx_qwen35.weights.tiny_random import ensure_tiny_random

    src = ensure_tiny_random(tmp_path / "cache")
    out = convert(src, tmp_path / "out", vision=False, mtp=False, progress=False).out
    names = {p.name for p in out.iterdir()}
    assert MTP_FILE not in names and "preprocessor_config.json" not in names
    assert "vision_config" not in json.loads((out / "config.json").read_text())
    assert not any(k.startswith("vision_tower.") for k in read_mx(out))
    assert "text-generation" in (out / "README.md").read_text()
    load_model(out)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_keep_protected_tensors_unquantized(sharded_mtp_source, tmp_path, recipe):
    _, src = sharded_mtp_source
    out = convert(src, tmp_path / "out", recipe=recipe, q_group_size=32, progress=False).out
    weights = read_mx(out)
    weights.update(mx.load(str(out / MTP_FILE)))
    protected = [
        k
        for k in weights
        if k.endswith(("norm.weight", "conv1d.weight", ".A_log", ".dt_bias", "layernorm.weight"))
    ]
    assert len(protected) > 20
    for k in protected:
        path = k.removesuffix(".weight")
        assert f"{path}.scales" not in weights, k
        assert mx.issubdtype(weights[k].dtype, mx.floating), k
    assert all(weights[k].dtype == mx.float32 for k in weights if k.endswith(".A_log"))
    for i in (0, 2, 3):
        for ab in ("a", "b"):
            assert (
                bits_of(weights, f"language_model.model.layers.{i}.linear_attn.in_proj_{ab}") == 8
            )
    down = bits_of(weights, "language_model.model.layers.0.mlp.down_proj")
    assert down == {"4bit": 4, "8bit": 8, "mixed": 6}[recipe]
    gate = bits_of(weights, "language_model.model.layers.0.mlp.gate_proj")
    assert gate == {"4bit": 4, "8bit": 8, "mixed": 4}[recipe]
    config = json.loads((out / "config.json").read_text())
    block = config["quantization"]
    assert block["group_size"] == 32 and config["quantization_config"] == block
    assert block.get("language_model.model.layers.0.linear_attn.in_proj_a", block)["bits"] == 8
    # Our loader rebuilds the same layers.
    load_model(out)


def test_every_builtin_recipe_protects_gates_and_vision():
    assert set(RECIPES) <= set(builtin_names())
    for name in builtin_names():
        recipe = load_recipe(name)
        for layer in (0, 5):
            for ab in ("a", "b"):
                spec = recipe.spec_for(
                    f"language_model.model.layers.{layer}.linear_attn.in_proj_{ab}"
                )
                assert spec is not None and spec.bits >= 8
        assert recipe.spec_for("vision_tower.blocks.0.attn.qkv") is None
        assert recipe.spec_for("vision_tower.merger.linear_fc1") is None


def test_tied_embedding_is_quantized_as_the_head(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint("tied")
    out = convert(src, tmp_path / "out", recipe="mixed", q_group_size=32, progress=False).out
    weights = read_mx(out)
    assert "language_model.lm_head.weight" not in weights
    assert bits_of(weights, "language_model.model.embed_tokens") == 6


def test_report_measures_quality(sharded_mtp_source, tmp_path, capsys):
    _, src = sharded_mtp_source
    result = convert(
        src, tmp_path / "q", recipe="4bit", q_group_size=32, report=True, progress=False
    )
    saved = json.loads((result.out / "quality_report.json").read_text())
    # The figures, recomputed here in float64 from both models' logits on the report's inputs.
    ref_model, q_model = load_model(src), load_model(result.out)
    seqs = quality.token_sequences(result.out, ref_model.args.vocab_size)
    kl, agree, n = 0.0, 0, 0
    for seq in seqs:
        ref = log_softmax(np.array(ref_model(mx.array([seq]))[0], dtype=np.float64))
        cand = log_softmax(np.array(q_model(mx.array([seq]))[0], dtype=np.float64))
        kl += float((np.exp(ref) * (ref - cand)).sum())
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        n += len(seq)
    assert saved["positions"] == n > 100
    assert saved["mean_kl"] == pytest.approx(kl / n, rel=1e-3)
    assert saved["top1"] == agree / n
    # 4-bit weights move the distributions measurably, and some argmaxes, but not most.
    assert 1e-5 < saved["mean_kl"] < 0.1 and 0.3 < saved["top1"] < 1
    kinds = {g["kind"]: g for g in saved["tensors"]["by_kind"]}
    assert kinds["linear_attn.in_proj_a"]["bits"] == [8]
    # 8-bit groups lose far less than 4-bit ones.
    assert (
        kinds["linear_attn.in_proj_a"]["max_rel_error"] < kinds["mlp.up_proj"]["mean_rel_error"] / 4
    )
    assert "mean KL" in capsys.readouterr().out
    plain = convert(src, tmp_path / "plain", report=True, progress=False).report
    assert plain["mean_kl"] < 1e-9 and plain["top1"] == 1.0 and plain["tensors"]["count"] == 0


def test_force_replaces_existing_output(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint("base")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert(src, out, force=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories left


def test_family_script_plans_every_size_and_bits(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_family", Path(__file__).parent.parent / "convert" / "convert_family.py"
    )
    family = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(family)
    calls = []
    monkeypatch.setattr(family, "convert", lambda *a, **k: calls.append((a, k)))
    family.main(["--out-dir", "/tmp/family-out", "--upload-namespace", "someone", "--dry-run"])
    sources = {a[0] for a, _ in calls}
    assert sources == {f"Qwen/Qwen3.5-{s}" for s in ("0.8B", "2B", "4B", "9B")}
    repos = {k["upload_repo"] for _, k in calls}
    assert "someone/Qwen3.5-9B-4bit" in repos and "someone/Qwen3.5-0.8B-8bit" in repos
    assert all(k["dry_run"] for _, k in calls) and len(calls) == 8
