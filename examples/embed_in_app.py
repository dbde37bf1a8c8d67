"""Embedding mlx-qwen35 in a macOS Python app: load once, answer from a worker thread, stream
pieces to the UI through a callback, and keep errors to one line for the user.

    python examples/embed_in_app.py --model tiny-random
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable

import mlx_qwen35
from mlx_qwen35.cli.options import DEFAULT_MODEL


class Assistant:
    """What an app holds: the model and processor, loaded once, behind a lock (MLX evaluates
    one graph at a time per stream, so concurrent requests are served one after another)."""

    def __init__(self, model: str, **sampling: float):
        self.model, self.processor = mlx_qwen35.load(model)
        self.sampling = sampling
        self._lock = threading.Lock()

    def ask(self, question: str, on_text: Callable[[str], None], max_tokens: int = 64) -> str:
        with self._lock:
            pieces = []
            for response in mlx_qwen35.stream_generate(
                self.model,
                self.processor,
                question,
                max_tokens=max_tokens,
                enable_thinking=False,
                **self.sampling,
            ):
                on_text(response.text)
                pieces.append(response.text)
            return "".join(pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    try:
        assistant = Assistant(args.model, temp=0.7, top_p=0.8, top_k=20)
    except mlx_qwen35.UserError as e:  # e.g. no network and no local copy: show one line
        print(f"Could not start: {e}")
        return

    answers: dict[str, str] = {}

    def worker(question: str) -> None:
        answers[question] = assistant.ask(question, on_text=lambda text: None)

    threads = [threading.Thread(target=worker, args=(q,)) for q in ("Hi!", "Name a colour.")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for question, answer in answers.items():
        print(f"Q: {question}\nA: {answer}\n")


if __name__ == "__main__":
    main()
