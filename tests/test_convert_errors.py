"""Bad input to the converter: one `Error: ...` line on stderr, a non-zero exit, and nothing at the
output path (no half-written directory, no temporary directory left beside it)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_qwen35.cli.convert import main

CONVERT = importlib.import_module("mlx_qwen35.weights.convert_write")


@pytest.fixture(scope="module")
def sharded_source(hf_checkpoint):
    return hf_checkpoint("base", sharded=True, with_mtp=True)[1]


@pytest.fixture
def source(sharded_source, tmp_path):
    """A private copy that a test may damage."""
    return Path(shutil.copytree(sharded_source, tmp_path / "src"))


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_clean_failure(result, out: Path, *needles: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*.safetensors"))


def test_missing_shard(source, tmp_path):
    shards(source)[3].unlink()
    out = tmp_path / "out"
    assert_clean_failure(run("--hf-path", str(source), "--mlx-path", str(out)), out, "missing")


def test_truncated_shard(source, tmp_path):
    shard = shards(source)[2]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    result = run("--hf-path", str(source), "--mlx-path", str(out), "-q")
    assert_clean_failure(result, out, shard.name, "corrupt or truncated")


def test_garbage_shard(source, tmp_path):
    shards(source)[1].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    out = tmp_path / "out"
    assert_clean_failure(run("--hf-path", str(source), "--mlx-path", str(out)), out, "corrupt")


def test_missing_tensor(source, tmp_path):
    import mlx.core as mx

    shard = next(f for f in shards(source) if len(mx.load(str(f))) > 1)
    tensors = mx.load(str(shard))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    mx.save_safetensors(str(shard), tensors)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    result = run("--hf-path", str(source), "--mlx-path", str(out))
    assert_clean_failure(result, out, "missing", "incomplete")


def test_not_qwen35(source, tmp_path):
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "llama"
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_clean_failure(run("--hf-path", str(source), "--mlx-path", str(out)), out, "'llama'")


def test_missing_source(tmp_path):
    out = tmp_path / "out"
    result = run("--hf-path", str(tmp_path / "nowhere"), "--mlx-path", str(out))
    assert_clean_failure(result, out, "no such directory")


def test_existing_output_needs_force(sharded_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("--hf-path", str(sharded_source), "--mlx-path", str(out))
    assert (
        result.exit_code == 1 and "already exists" in result.stderr and "--force" in result.stderr
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_output_under_a_file(sharded_source, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "out"
    result = run("--hf-path", str(sharded_source), "--mlx-path", str(out))
    assert result.exit_code == 1 and result.stderr.startswith("Error: cannot write to")
    assert blocker.read_text() == "x"


def unprivileged() -> list[str]:
    """A command prefix under which this user cannot write into a directory without write
    permission. Root ignores permissions through CAP_DAC_OVERRIDE (and CI runs as root), so root
    drops that capability with setpriv (util-linux) and stays root for everything else (reading
    the checkout and the virtualenv); other users need nothing."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv (util-linux) is missing to drop CAP_DAC_OVERRIDE")
    drop = "-dac_override,-fowner"
    return [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", "--"]


def test_read_only_directory(sharded_source, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    out = parent / "out"
    try:
        proc = subprocess.run(
            [*unprivileged(), sys.executable, "-m", "mlx_qwen35.convert"]
            + ["--hf-path", str(sharded_source), "--mlx-path", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        parent.chmod(0o700)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("Error: cannot write to") and "\n" not in err, err
    assert list(parent.iterdir()) == []


def test_interrupted_conversion_leaves_nothing(sharded_source, tmp_path, monkeypatch):
    written = []
    real_write = CONVERT._ShardWriter.write

    def write_then_interrupt(self, key, value):
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(key)
        real_write(self, key, value)

    monkeypatch.setattr(CONVERT._ShardWriter, "write", write_then_interrupt)
    out = tmp_path / "out"
    result = run("--hf-path", str(sharded_source), "--mlx-path", str(out), "-q")
    assert len(written) == 5
    assert_clean_failure(result, out, "interrupted", code=130)


def test_interrupted_force_keeps_the_old_output(sharded_source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous conversion")

    def interrupt(self, key, value):
        raise KeyboardInterrupt

    monkeypatch.setattr(CONVERT._ShardWriter, "write", interrupt)
    result = run("--hf-path", str(sharded_source), "--mlx-path", str(out), "--force")
    assert result.exit_code == 130
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "old.txt").read_text() == "previous conversion"


def test_already_quantized_source(sharded_source, tmp_path):
    first = tmp_path / "q4"
    assert run("--hf-path", str(sharded_source), "--mlx-path", str(first), "-q").exit_code == 0
    out = tmp_path / "again"
    result = run("--hf-path", str(first), "--mlx-path", str(out), "-q")
    assert_clean_failure(result, out, "already quantized")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--q-bits", "8"], "only apply with -q or --recipe"),
        (["--recipe", "mixed", "--q-bits", "8"], "the recipe sets the bits"),
        (["--recipe", "nine-bit"], "unknown recipe 'nine-bit'"),
        (["--upload-repo", "not a repo"], "not a Hugging Face repo id"),
    ],
)
def test_bad_options(sharded_source, tmp_path, args, needle):
    out = tmp_path / "out"
    result = run("--hf-path", str(sharded_source), "--mlx-path", str(out), *args)
    assert_clean_failure(result, out, needle)


@pytest.mark.parametrize(
    "recipe, needle",
    [
        ("{not json", "not valid JSON"),
        ('{"default": {"bits": 7, "group_size": 64}}', "MLX cannot quantize"),
        ('{"default": {"bits": 4, "group_size": 64}, "rules": [{"match": "("}]}', "bad regex"),
        (
            '{"default": {"bits": 4, "group_size": 64}, "rules": [{"match": "x", "bitz": 3}]}',
            "unknown keys ['bitz']",
        ),
        ('{"rules": []}', "'default'"),
    ],
)
def test_bad_recipe_file(sharded_source, tmp_path, recipe, needle):
    path = tmp_path / "recipe.json"
    path.write_text(recipe)
    out = tmp_path / "out"
    result = run("--hf-path", str(sharded_source), "--mlx-path", str(out), "--recipe", str(path))
    assert_clean_failure(result, out, needle)


def test_module_entry_point_reports_one_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_qwen35.convert",
            "--hf-path",
            str(tmp_path / "none"),
            "--mlx-path",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("Error: ") and "\n" not in proc.stderr.strip()
    assert not out.exists()
