"""mlx-qwen35: Qwen3.5 on Apple Silicon, on MLX.

    import mlx_qwen35
    model, processor = mlx_qwen35.load("tiny-random")
    print(mlx_qwen35.generate(model, processor, "Hello", max_tokens=32))
"""

from .errors import UserError
from .generate import GenerationResponse, generate, stream_generate
from .loading import load
from .model import Model
from .processor import Processor

__version__ = "0.1.0"

__all__ = [
    "GenerationResponse",
    "Model",
    "Processor",
    "UserError",
    "generate",
    "load",
    "stream_generate",
]
