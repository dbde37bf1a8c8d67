"""mlx-qwen35: Qwen3.5 on Apple Silicon, on MLX."""
