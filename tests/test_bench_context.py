"""Smoke tests of the long-context mode of `python -m mlx_qwen35.bench` (no timing assertions)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mlx_qwen35.bench import cli as bench
from mlx_qwen35.bench.context import parse_contexts
from mlx_qwen35.errors import UserError


def invoke(*args: str):
    return CliRunner().invoke(bench.main, list(args))


def rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines() if line.split()[:1] in (["40"], ["72"])]


def test_each_context_gets_a_row_per_model_and_ratios():
    result = invoke(
        "--config", "tiny", "--context", "40,72", "-g", "3", "--vs", "mlx-lm", "--kv-bits", "8",
        "--kv-group-size", "32", "--quantized-kv-start", "16", "--prefill-step-size", "32",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.output
    assert "8-bit KV (group 32), quantized from 16 tokens" in out
    table = [r for r in rows(out) if r[2] != "/"]
    assert [(r[0], r[1]) for r in table] == [
        ("40", "mlx-qwen35"), ("40", "mlx-lm"), ("72", "mlx-qwen35"), ("72", "mlx-lm")
    ]  # fmt: skip
    for r in table:  # prompt tok/s, gen tok/s, peak GB, cache GB > 0; over GB is a number
        assert all(float(v) > 0 for v in r[2:6])
        float(r[6])
    # Both models' caches hold the same quantized positions.
    caches = {(r[0], r[1]): float(r[5]) for r in table}
    assert caches[("72", "mlx-qwen35")] == caches[("72", "mlx-lm")]
    assert sum("mlx-qwen35 / mlx-lm: prompt" in line for line in out.splitlines()) == 2


def test_unquantized_context_run_reports_cache_bytes():
    result = invoke("--config", "tiny", "--context", "40", "-g", "2")
    assert result.exit_code == 0, result.output
    assert "unquantized KV" in result.output
    (row,) = rows(result.output)
    # tiny, fp32: one attention layer, keys + values of 1 head x 32 dims for 256 positions (the
    # first capacity step); three DeltaNet layers, state 4 x 16 x 16 and conv 3 x 128 each.
    kv, gdn = 2 * 256 * 32 * 4, 3 * (4 * 16 * 16 + 3 * 128) * 4
    assert float(row[5]) == pytest.approx((kv + gdn) / 1e6, abs=1e-3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--context", "4096,abc"], "--context takes prompt lengths"),
        (["--context", "1"], "--context takes prompt lengths"),
        (["--context", "64", "--kv-bits", "4"], "kv_group_size 64 does not divide"),
        (["--kv-bits", "8", "--kv-group-size", "48"], "kv_group_size must be one of"),
    ],
)
def test_bad_context_input_is_one_line(args, message):
    result = invoke("--config", "tiny", *args)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("Error: ") and message in errors[0]


def test_parse_contexts():
    assert parse_contexts("4096,16384, 65536") == [4096, 16384, 65536]
    with pytest.raises(UserError):
        parse_contexts("")
