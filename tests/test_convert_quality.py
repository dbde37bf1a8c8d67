"""Each recipe's mean KL against the unquantized model is no worse than `mlx_lm.convert -q` at the
same bits and group size on the same tiny perturbed checkpoint (both scored by our runtime on the
same fixed token sequences). The table of KL, top-1 and size is printed (pytest -s)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hf_reference import build_hf_model, save_hf_checkpoint
from test_convert import add_tokenizer

from mlx_qwen35.weights import quality
from mlx_qwen35.weights.convert import convert

mlx_lm_convert = pytest.importorskip("mlx_lm.convert").convert

GROUP = 32  # every input size of the tiny model is a multiple of 32, so nothing is skipped
OURS = {"4bit": 4, "8bit": 8, "mixed": 4}  # recipe -> the base bits it is compared at


# mlx-lm derives the layer pattern from full_attention_interval, so the checkpoint uses the
# shipped pattern (every 4th layer full attention).
LAYERS = ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"]


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    root = tmp_path_factory.mktemp("kl")
    model = build_hf_model("base", num_hidden_layers=len(LAYERS), layer_types=LAYERS, seed=3)
    source = save_hf_checkpoint(model, root / "source", keep_vision=False)
    add_tokenizer(source)
    results = {}
    for recipe in OURS:
        out = convert(source, root / recipe, recipe=recipe, q_group_size=GROUP, progress=False).out
        results[recipe] = score(source, out)
    for bits in (4, 8):
        out = root / f"mlx_lm-{bits}"
        mlx_lm_convert(
            str(source), str(out), quantize=True, q_bits=bits, q_group_size=GROUP, dtype="float32"
        )
        results[f"mlx_lm -q {bits}"] = score(source, out)
    out = root / "mlx_lm-mixed_4_6"
    mlx_lm_convert(
        str(source),
        str(out),
        quantize=True,
        q_group_size=GROUP,
        dtype="float32",
        quant_predicate="mixed_4_6",
    )
    results["mlx_lm mixed_4_6"] = score(source, out)
    print("\nrecipe              mean KL     top-1   size")
    for name, r in results.items():
        print(
            f"{name:<18} {r['mean_kl']:10.3e}  {100 * r['top1']:6.1f}%  {r['bytes'] / 1e3:6.1f} kB"
        )
    return results


def score(source: Path, out: Path) -> dict:
    result = quality.compare_dirs(source, out)
    result["bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return result


@pytest.mark.parametrize("recipe", list(OURS))
def test_recipe_kl_not_worse_than_mlx_lm(scores, recipe):
    ours, theirs = scores[recipe], scores[f"mlx_lm -q {OURS[recipe]}"]
    assert ours["mean_kl"] <= theirs["mean_kl"] * (1 + 1e-6) + 1e-9
    assert ours["mean_kl"] > 0


def test_more_bits_lose_less(scores):
    assert scores["8bit"]["mean_kl"] < scores["mixed"]["mean_kl"] < scores["4bit"]["mean_kl"]
    assert scores["8bit"]["top1"] >= scores["4bit"]["top1"]
