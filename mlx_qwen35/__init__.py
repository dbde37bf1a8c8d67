"""mlx-qwen35: Qwen3.5 on Apple Silicon, on MLX.

    import mlx_qwen35
    model, processor = mlx_qwen35.load("tiny-random")
    print(mlx_qwen35.generate(model, processor, "Hello", max_tokens=32))

Where things live: model/ (the network and its kernels), inputs/ (processor, images, video, chat
messages, tool calls), engine/ (the batching scheduler, caches, prefix cache, sampling, and
generate / batch_generate / ChatSession on it), weights/ (loading, converter, recipes, upload),
cli/ (the command lines), bench/. The modules `generate`, `chat` and
`convert` at this level are only the `python -m mlx_qwen35.<name>` entry points.
"""

import sys
import types
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Imported on first use: `python -m mlx_qwen35.generate` must not find its own module already
# imported by the package (runpy warns on stderr), and `import mlx_qwen35` stays cheap.
_EXPORTS = {
    "ChatSession": "engine.session",
    "GenerationResponse": "engine.generate",
    "Model": "model.model",
    "Processor": "inputs.processor",
    "UserError": "errors",
    "batch_generate": "engine.generate",
    "convert": "weights.convert",
    "generate": "engine.generate",
    "load": "weights.loading",
    "stream_generate": "engine.generate",
    "ToolCall": "inputs.tools",
    "ToolResult": "inputs.tools",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mlx_qwen35' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keeps the public functions callable whatever was imported first.

    Importing a submodule binds it as an attribute of its package, so `import
    mlx_qwen35.generate` (the entry point of `python -m mlx_qwen35.generate`) would replace the
    function `mlx_qwen35.generate` with that module. Submodules named like an export are not
    bound; `from mlx_qwen35.generate import main` still works through sys.modules.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
