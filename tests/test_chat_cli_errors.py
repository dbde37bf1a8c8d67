"""`python -m mlx_qwen35.chat`: a file system error of /save or /load, or an attachment that is
not what it claims, prints one line and the chat goes on with its conversation intact."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_qwen35.cli.chat import main
from mlx_qwen35.engine.session import ChatSession
from mlx_qwen35.weights.loading import load
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

FLAGS = ["--temp", "0", "--presence-penalty", "0", "-m", "3", "--thinking-budget", "1"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(ensure_tiny_random(tmp_path_factory.mktemp("cache")))


def chat(tiny_path, lines: list[str], *args: str):
    stdin = "\n".join(lines) + "\n"
    return CliRunner().invoke(main, ["--model", tiny_path, *FLAGS, *args], input=stdin)


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error: ")]


def user_messages(tiny_path, saved) -> list:
    model, processor = load(tiny_path)
    history = ChatSession.load(saved, model, processor).history
    return [m["content"] for m in history if m["role"] == "user"]


def test_save_and_load_errors_keep_the_conversation(tiny_path, tmp_path):
    somefile = tmp_path / "somefile.txt"
    somefile.write_text("not a directory")
    folder = tmp_path / "folder"
    folder.mkdir()
    saved = tmp_path / "good.session"
    lines = [
        "First message",
        f"/save {somefile}/x",  # under a file
        f"/save {folder}",  # onto a directory
        f"/load {folder}",
        f"/load {somefile}/x",
        "Second message",
        f"/save {saved}",
    ]
    result = chat(tiny_path, lines)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    found = errors(result)
    assert len(found) == 4, result.stderr
    for line, path in zip(found, [f"{somefile}/x", folder, folder, f"{somefile}/x"], strict=True):
        assert str(path) in line
    assert result.stdout.count("</think>") == 2  # both messages were answered
    assert user_messages(tiny_path, saved) == ["First message", "Second message"]
    assert sorted(p.name for p in folder.iterdir()) == []  # nothing left behind
    assert somefile.read_text() == "not a directory"


def _drop_file_permission_override() -> None:
    """In the child, before exec: lose root's power to write where permissions forbid it
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH leave the bounding set, so the new program runs
    without them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _unprivileged(probe_dir: Path) -> dict:
    """subprocess.run arguments that make permissions apply, or skip when that is impossible."""
    kwargs: dict = {}
    if os.geteuid() == 0:
        if not sys.platform.startswith("linux"):
            pytest.skip("running as root without a way to drop file permission overrides")
        kwargs["preexec_fn"] = _drop_file_permission_override
    probe = subprocess.run(
        [sys.executable, "-c", f"open({str(probe_dir / 'probe')!r}, 'w')"],
        capture_output=True,
        **kwargs,
    )
    if probe.returncode == 0:
        pytest.skip("permissions do not stop writes here")
    return kwargs


def test_save_into_an_unwritable_directory(tiny_path, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        kwargs = _unprivileged(locked)
        saved = tmp_path / "after.session"
        stdin = f"Hello\n/save {locked}/talk.session\nAgain\n/save {saved}\n"
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        out = subprocess.run(
            [sys.executable, "-m", "mlx_qwen35.chat", "--model", tiny_path, *FLAGS],
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": path},
            timeout=300,
            **kwargs,
        )
    finally:
        locked.chmod(0o755)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and f"{locked}/talk.session" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert list(locked.iterdir()) == []
    assert user_messages(tiny_path, saved) == ["Hello", "Again"]


def test_bad_attachments_are_dropped_with_their_error(tiny_path, tmp_path):
    notimg = tmp_path / "notimg.txt"
    notimg.write_text("hello, I am text")
    fake_png = tmp_path / "fake.png"
    fake_png.write_bytes(b"\x89PNG but not really")
    notvideo = tmp_path / "notvideo.txt"
    notvideo.write_text("not a video either")
    image = tmp_path / "dots.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    saved = tmp_path / "after.session"
    lines = [
        f"/image {notimg}",
        f"/image {fake_png}",
        "Plain message",
        f"/video {notvideo}",
        "This one fails",
        "And this one works",
        f"/image {image}",
        "With an image",
        f"/save {saved}",
    ]
    result = chat(tiny_path, lines, "--max-pixels", "4096")
    assert result.exit_code == 0, result.output
    found = errors(result)
    assert len(found) == 3, result.stderr
    assert str(notimg) in found[0] and str(fake_png) in found[1]
    assert str(notvideo) in found[2] and "dropped the attachments" in found[2]
    assert "Attached" not in "".join(
        line for line in result.stderr.splitlines() if "notimg" in line or "fake.png" in line
    )
    assert result.stdout.count("</think>") == 3
    users = user_messages(tiny_path, saved)
    assert users[:2] == ["Plain message", "And this one works"]
    assert users[2] == [
        {"type": "image", "image": str(image)},
        {"type": "text", "text": "With an image"},
    ]


def test_an_image_flag_that_is_not_an_image_fails_at_once(tiny_path, tmp_path):
    notimg = tmp_path / "notimg.txt"
    notimg.write_text("text")
    result = CliRunner().invoke(main, ["--model", tiny_path, "--image", str(notimg)], input="hi\n")
    assert result.exit_code == 1 and not result.stdout
    assert result.stderr.startswith(f"Error: {notimg}: ") and result.stderr.count("\n") == 1
