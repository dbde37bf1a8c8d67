"""`python -m mlx_qwen35.server`: see mlx_qwen35/cli/server.py."""

from mlx_qwen35.cli.server import main

if __name__ == "__main__":
    main(prog_name="python -m mlx_qwen35.server")
