"""`python -m mlx_qwen35.generate` end to end on tiny-random (subprocesses), and its one-line
errors for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mlx_qwen35.cli.generate import main
from mlx_qwen35.engine.generate import generate
from mlx_qwen35.weights.loading import load
from mlx_qwen35.weights.tiny_random import CACHE_ENV, ensure_tiny_random

PROMPT = "Hello there"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    ensure_tiny_random(root)  # built once here, not raced by the subprocesses
    return root


def run_cli(cache, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{CACHE_ENV: str(cache)}, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "mlx_qwen35.generate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def assert_one_line_error(stderr: str, match: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ") and re.search(match, lines[0]), lines[0]


def test_greedy_output_is_deterministic_and_matches_the_api(cache):
    args = ["--model", "tiny-random", "--max-tokens", "12"]
    first = run_cli(cache, *args, "--prompt", PROMPT)
    assert first.returncode == 0, first.stderr
    piped = run_cli(cache, *args, "--prompt", "-", stdin=PROMPT)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == first.stdout
    model, processor = load(str(ensure_tiny_random(cache)))
    expected = generate(model, processor, PROMPT, max_tokens=12)
    assert first.stdout == expected + "\n" and expected


def test_verbose_prints_speed_and_memory(cache):
    out = run_cli(
        cache, "--model", "tiny-random", "-p", PROMPT, "-m", "5", "--no-think", "--verbose"
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "=========="
    assert re.fullmatch(r"Prompt: \d+ tokens, [\d.]+ tokens-per-sec", lines[-3])
    assert re.fullmatch(r"Generation: [1-5] tokens, [\d.]+ tokens-per-sec", lines[-2])
    assert re.fullmatch(r"Peak memory: [\d.]+ GB", lines[-1])


def test_missing_directory(cache, tmp_path):
    out = run_cli(cache, "--model", str(tmp_path / "nope"), "--prompt", PROMPT)
    assert out.returncode != 0 and not out.stdout
    assert_one_line_error(out.stderr, "no such directory")


def test_wrong_model_type(cache, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = run_cli(cache, "--model", str(tmp_path), "--prompt", PROMPT)
    assert out.returncode != 0
    assert_one_line_error(out.stderr, "model_type is 'llama'")


def test_bad_value_in_a_real_process(cache):
    out = run_cli(cache, "--model", "tiny-random", "--top-p", "0")
    assert out.returncode != 0
    assert_one_line_error(out.stderr, r"top_p must be in \(0, 1\]")


@pytest.mark.parametrize(
    "args, stdin, match",
    [
        (["--temp", "-1"], None, "temp must be a number >= 0"),
        (["--top-p", "1.5"], None, "top_p must be in"),
        (["--top-k", "-3"], None, "top_k must be an integer >= 0"),
        (["--min-p", "1.5"], None, "min_p must be in"),
        (["--max-tokens", "0"], None, "max_tokens must be a positive integer"),
        (["--repetition-penalty", "0"], None, "repetition_penalty must be a number > 0"),
        (["--prefill-step-size", "0"], None, "prefill_step_size must be a positive integer"),
        (["--prompt", ""], None, "the prompt is empty"),
        (["--prompt", "-"], "  \n", "the prompt is empty"),
    ],
)
def test_bad_inputs(cache, monkeypatch, args, stdin, match):
    monkeypatch.setenv(CACHE_ENV, str(cache))
    result = CliRunner().invoke(main, ["--model", "tiny-random", *args], input=stdin)
    assert result.exit_code == 1 and not result.stdout
    assert_one_line_error(result.stderr, match)


# ----------------------------------------------------------------------------- images and videos


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "a.png")
    frames = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(6)]
    frames[0].save(root / "clip.gif", save_all=True, append_images=frames[1:], duration=250)
    (root / "broken.png").write_bytes((root / "a.png").read_bytes()[:60])  # truncated
    (root / "text.png").write_bytes(b"this is not an image")
    return root


@pytest.mark.parametrize("flag, name", [("--image", "a.png"), ("--video", "clip.gif")])
def test_media_end_to_end_matches_the_api(cache, media, flag, name):
    args = ["--model", "tiny-random", "-m", "8", "-p", "Describe it.", flag, str(media / name)]
    out = run_cli(cache, *args, "--max-pixels", "16384", "--fps", "4", "--max-frames", "4")
    assert out.returncode == 0, out.stderr
    model, processor = load(str(ensure_tiny_random(cache)))
    kind = "images" if flag == "--image" else "videos"
    expected = generate(
        model,
        processor,
        "Describe it.",
        max_tokens=8,
        max_pixels=16384,
        fps=4.0,
        max_frames=4,
        **{kind: [media / name]},
    )
    assert out.stdout == expected + "\n" and expected


@pytest.mark.parametrize(
    "args, match",
    [
        (["--image", "text.png"], "text.png: not an image"),
        (["--image", "broken.png"], "broken.png: cannot decode image"),
        (["--image", "missing.png"], "missing.png: no such file"),
        (["--video", "missing.mp4"], "missing.mp4: no such file"),
        (["--fps", "0"], "fps must be a number > 0"),
        (["--max-pixels", "10"], "max_pixels must be an integer >= 1024"),
        (["--max-frames", "1"], "max_frames must be an integer >= 2"),
    ],
)
def test_bad_media(cache, media, monkeypatch, args, match):
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.chdir(media)
    result = CliRunner().invoke(main, ["--model", "tiny-random", "-m", "2", *args])
    assert result.exit_code == 1 and not result.stdout.strip()
    assert_one_line_error(result.stderr, match)


def test_typed_placeholder_is_text(cache, media, monkeypatch):
    """A prompt that types <|image_pad|> shows one image: the typed one is text."""
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.chdir(media)
    args = ["--model", "tiny-random", "-m", "2", "--image", "a.png", "-p", "<|image_pad|> and this"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.stderr
