"""The converter's output folder and its failure modes: the folder gets the umask's permissions
(not mkdtemp's private 0700), SIGTERM cleans up like Ctrl-C, a location that cannot be written
is reported as such (not as a full disk), and --q-bits says it needs -q."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_qwen35.cli.convert import main
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return ensure_tiny_random(tmp_path_factory.mktemp("cache"))


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_folder_follows_the_umask(source, tmp_path, umask):
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        result = run("--hf-path", str(source), "--mlx-path", str(out))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for name in ("config.json", "model.safetensors.index.json", "README.md"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask


CHILD = """
import os, signal, sys
from mlx_qwen35.weights import convert_write

real = convert_write._ShardWriter.write
count = [0]

def write_then_sigterm(self, key, value):
    real(self, key, value)
    count[0] += 1
    if count[0] == 3:  # a few tensors are on disk in the temporary folder
        os.kill(os.getpid(), signal.SIGTERM)

convert_write._ShardWriter.write = write_then_sigterm
from mlx_qwen35.cli.convert import main
main(sys.argv[1:])
"""


def test_sigterm_cleans_up_like_ctrl_c(source, tmp_path):
    out = tmp_path / "out"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "--hf-path", str(source), "--mlx-path", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=300,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: terminated; nothing was written to {out}"
    )
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_the_cli_leaves_the_sigterm_handler_as_it_found_it(source, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    run("--hf-path", str(source), "--mlx-path", str(tmp_path / "out"), "--dry-run")
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc")
def test_unwritable_location_is_not_reported_as_a_full_disk(source):
    # /proc reports 0 bytes free: the disk check used to say "not enough disk space".
    result = run("--hf-path", str(source), "--mlx-path", "/proc/mlx_qwen35_test/out")
    assert result.exit_code == 1
    err = result.stderr.strip()
    assert err.startswith("Error: cannot write to /proc") and "\n" not in err, err
    assert "disk space" not in err


def test_output_under_a_file_names_the_file(source, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("--hf-path", str(source), "--mlx-path", str(blocker / "sub" / "out"))
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: cannot write to {blocker / 'sub'}: {blocker} is a file; pick another --mlx-path"
    )


def test_q_bits_help_and_error_agree(source, tmp_path):
    help_text = " ".join(run("--help").output.split())
    assert "--q-bits [4|8] With -q: the 4bit or 8bit recipe" in help_text
    assert "--q-group-size [32|64|128] With -q or --recipe" in help_text
    result = run("--hf-path", str(source), "--mlx-path", str(tmp_path / "o"), "--q-bits", "8")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: --q-bits/--q-group-size only apply with -q or --recipe; add -q"
    )
