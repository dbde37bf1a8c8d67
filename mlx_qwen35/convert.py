"""`python -m mlx_qwen35.convert`: see mlx_qwen35/cli/convert.py."""

from mlx_qwen35.cli.convert import main

if __name__ == "__main__":
    main(prog_name="python -m mlx_qwen35.convert")
