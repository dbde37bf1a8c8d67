"""Writers never leave a half-written file: a save or conversion that fails part way leaves the
previous output byte-for-byte as it was and no temporary file beside it.

The failure is a real one, whatever writes the bytes (MLX's C++ writer, Python file objects, a
copy): RLIMIT_FSIZE caps how large this process may grow any file, so the write that crosses the
cap fails with EFBIG, as on a full disk, after the bytes below the cap have landed. Python ignores
SIGXFSZ, so the process gets the error instead of the signal.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlx_qwen35
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

GREEDY = dict(temp=0.0, presence_penalty=0.0)


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """No file this process writes may grow beyond `nbytes` inside the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_limit_really_fails_writes_part_way(tmp_path):
    """The simulated full disk: the first bytes land, the rest raise."""
    with file_size_limit(1000), pytest.raises(OSError, match="too large"):
        (tmp_path / "f").write_bytes(b"x" * 5000)
    assert (tmp_path / "f").stat().st_size == 1000


# ---------------------------------------------------------------------- chat sessions


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mlx_qwen35.load(str(ensure_tiny_random(tmp_path_factory.mktemp("cache"))))


def test_failed_session_save_keeps_the_previous_file(tiny, tmp_path):
    model, processor = tiny
    chat = mlx_qwen35.ChatSession(model, processor, max_tokens=4, **GREEDY)
    chat.ask("Hello there.")
    path = tmp_path / "chat.session"
    chat.save(path)
    before = path.read_bytes()
    chat.ask("And a second, longer question about the weather?")  # the next save is larger

    # The full disk is reported in one line (a UserError naming the path), not a traceback.
    with file_size_limit(len(before) // 2), pytest.raises(mlx_qwen35.UserError, match="too large"):
        chat.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["chat.session"]  # no temp file left
    # The kept file still loads, as the one-turn session it was.
    loaded = mlx_qwen35.ChatSession.load(path, model, processor)
    assert len(loaded.history) == 2 and len(chat.history) == 4

    chat.save(path)  # and once the disk has room again, the save goes through
    assert path.read_bytes() != before
    assert len(mlx_qwen35.ChatSession.load(path, model, processor).history) == 4


def test_failed_first_session_save_leaves_nothing(tiny, tmp_path):
    model, processor = tiny
    chat = mlx_qwen35.ChatSession(model, processor, max_tokens=4, **GREEDY)
    chat.ask("Hello there.")
    with file_size_limit(4096), pytest.raises(mlx_qwen35.UserError, match="too large"):
        chat.save(tmp_path / "new.session")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- the converter


# Below the weight shards of every conversion here (the 4-bit one is ~200 kB), above config.json.
LIMIT = 16 * 1024


@pytest.fixture(scope="module")
def source(hf_checkpoint):
    return hf_checkpoint("base")[1]


def test_failed_conversion_keeps_the_existing_output(source, tmp_path):
    out = tmp_path / "out"
    mlx_qwen35.convert(source, out, progress=False)
    before = snapshot(out)
    with file_size_limit(LIMIT), pytest.raises(mlx_qwen35.UserError, match="failed"):
        mlx_qwen35.convert(source, out, quantize=True, q_group_size=32, force=True, progress=False)
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left


def test_failed_conversion_leaves_nothing_new(source, tmp_path):
    out = tmp_path / "out"
    with file_size_limit(LIMIT), pytest.raises(mlx_qwen35.UserError, match="failed"):
        mlx_qwen35.convert(source, out, progress=False)
    assert list(tmp_path.iterdir()) == []
