"""The package's public names stay what they are whatever was imported first.

`mlx_qwen35.generate` and `mlx_qwen35.convert` are both public functions and the modules behind
`python -m mlx_qwen35.generate` / `.convert`; importing a submodule normally rebinds the package
attribute to the module, after which `mlx_qwen35.generate(...)` raised "'module' object is not
callable". Each import order runs in a fresh set of modules (in a child interpreter, so this
process keeps its own).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMPORTS = (
    "import mlx_qwen35.generate",
    "import mlx_qwen35.convert",
    "from mlx_qwen35 import stream_generate",
    "from mlx_qwen35 import ChatSession",
)

CHILD = """
import sys, types

def fresh():
    for name in [m for m in sys.modules if m == "mlx_qwen35" or m.startswith("mlx_qwen35.")]:
        del sys.modules[name]

for order in ORDERS:
    fresh()
    import mlx_qwen35
    for statement in order:
        exec(statement, {})
    for name in ("generate", "convert", "stream_generate", "load"):
        value = getattr(mlx_qwen35, name)
        assert not isinstance(value, types.ModuleType), (order, name, value)
    assert mlx_qwen35.generate.__module__ == "mlx_qwen35.engine.generate", order
    assert mlx_qwen35.convert.__module__ == "mlx_qwen35.weights.convert", order
    # The entry points are still there as modules.
    assert callable(sys.modules["mlx_qwen35.generate"].main)
    assert callable(sys.modules["mlx_qwen35.convert"].main)

# And after all that, the functions work.
model, processor = mlx_qwen35.load("tiny-random")
text = mlx_qwen35.generate(model, processor, "hi", max_tokens=2)
assert isinstance(text, str), text
from mlx_qwen35.weights.tiny_random import ensure_tiny_random
mlx_qwen35.convert(str(ensure_tiny_random()), "out", dry_run=True, progress=False)
print("ok")
"""


def test_public_functions_survive_any_import_order(tmp_path):
    orders = list(itertools.permutations(IMPORTS))
    code = f"ORDERS = {orders!r}\n" + CHILD
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
