"""Will it fit? The estimate's parts by their formulas on real sizes, the checkpoint's weights read
from its headers, the one-line refusal that names the options, and the generate CLI's check."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from mlx_qwen35.bench.cli import size_config
from mlx_qwen35.cli.generate import main as generate_main
from mlx_qwen35.errors import UserError
from mlx_qwen35.model.config import ModelConfig
from mlx_qwen35.weights import fit
from mlx_qwen35.weights.loading import read_weights
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

GB = 10**9
MAC = (64 * GB, "test machine")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_random(tmp_path_factory.mktemp("fit"))


def config(size: str) -> ModelConfig:
    return ModelConfig.from_dict(size_config(size))


def test_kv_and_recurrent_follow_their_formulas():
    c = config("35b-a3b")  # 10 full-attention layers, 2 KV heads of 256; 30 DeltaNet layers
    est = fit.estimate(c, 0, 262144, capacity=MAC)
    assert est.kv_cache == 2 * 10 * 2 * 256 * 262144 * 2  # bf16 keys and values: 5.4 GB
    assert est.recurrent == 30 * (32 * 128 * 128 * 4 + 3 * (2 * 16 * 128 + 32 * 128) * 2)
    # a context of 1 still takes one 256-position step of the cache
    assert fit.estimate(c, 0, 1, capacity=MAC).kv_cache == 2 * 10 * 2 * 256 * 256 * 2
    # quantized KV (mlx-lm's layout): bits/8 per element + a scale and a bias per group
    q4 = fit.estimate(c, 0, 262144, kv_bits=4, kv_group_size=64, capacity=MAC)
    assert q4.kv_cache == int(est.kv_cache / 2 * (0.5 + 2 * 2 / 64))
    assert q4.kv_cache < est.kv_cache / 3


def test_machines_divide_all_but_what_each_keeps_whole():
    c = config("397b-a17b")
    one = fit.estimate(c, 220 * GB, 32768, whole_weights=2 * GB, capacity=MAC)
    two = fit.estimate(c, 220 * GB, 32768, whole_weights=2 * GB, machines=2, capacity=MAC)
    assert two.weights == 2 * GB + 109 * GB
    assert two.kv_cache == one.kv_cache // 2 and two.activations == one.activations
    assert "per machine" in two.summary()


def test_weights_come_from_the_headers(tiny):
    total, whole, act = fit.checkpoint_bytes(tiny)
    arrays = read_weights(tiny)
    assert total == sum(v.nbytes for v in arrays.values())
    kept_whole = ("embed_tokens", "visual", "lm_head")
    assert whole == sum(v.nbytes for k, v in arrays.items() if any(p in k for p in kept_whole))
    assert act == arrays["model.language_model.embed_tokens.weight"].dtype.size
    as_fp32, _, act32 = fit.checkpoint_bytes(tiny, "float32")
    assert act32 == 4 and as_fp32 >= total
    text_only, _, _ = fit.checkpoint_bytes(tiny, with_vision=False)
    assert text_only < total


def test_refuses_in_one_line_naming_the_options(tiny):
    total, _, _ = fit.checkpoint_bytes(tiny)
    with pytest.raises(UserError) as e:
        fit.check_fit(tiny, 4096, capacity=(total // 2, "a small machine"))
    message = str(e.value)
    assert "\n" not in message and "will not fit" in message
    for option in ("smaller quantization", "shorter context", "more machines", "--distributed"):
        assert option in message
    est = fit.check_fit(tiny, 4096, capacity=MAC)
    assert est.fits and not est.tight and fit.tight_warning(est) is None
    assert est.weights == total and est.context == 4096


def test_warns_when_little_room_is_left(tiny):
    need = fit.check_fit(tiny, 256, capacity=MAC).total
    est = fit.check_fit(tiny, 256, capacity=(math.ceil(need / 0.95), "snug"))
    assert est.fits and "little room" in fit.tight_warning(est)


def test_real_sizes_against_real_machines():
    """The 35B-A3B at 4 bits fits a 32 GB Mac; the 397B-A17B needs several 192 GB ones."""
    at4 = 4.5 / 8  # bytes per parameter at 4 bits with a group-64 scale and bias
    small = fit.estimate(config("35b-a3b"), int(35e9 * at4), 32768, capacity=(24 * GB, "32 GB"))
    assert small.fits
    big = fit.estimate(config("397b-a17b"), int(397e9 * at4), 32768, capacity=(150 * GB, "192"))
    assert not big.fits
    two = fit.estimate(
        config("397b-a17b"), int(397e9 * at4), 32768, machines=2, capacity=(150 * GB, "192")
    )
    assert two.fits


def test_generate_refuses_before_loading_and_verbose_prints_the_estimate(tiny, monkeypatch):
    runner = CliRunner()
    monkeypatch.setattr(fit, "machine_capacity", lambda: (10_000, "a tiny machine"))
    loaded = []
    monkeypatch.setattr(
        "mlx_qwen35.weights.loading.load", lambda *a, **k: loaded.append(a) or (None, None)
    )
    result = runner.invoke(generate_main, ["--model", str(tiny), "--prompt", "hi"])
    assert result.exit_code == 1 and not loaded
    assert result.output.startswith("Error: ") and "will not fit" in result.output
    assert result.output.count("\n") == 1
    monkeypatch.undo()
    result = runner.invoke(generate_main, ["--model", str(tiny), "--prompt", "hi", "-m", "3"])
    assert result.exit_code == 0 and "Will it fit?" not in result.output
    result = runner.invoke(
        generate_main, ["--model", str(tiny), "--prompt", "hi", "-m", "3", "--verbose"]
    )
    assert result.exit_code == 0, result.output
    assert "Will it fit? memory: weights" in result.output


def test_generate_distributed_alone_says_how_to_launch(tiny):
    result = CliRunner().invoke(
        generate_main, ["--model", str(tiny), "--prompt", "hi", "--distributed", "tensor"]
    )
    assert result.exit_code == 1 and "mlx.launch" in result.output


def test_chat_refuses_before_loading(tiny, monkeypatch):
    from mlx_qwen35.cli.chat import main as chat_main

    loaded = []
    monkeypatch.setattr(fit, "machine_capacity", lambda: (10_000, "a tiny machine"))
    monkeypatch.setattr(
        "mlx_qwen35.weights.loading.load", lambda *a, **k: loaded.append(a) or (None, None)
    )
    result = CliRunner().invoke(chat_main, ["--model", str(tiny)], input="")
    assert result.exit_code == 1 and not loaded
    assert result.output.startswith("Error: ") and "will not fit" in result.output
    assert result.output.count("\n") == 1


def test_server_checks_the_fit_for_every_concurrent_row(tiny, monkeypatch):
    """--max-concurrency rows of FIT_PROMPT_TOKENS + --max-tokens each: a machine with room for
    one such row but not eight refuses the default in one line and serves one at a time."""
    from mlx_qwen35.cli import server

    context = server.FIT_PROMPT_TOKENS + 100
    one = fit.check_fit(tiny, context, capacity=MAC).total
    eight = fit.check_fit(tiny, context, batch=8, capacity=MAC).total
    assert eight > one
    monkeypatch.setattr(fit, "machine_capacity", lambda: ((one + eight) // 2, "a small machine"))

    def load(*args, **kwargs):
        raise UserError("stub: the weights would load now")

    monkeypatch.setattr("mlx_qwen35.weights.loading.load", load)
    args = ["--model", str(tiny), "--max-tokens", "100", "--port", "0"]
    result = CliRunner().invoke(server.main, args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "will not fit" in result.output
    assert result.output.count("\n") == 1
    result = CliRunner().invoke(server.main, [*args, "--max-concurrency", "1"])
    assert "stub: the weights would load now" in result.output, result.output


def test_server_distributed_alone_or_with_a_draft_is_refused(tiny):
    from mlx_qwen35.cli import server

    result = CliRunner().invoke(server.main, ["--model", str(tiny), "--distributed", "tensor"])
    assert result.exit_code == 1 and "mlx.launch" in result.output
    assert "python -m mlx_qwen35.server" in result.output
    args = ["--model", str(tiny), "--distributed", "pipeline", "--draft-model", "mtp"]
    result = CliRunner().invoke(server.main, args)
    assert result.exit_code == 1 and "--draft-model does not run with --distributed" in (
        result.output
    )


def test_generate_distributed_with_a_draft_is_refused_before_loading(tiny):
    from mlx_qwen35.cli import generate

    args = ["--model", str(tiny), "--prompt", "hi", "--distributed", "tensor"]
    result = CliRunner().invoke(generate.main, [*args, "--draft-model", "mtp"])
    assert result.exit_code == 1
    assert (
        result.output.strip()
        == "Error: --draft-model does not run with --distributed; drop one of them"
    )
