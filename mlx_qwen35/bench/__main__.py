"""`python -m mlx_qwen35.bench`: see cli.py."""

from mlx_qwen35.bench.cli import main

main(prog_name="python -m mlx_qwen35.bench")
