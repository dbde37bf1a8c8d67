"""Smoke tests of `python -m mlx_qwen35.bench` on tiny dimensions (no timing assertions)."""

from __future__ import annotations

import os
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_qwen35.bench import cli as bench
from mlx_qwen35.model.config import ModelConfig
from mlx_qwen35.model.gated_delta import dispatch
from mlx_qwen35.model.gated_delta.dispatch import ENV_VAR

# Backend name -> the function in dispatch that runs its recurrence.
RECURRENCES = {
    "ops": "gated_delta_reference",
    "chunked": "chunked_gated_delta",
    "steps": "gated_delta_steps",
    "mlx-core": "_mlx_core",
}


def invoke(*args: str):
    return CliRunner().invoke(bench.main, list(args))


def test_vs_mlx_lm_prints_both_models_and_ratios():
    result = invoke("--config", "tiny", "-p", "12", "-g", "3", "--vs", "mlx-lm", "--repeats", "2")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "config tiny (random weights), 4 layers, float32" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [r[1] for r in rows] == ["mlx-qwen35", "mlx-lm", "mlx-qwen35", "mlx-lm"]
    for r in rows:  # prompt tok/s, generation tok/s, peak GB
        assert all(float(v) > 0 for v in r[2:5])
    assert sum(line.startswith("median") for line in out.splitlines()) == 2
    assert "mlx-qwen35 / mlx-lm: prompt " in out and "generation " in out


def test_each_gdn_backend_gets_its_own_row(monkeypatch):
    """Each row is timed on the backend it names: every recurrence call is counted by the
    backend that ran it and by the backend the environment asked for at that moment."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    ran: Counter[tuple[str | None, str]] = Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            ran[os.environ.get(ENV_VAR), name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name, attr in RECURRENCES.items():
        monkeypatch.setattr(dispatch, attr, counting(name, getattr(dispatch, attr)))
    result = invoke(
        "--config",
        "tiny",
        "-p",
        "20",
        "-g",
        "2",
        "--gdn-backend",
        "ops",
        "--gdn-backend",
        "chunked",
        "--vs",
        "mlx-lm",
    )
    assert result.exit_code == 0, result.output
    assert "mlx-qwen35[ops] / mlx-lm" in result.output
    assert "mlx-qwen35[chunked] / mlx-lm" in result.output
    # Prompt and decode steps alike ran on the named backend only (3 linear layers in tiny).
    assert set(ran) == {("ops", "ops"), ("chunked", "chunked")}, ran
    assert ran["ops", "ops"] >= 3 * 2 and ran["chunked", "chunked"] >= 3 * 2
    assert ENV_VAR not in os.environ  # restored after each run


def test_one_generated_token_has_no_generation_ratio():
    result = invoke("--config", "tiny", "-p", "5", "-g", "1", "--vs", "mlx-lm")
    assert result.exit_code == 0, result.output
    assert "generation n/a" in result.output


def test_bfloat16_runs_both_models():
    result = invoke(
        "--config", "tiny", "-p", "9", "-g", "2", "--dtype", "bfloat16", "--vs", "mlx-lm"
    )
    assert result.exit_code == 0, result.output
    assert "bfloat16" in result.output


def test_a_checkpoint_cut_to_fewer_layers(tmp_path):
    from mlx_qwen35.weights.tiny_random import ensure_tiny_random

    path = ensure_tiny_random(tmp_path)
    result = invoke("--model", str(path), "--layers", "4", "-p", "8", "-g", "2", "--vs", "mlx-lm")
    assert result.exit_code == 0, result.output
    assert "4 layers" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "exactly one of --model"),
        (("--config", "tiny", "--model", "x"), "exactly one of --model"),
        (("--config", "tiny", "--layers", "9"), "--layers must be between 1 and 4"),
        (("--model", "/nonexistent/qwen"), "no such directory"),
        (("--config", "tiny", "--layers", "2", "--vs", "mlx-lm"), "--layers 4 or more"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message):
    result = invoke(*args, "-p", "4", "-g", "1")
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_same_weights_give_the_same_logits_in_both_models():
    config = bench.size_config("tiny")
    model_config = ModelConfig.from_dict(config)
    raw = bench.random_hf_weights(model_config.text, mx.float32, seed=3)
    ours = bench.build_ours(raw, model_config, None)
    theirs = bench.build_mlx_lm(raw, config, None)
    tokens = mx.array([[1, 5, 9, 200, 7, 33, 4, 100]])
    a, b = np.array(ours(tokens)), np.array(theirs(tokens))
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    # The norms reached our model as (1 + w) in fp32, and the conv as [C, K, 1].
    layer = ours.layers[0]
    w = raw["model.language_model.layers.0.input_layernorm.weight"]
    assert mx.allclose(layer.input_layernorm.weight, w + 1.0)
    assert layer.linear_attn.conv1d.weight.shape[1:] == (4, 1)


def test_cut_layers_drops_later_layers_only():
    config = bench.size_config("tiny")
    weights = {
        "model.language_model.layers.0.mlp.up_proj.weight": mx.zeros(1),
        "model.language_model.layers.3.mlp.up_proj.weight": mx.zeros(1),
        "mtp.layers.0.mlp.up_proj.weight": mx.zeros(1),
        "model.language_model.norm.weight": mx.zeros(1),
    }
    cut = bench.cut_layers(config, weights, 2)
    assert cut["text_config"]["num_hidden_layers"] == 2
    assert cut["text_config"]["layer_types"] == ["linear_attention"] * 2
    assert config["text_config"]["num_hidden_layers"] == 4  # the input is not modified
    assert sorted(weights) == [
        "model.language_model.layers.0.mlp.up_proj.weight",
        "model.language_model.norm.weight",
        "mtp.layers.0.mlp.up_proj.weight",
    ]


def test_slow_blas_warning():
    assert bench.slow_blas_warning(platform="darwin", preload="", maps="") is None
    maps = "7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp.so\n"
    lib = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp.so"
    assert bench.slow_blas_warning(platform="linux", preload=lib, maps=maps) is None
    warning = bench.slow_blas_warning(platform="linux", preload="", maps=maps)
    assert warning is not None and "LD_PRELOAD=" in warning and "\n" not in warning
    # preloaded but not mapped (a wrong path): still the slow one
    missing = bench.slow_blas_warning(platform="linux", preload="/nope/libblas.so.3", maps="")
    assert missing is not None


def test_the_real_sizes_have_the_published_dimensions():
    for size, (hidden, layers, tied) in {
        "0.8b": (1024, 24, True),
        "2b": (2048, 24, True),
        "4b": (2560, 32, True),
        "9b": (4096, 32, False),
    }.items():
        text = ModelConfig.from_dict(bench.size_config(size)).text
        assert (text.hidden_size, text.num_hidden_layers, text.tie_word_embeddings) == (
            hidden,
            layers,
            tied,
        )
        assert text.vocab_size == 248320 and text.layer_types[3] == "full_attention"


def test_speculative_bench_on_a_scripted_puppet():
    result = invoke(
        "--config",
        "tiny",
        "-p",
        "8",
        "-g",
        "13",
        "--draft-model",
        "mtp",
        "--scripted",
        "--draft-vocab",
        "200",
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "scripted" in out and "draft MTP head, k = 3, draft vocab 200 ids" in out
    assert "acceptance 1.000" in out and "speculative / plain: generation" in out
    assert out.count("cost model (") == 2  # the draft vocab and the full head
    assert "predicted speedup" in out and "break-even acceptance" in out


def test_speculative_bench_with_a_draft_model_of_another_size():
    result = invoke(
        "--config",
        "tiny",
        "-p",
        "8",
        "-g",
        "9",
        "--draft-model",
        "tiny",
        "--scripted",
        "--num-draft-tokens",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert "acceptance 1.000" in result.output and "k = 2" in result.output


def test_speculative_bench_refuses_what_it_cannot_compare():
    cases = [
        (["--draft-vocab", "10"], "--draft-vocab and --scripted go with --draft-model"),
        (["--draft-model", "mtp", "--vs", "mlx-lm"], "drop --vs"),
        (["--draft-model", "mtp", "--num-draft-tokens", "9"], "num_draft_tokens must be"),
    ]
    for extra, message in cases:
        result = invoke("--config", "tiny", "-p", "4", "-g", "2", *extra)
        assert result.exit_code == 1 and message in result.output, result.output


def test_the_family_sizes_have_their_published_dimensions():
    expected = {
        "27b": (5120, 64, 24, 4, 48, None),
        "35b-a3b": (2048, 40, 16, 2, 32, (256, 8, 512)),
        "122b-a10b": (3072, 48, 32, 2, 64, (256, 8, 1024)),
        "397b-a17b": (4096, 60, 32, 2, 64, (512, 10, 1024)),
    }
    for size, (hidden, layers, heads, kv, hv, moe) in expected.items():
        config = bench.size_config(size)
        text = ModelConfig.from_dict(config).text
        got = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads)
        assert got + (text.num_key_value_heads, text.linear_num_value_heads) == (
            hidden,
            layers,
            heads,
            kv,
            hv,
        )
        assert not text.tie_word_embeddings and text.layer_types[3] == "full_attention"
        if moe is None:
            assert text.moe is None and text.intermediate_size == 17408
        else:
            m = text.moe
            assert (m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size) == moe
            assert config["model_type"] == "qwen3_5_moe"
        cut = ModelConfig.from_dict(bench.cut_layers(config, None, 4)).text
        assert cut.num_hidden_layers == 4 and cut.moe == text.moe


def test_moe_weights_give_the_same_logits_in_both_models():
    config = bench.size_config("tiny-moe")
    model_config = ModelConfig.from_dict(config)
    raw = bench.random_hf_weights(model_config.text, mx.float32, seed=5)
    ours = bench.build_ours(raw, model_config, None)
    theirs = bench.build_mlx_lm(raw, config, None)
    # one copy of the experts, shared by both models
    key = "model.language_model.layers.1.mlp.switch_mlp.up_proj.weight"
    assert ours.layers[1].mlp.switch_mlp.up_proj.weight is raw[key] or mx.array_equal(
        ours.layers[1].mlp.switch_mlp.up_proj.weight, raw[key]
    )
    tokens = mx.array([[1, 5, 9, 200, 7, 33, 4, 100]])
    a, b = np.array(ours(tokens)), np.array(theirs(tokens))
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_moe_vs_mlx_lm_runs():
    result = invoke("--config", "tiny-moe", "-p", "12", "-g", "3", "--vs", "mlx-lm")
    assert result.exit_code == 0, result.output
    assert "config tiny-moe (random weights), 4 layers" in result.output
    assert "mlx-qwen35 / mlx-lm: prompt " in result.output


def test_quantized_random_weights_run_in_both_models():
    config, raw, what = bench.load_source(None, "tiny-moe", None, None, 2, q_bits=4, vs="mlx-lm")
    assert "4bit recipe" in what and config["quantization"]["bits"] == 4
    key = "model.language_model.layers.0.mlp.switch_mlp.up_proj"  # input 64: one group
    assert f"{key}.scales" in raw and raw[f"{key}.weight"].dtype == mx.uint32
    assert "model.language_model.layers.0.mlp.gate.scales" not in raw  # routers stay whole
    model_config = ModelConfig.from_dict(config)
    ours = bench.build_ours(raw, model_config, None)
    theirs = bench.build_mlx_lm(raw, config, None)
    assert ours.layers[0].mlp.switch_mlp.up_proj.bits == 4
    tokens = mx.array([[1, 5, 9, 200, 7, 33, 4, 100]])
    a, b = np.array(ours(tokens)), np.array(theirs(tokens))
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    result = invoke("--model", "tiny-random", "--q-bits", "4")
    assert result.exit_code != 0 and "--q-bits quantizes --config" in result.output


def test_concurrency_levels_against_mlx_lms_batch_generator():
    result = invoke(
        "--config", "tiny", "-p", "10", "-g", "6", "--concurrency", "1,3", "--vs", "mlx-lm"
    )
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    runs = [r for r in rows if r[:1] == ["1"] and len(r) == 5]
    medians = [r for r in rows if r[:1] == ["median"]]
    expected = [("1", "mlx-qwen35"), ("1", "mlx-lm"), ("3", "mlx-qwen35"), ("3", "mlx-lm")]
    assert [(r[1], r[2]) for r in runs] == [(r[1], r[2]) for r in medians] == expected
    for r in runs + medians:  # aggregate, per stream = aggregate / streams
        assert float(r[3]) > 0 and abs(float(r[4]) - float(r[3]) / int(r[1])) < 0.01
    assert [r[5] for r in medians[:2]] == ["1.00x", "1.00x"]
    assert "3 streams: mlx-qwen35 / mlx-lm aggregate generation" in result.output


@pytest.mark.parametrize("value", ["0,2", "two", ""])
def test_bad_concurrency_levels(value):
    result = invoke("--config", "tiny", "-p", "4", "-g", "2", "--concurrency", value)
    assert result.exit_code != 0 and "stream counts like 1,2,4,8" in result.output


def test_window_rate_counts_only_while_every_stream_decodes():
    from mlx_qwen35.bench.concurrency import window_rate

    # Stream a decodes alone from t=0; b joins at t=4; a ends at t=10.
    a = [float(t) for t in range(11)]
    b = [4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]
    # In (4, 10]: 6 tokens of a and 6 of b over 6 seconds.
    assert window_rate([a, b]) == 2.0
    assert window_rate([a]) == 1.0  # one stream: tokens after the first over the time after it
