"""The converter on MoE checkpoints: experts stacked into mlx-lm's `switch_mlp` layout (from the
fused and the per-expert layouts, across shards, MTP included), the recipes' MoE rules, outputs
that mlx-lm (text) and mlx-vlm (whole) load with our logits, KL no worse than `mlx_lm.convert -q`
at the same bits, peak memory bounded by a shard rather than the model, and a 27B-proportioned
dense round trip."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import build_hf_moe_model, fuse_experts, hf_logits, save_hf_checkpoint
from test_convert import add_tokenizer, bits_of, read_mx
from test_moe_loading import IDS, LAYERS, dense_27b  # noqa: F401 (fixture)

from mlx_qwen35.weights import quality
from mlx_qwen35.weights.convert import convert
from mlx_qwen35.weights.convert_plan import MTP_FILE
from mlx_qwen35.weights.loading import load_model

TOL = 1e-4
GROUP = 32
P = "language_model.model.layers"


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _fake_moe_mtp(path: Path, hf) -> dict[str, np.ndarray]:
    """An MTP head whose one layer is an MoE layer, per expert as Qwen ships it."""
    from safetensors.numpy import save_file

    tc = hf.config.text_config
    h, e, i = tc.hidden_size, tc.num_experts, tc.moe_intermediate_size
    rng = np.random.default_rng(3)
    t = {"mtp.layers.0.mlp.gate.weight": rng.standard_normal((e, h)).astype(np.float32)}
    for x in range(e):
        for name, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            t[f"mtp.layers.0.mlp.experts.{x}.{name}.weight"] = rng.standard_normal(shape).astype(
                np.float32
            )
    t["mtp.fc.weight"] = rng.standard_normal((h, 2 * h)).astype(np.float32)
    save_file(t, path / "model-mtp.safetensors", metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].update({k: "model-mtp.safetensors" for k in t})
        index.write_text(json.dumps(data, indent=2))
    return t


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same tiny MoE model (with vision) saved per expert in 100 kB shards (experts of one
    layer spread over several shards, plus an MoE MTP layer), and fused in one file."""
    root = tmp_path_factory.mktemp("moe_convert")
    hf = build_hf_moe_model(
        "moe", vision=True, num_hidden_layers=len(LAYERS), layer_types=LAYERS, seed=7
    )
    per_expert = save_hf_checkpoint(hf, root / "per_expert", max_shard_size="100KB")
    mtp = _fake_moe_mtp(per_expert, hf)
    fused = save_hf_checkpoint(hf, root / "fused")
    fuse_experts(fused)
    for path in (per_expert, fused):
        add_tokenizer(path)
    return hf, per_expert, fused, mtp


def test_unquantized_conversion_matches_reference_from_both_layouts(sources, tmp_path):
    hf, per_expert, fused, mtp = sources
    ref = hf_logits(hf, IDS)
    for name, src in (("a", per_expert), ("b", fused)):
        out = convert(src, tmp_path / name, progress=False).out
        weights = read_mx(out)
        assert not any(".experts." in k for k in weights)
        gate = weights[f"{P}.1.mlp.switch_mlp.gate_proj.weight"]
        assert gate.shape == (8, 32, 64)
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "qwen3_5_moe"
        assert rel_err(np.array(load_model(out)(mx.array(IDS))), ref) < TOL
    # the MoE MTP layer's experts are stacked too, values in expert order
    head = mx.load(str(tmp_path / "a" / MTP_FILE))
    stacked = np.array(head["mtp.layers.0.mlp.switch_mlp.down_proj.weight"])
    np.testing.assert_array_equal(stacked[5], mtp["mtp.layers.0.mlp.experts.5.down_proj.weight"])


@pytest.mark.parametrize("recipe", ["4bit", "8bit", "mixed"])
def test_recipes_protect_router_and_load_everywhere(sources, tmp_path, recipe):
    _, per_expert, _, _ = sources
    out = convert(per_expert, tmp_path / recipe, recipe=recipe, q_group_size=GROUP).out
    weights = read_mx(out)
    base = {"4bit": 4, "8bit": 8, "mixed": 4}[recipe]
    for i in (0, 3):
        assert bits_of(weights, f"{P}.{i}.mlp.gate") is None  # the router stays as stored
        assert bits_of(weights, f"{P}.{i}.mlp.shared_expert_gate") is None
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert bits_of(weights, f"{P}.{i}.mlp.switch_mlp.{proj}") == base
            shared = bits_of(weights, f"{P}.{i}.mlp.shared_expert.{proj}")
            assert shared == (6 if recipe == "mixed" else base)
    ours = np.array(load_model(out)(mx.array(IDS)))

    mlx_lm = pytest.importorskip("mlx_lm")
    theirs, _ = mlx_lm.load(str(out))
    assert rel_err(np.array(theirs(mx.array(IDS))), ours) < TOL

    pytest.importorskip("mlx_vlm")
    from mlx_vlm.utils import load as vlm_load

    vlm, _ = vlm_load(str(out))
    assert rel_err(np.array(vlm.language_model(mx.array(IDS)).logits), ours) < TOL


def test_report_covers_expert_stacks(sources, tmp_path):
    _, per_expert, _, _ = sources
    result = convert(
        per_expert, tmp_path / "q", recipe="4bit", q_group_size=GROUP, report=True, progress=False
    )
    kinds = {g["kind"]: g for g in result.report["tensors"]["by_kind"]}
    experts = kinds["mlp.switch_mlp.down_proj"]
    assert experts["bits"] == [4] and experts["count"] == len(LAYERS)
    assert 0.01 < experts["mean_rel_error"] < 0.5
    assert kinds["linear_attn.in_proj_a"]["max_rel_error"] < experts["mean_rel_error"] / 4
    assert "mlp.gate" not in kinds  # unquantized


# The KL of this tiny random model moves by about a percent under any change of rounding (and by
# 50% at 8 bits when one router's groups go from 64 to 32 columns): our recipes' extra precision
# (DeltaNet gates at 8 bits, routers unquantized) may land either side of mlx-lm's within that.
KL_NOISE = 0.01


def test_kl_not_worse_than_mlx_lm(sources, tmp_path):
    mlx_lm_convert = pytest.importorskip("mlx_lm.convert").convert
    _, _, fused, _ = sources
    scores = {}
    for bits in (4, 8):
        out = tmp_path / f"mlx_lm-{bits}"
        mlx_lm_convert(
            str(fused), str(out), quantize=True, q_bits=bits, q_group_size=GROUP, dtype="float32"
        )
        scores[f"mlx_lm -q {bits}"] = quality.compare_dirs(fused, out)["mean_kl"]
    # mlx-lm's own choices (routers at 8 bits in groups of 64, all else at 4) through our
    # converter give exactly its KL: the expert stacks are packed bit for bit the same way.
    same = tmp_path / "same.json"
    router = {"match": r"\.mlp\.(gate|shared_expert_gate)$", "bits": 8, "group_size": 64}
    same.write_text(json.dumps({"default": {"bits": 4, "group_size": GROUP}, "rules": [router]}))
    out = convert(fused, tmp_path / "same", recipe=same, vision=False, progress=False).out
    assert quality.compare_dirs(fused, out)["mean_kl"] == pytest.approx(
        scores["mlx_lm -q 4"], rel=1e-9
    )
    for recipe, bits in (("4bit", 4), ("8bit", 8), ("mixed", 4)):
        out = convert(fused, tmp_path / recipe, recipe=recipe, q_group_size=GROUP, vision=False)
        scores[recipe] = quality.compare_dirs(fused, out.out)["mean_kl"]
        assert scores[recipe] <= scores[f"mlx_lm -q {bits}"] * (1 + KL_NOISE), scores
    assert scores["mixed"] < 0.9 * scores["mlx_lm -q 4"]  # mixed's extra bits do pay
    print(scores)


def test_27b_proportioned_dense_round_trip(dense_27b, tmp_path):  # noqa: F811
    hf, path = dense_27b
    out = convert(path, tmp_path / "out", progress=False).out
    assert rel_err(np.array(load_model(out)(mx.array(IDS))), hf_logits(hf, IDS)) < TOL


# ----------------------------------------------------------------------------- peak memory

_SYNTHETIC = dict(
    hidden_size=1024,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    vocab_size=4096,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=512,
    shared_expert_intermediate_size=512,
    layer_types=["linear_attention", "full_attention"],
)

# The high-water mark of this process's own memory: VmHWM starts afresh at exec (getrusage's
# ru_maxrss would carry over the forking pytest process's, which is larger than the conversion).
_MEASURE = textwrap.dedent(
    """
    import re, sys
    import mlx.core as mx
    import mlx_lm.models.switch_layers  # imported by the converter's completeness check
    from mlx_qwen35.weights.convert import convert

    def hwm():
        status = open("/proc/self/status").read()
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024

    mx.eval(mx.zeros(1))
    base = hwm()
    convert(sys.argv[1], sys.argv[2], quantize=True, progress=False)
    print(base, hwm())
    """
)


def write_synthetic_moe(path: Path, fused: bool, shard_bytes: int) -> int:
    """A bf16 MoE checkpoint (random weights, HF names) in shards of ~`shard_bytes`; returns the
    largest shard's size."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    path.mkdir(parents=True)
    config = Qwen3_5MoeConfig(text_config=_SYNTHETIC, vision_config=None)
    with __import__("torch").device("meta"):
        names = {
            n: tuple(p.shape)
            for n, p in Qwen3_5MoeForConditionalGeneration(config).named_parameters()
            if not n.startswith("model.visual.")
        }
    shards: list[dict[str, mx.array]] = [{}]
    size, key = 0, mx.random.key(0)
    for name, shape in names.items():
        parts = {name: shape}
        m = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        if m and not fused:
            proj = ("gate_proj", "up_proj") if "gate_up" in name else ("down_proj",)
            rows = shape[1] // len(proj)
            base = name.rsplit(".", 1)[0]
            parts = {
                f"{base}.{e}.{p}.weight": (rows, shape[2]) for e in range(shape[0]) for p in proj
            }
        for part, part_shape in parts.items():
            key, sub = mx.random.split(key)
            value = (mx.random.normal(part_shape, key=sub) * 0.02).astype(mx.bfloat16)
            if size and size + value.nbytes > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][part] = value
            size += value.nbytes
    weight_map = {}
    for n, tensors in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.eval(tensors)
        mx.save_safetensors(str(path / name), tensors, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    raw = config.to_dict()
    raw.pop("vision_config")
    raw["text_config"]["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(raw))
    return max(p.stat().st_size for p in path.glob("*.safetensors"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
def test_peak_memory_stays_below_one_and_a_half_shards(tmp_path, fused):
    src = tmp_path / "src"
    largest = write_synthetic_moe(src, fused, shard_bytes=60 * 2**20)
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert total > 3 * largest  # several shards: a converter holding the model fails this
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE)
    done = subprocess.run(
        [sys.executable, str(script), str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    )
    base, peak = map(int, done.stdout.split()[-2:])
    assert peak - base < 1.5 * largest, (peak - base, largest)
    assert load_model(tmp_path / "out").args.moe.num_experts == 32
