"""`python -m mlx_qwen35.generate`: see mlx_qwen35/cli/generate.py."""

from mlx_qwen35.cli.generate import main

if __name__ == "__main__":
    main(prog_name="python -m mlx_qwen35.generate")
