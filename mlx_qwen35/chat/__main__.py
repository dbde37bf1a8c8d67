"""`python -m mlx_qwen35.chat`: the interactive chat (chat_cli.py).

chat is a package so that `-m` runs this file instead of re-executing a module the package
has already imported (which Python warns about).
"""

from ..chat_cli import main

if __name__ == "__main__":
    main(prog_name="python -m mlx_qwen35.chat")
