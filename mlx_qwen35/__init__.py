"""mlx-qwen35: Qwen3.5 on Apple Silicon, on MLX.

    import mlx_qwen35
    model, processor = mlx_qwen35.load("tiny-random")
    print(mlx_qwen35.generate(model, processor, "Hello", max_tokens=32))
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Imported on first use: `python -m mlx_qwen35.generate` must not find its own module already
# imported by the package (runpy warns on stderr), and `import mlx_qwen35` stays cheap.
_EXPORTS = {
    "ChatSession": "session",
    "GenerationResponse": "generate",
    "Model": "model",
    "Processor": "processor",
    "UserError": "errors",
    "convert": "convert",
    "generate": "generate",
    "load": "loading",
    "stream_generate": "generate",
    "ToolCall": "tools",
    "ToolResult": "tools",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mlx_qwen35' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
