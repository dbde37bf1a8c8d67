"""Without PyAV, a video file names the extra to install exactly as the README does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mlx_qwen35.errors import UserError
from mlx_qwen35.inputs import video

README = Path(__file__).resolve().parents[1] / "README.md"


def test_pyav_hint_matches_the_readme(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError) as info:
        video._PyAVSource(clip)
    message = str(info.value)
    assert "\n" not in message and "video extra" in message
    assert video.PYAV_INSTALL in message
    assert f"`video` extra: `{video.PYAV_INSTALL}`" in README.read_text(encoding="utf-8")
