"""A multi-turn chat with the session API, in a few lines (the full CLI is
`python -m mlx_qwen35.chat`).

    python examples/chat.py
    python examples/chat.py --model tiny-random      # offline (random weights: gibberish)

Type a message per line; an empty line or Ctrl-D ends. Thinking prints dimmed.
"""

from __future__ import annotations

import argparse
import sys

import mlx_qwen35
from mlx_qwen35.cli.options import DEFAULT_MODEL
from mlx_qwen35.engine.session import ChatSession

DIM, RESET = "\033[2m", "\033[0m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint, repo id or tiny-random")
    parser.add_argument("--system", default="You are a helpful assistant.")
    parser.add_argument("--thinking-budget", type=int, default=1024)
    args = parser.parse_args()

    try:
        model, processor = mlx_qwen35.load(args.model)
        chat = ChatSession(
            model, processor, system=args.system, thinking_budget=args.thinking_budget
        )
        while (message := read_line()) is not None:
            reply = chat.send(message)
            for piece in reply:
                print(f"{DIM}{piece.text}{RESET}" if piece.thinking else piece.text, end="")
                sys.stdout.flush()
            result = reply.result
            print(
                f"\n{DIM}[{result.reused_tokens} of {result.prompt_tokens} prompt tokens from "
                f"the cache, {result.generation_tps:.1f} tokens/s]{RESET}"
            )
    except mlx_qwen35.UserError as e:
        sys.exit(f"Error: {e}")


def read_line() -> str | None:
    try:
        line = input(">> ").strip()
    except (EOFError, KeyboardInterrupt):
        return None
    return line or None


if __name__ == "__main__":
    main()
