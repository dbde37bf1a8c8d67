"""`python -m mlx_qwen35.chat`: see mlx_qwen35/cli/chat.py."""

from mlx_qwen35.cli.chat import main

if __name__ == "__main__":
    main(prog_name="python -m mlx_qwen35.chat")
