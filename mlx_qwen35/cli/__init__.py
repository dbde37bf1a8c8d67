"""The command lines behind `python -m mlx_qwen35.<name>` and their shared options."""
