"""The bench command line behaves like the others: -h, `Error: ...` lines, and n/a (not 0.00)
in the generation column when -g 1 leaves no rate to measure."""

from __future__ import annotations

from click.testing import CliRunner

from mlx_qwen35.bench import cli as bench


def invoke(*args: str):
    return CliRunner().invoke(bench.main, list(args))


def test_short_help_flag():
    result = invoke("-h")
    assert result.exit_code == 0 and result.output.startswith("Usage: ")
    assert invoke("--help").output == result.output


def test_error_line_is_capitalised_like_the_other_commands():
    result = invoke()  # neither --model nor --config
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "Error: pass exactly one of --model (a checkpoint) or --config (random weights)"
    )


def test_one_generated_token_prints_n_a_in_every_generation_column():
    result = invoke("--config", "tiny", "-p", "5", "-g", "1", "--vs", "mlx-lm", "--repeats", "2")
    assert result.exit_code == 0, result.output
    rows = [
        line.split()
        for line in result.output.splitlines()
        if line.split()[:1] in (["1"], ["2"], ["median"])
    ]
    assert len(rows) == 6
    for row in rows:  # run, model, prompt tok/s, gen tok/s, peak GB
        assert float(row[2]) > 0 and row[3] == "n/a" and float(row[4]) > 0
    assert "generation n/a" in result.output
