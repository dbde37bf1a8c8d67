"""Generated tokens -> streamed text pieces, with the thinking block told apart, and the logits
processor that enforces a thinking budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx


@dataclass
class Piece:
    """One generated token's worth of streamed text.

    text: new printable text (may be empty while a character is incomplete); thinking: whether
    it belongs to the thinking block; token: the token id; logprobs: the distribution [vocab] the
    token was drawn from.
    """

    text: str
    thinking: bool
    token: int
    logprobs: mx.array


class TextStream:
    """Detokenizes generated tokens into pieces, splitting the thinking block from the answer
    by the </think> token (which itself prints nothing)."""

    def __init__(self, processor: Any, think_end: int | None, thinking: bool):
        self.processor = processor
        self.think_end = think_end
        self.thinking = thinking
        self.detokenizer = processor.tokenizer.detokenizer
        self.started = False  # the answer has printed something
        self.thinking_tokens = 0

    def add(self, token: int, logprobs: mx.array, last: bool) -> Piece:
        thinking = self.thinking
        if thinking and token == self.think_end:
            self.detokenizer.finalize()
            text = self.detokenizer.last_segment
            self.detokenizer = self.processor.tokenizer.detokenizer
            self.thinking = False
            return Piece(text, True, token, logprobs)
        if token not in self.processor.eos_token_ids:
            self.detokenizer.add_token(token)
            if thinking:
                self.thinking_tokens += 1
        if last:
            self.detokenizer.finalize()
        text = self.detokenizer.last_segment
        if not thinking and not self.started:
            # The template puts a blank line after </think>; the answer starts after it.
            text = text.lstrip()
            self.started = bool(text)
        return Piece(text, thinking, token, logprobs)


def thinking_budget_processor(
    prompt_length: int, budget: int, forced: Sequence[int]
) -> Callable[[mx.array, mx.array], mx.array]:
    """An mlx-lm logits processor that closes the thinking block after `budget` tokens.

    When `budget` tokens have been generated and none was `forced[0]` (</think>), the next
    tokens are forced to `forced` (</think> and the blank line after it); then the model answers.
    It works on array shapes only, so it never waits for the device.
    """
    forced = list(forced)

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        n = tokens.size - prompt_length  # tokens generated so far
        if not budget <= n < budget + len(forced):
            return logits
        thought = tokens[prompt_length : prompt_length + budget]
        closed = mx.any(thought == forced[0]) if budget else mx.array(False)
        vocab = mx.arange(logits.shape[-1])
        only = mx.where(vocab == forced[n - budget], 0.0, -math.inf).astype(logits.dtype)
        return mx.where(closed, logits, only)

    return processor
