"""Startup stays cheap: `--help` of every command line and `load("tiny-random")` (with a chat
template render and streamed detokenization) import none of mlx_lm, transformers or torch.

Importing any of them costs seconds (mlx_lm's package imports transformers, which imports torch
when installed) before a command can answer; they belong inside the functions that need them.
Each check runs in a fresh interpreter, since this test process has long imported them all.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_qwen35

HEAVY = ("mlx_lm", "transformers", "torch")
ROOT = Path(__file__).resolve().parents[1]


def _entry_points() -> list[str]:
    """Every `python -m mlx_qwen35.<name>` command: modules that run as __main__, and packages
    with a __main__ module."""
    found = []
    for info in pkgutil.iter_modules(mlx_qwen35.__path__):
        path = Path(mlx_qwen35.__path__[0]) / info.name
        if info.ispkg:
            if (path / "__main__.py").is_file():
                found.append(f"mlx_qwen35.{info.name}")
        elif '__name__ == "__main__"' in path.with_suffix(".py").read_text(encoding="utf-8"):
            found.append(f"mlx_qwen35.{info.name}")
    return sorted(found)


def _heavy_modules_after(code: str, tmp_path: Path, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """The `heavy` packages in sys.modules after `code` runs in a fresh interpreter."""
    script = (
        "import sys, json\n"
        + code
        + f"\nprint(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))\n"
    )
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_command_line_is_found():
    expected = {"mlx_qwen35.generate", "mlx_qwen35.chat", "mlx_qwen35.convert", "mlx_qwen35.bench"}
    assert expected <= set(_entry_points())


def _help(module: str) -> str:
    return (
        "import runpy, io, contextlib\n"
        f"sys.argv = [{module!r}, '--help']\n"
        "buf = io.StringIO()\n"
        "try:\n"
        "    with contextlib.redirect_stdout(buf):\n"
        f"        runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "assert 'Usage' in buf.getvalue(), buf.getvalue()\n"
    )


@pytest.mark.parametrize("module", _entry_points())
def test_help_imports_nothing_heavy(module, tmp_path):
    assert _heavy_modules_after(_help(module), tmp_path) == []


@pytest.mark.parametrize("command", ["generate", "chat", "convert", "bench"])
def test_help_does_not_even_import_numpy(command, tmp_path):
    """numpy (and what needs it: the model, the processor) is ~0.2 s of a --help that should
    cost little more than click; these commands import it only when they run."""
    heavy = (*HEAVY, "numpy", "mlx.nn", "PIL")
    assert _heavy_modules_after(_help(f"mlx_qwen35.{command}"), tmp_path, heavy) == []


def test_the_dtype_choices_are_the_loaders_and_the_converters():
    from mlx_qwen35.cli.options import DTYPES
    from mlx_qwen35.weights import convert_plan, loading

    assert set(DTYPES) == set(convert_plan.DTYPES) == set(loading._DTYPES)


def test_load_and_text_path_import_nothing_heavy(tmp_path):
    code = (
        "import mlx_qwen35\n"
        "model, processor = mlx_qwen35.load('tiny-random')\n"
        "text = processor.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
        "ids = processor.encode(text)\n"
        "detok = processor.tokenizer.detokenizer\n"
        "for i in ids:\n"
        "    detok.add_token(i)\n"
        "detok.finalize()\n"
        "assert detok.text == processor.decode(ids) == text\n"
    )
    assert _heavy_modules_after(code, tmp_path) == []
