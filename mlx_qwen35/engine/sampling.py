"""Sampling settings: checked once, in one place, for every front door."""

from __future__ import annotations

import math
from typing import Any

from ..errors import UserError

MAX_SEED = 2**64 - 1  # MLX's random seed is an unsigned 64-bit integer


def check_sampling(
    *,
    max_tokens: int,
    temp: float,
    top_p: float,
    top_k: int,
    min_p: float,
    repetition_penalty: float | None,
    presence_penalty: float | None,
    prefill_step_size: int,
    seed: int | None = None,
) -> None:
    """Raise UserError, saying what to pass instead, for any out-of-range setting."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not is_int(max_tokens) or max_tokens <= 0:
        raise UserError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if not is_num(temp) or temp < 0:
        raise UserError(f"temp must be a number >= 0 (0 = greedy), got {temp!r}")
    if not is_num(top_p) or not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if not is_int(top_k) or top_k < 0:
        raise UserError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not is_num(min_p) or not 0 <= min_p <= 1:
        raise UserError(f"min_p must be in [0, 1] (0 = off), got {min_p!r}")
    if repetition_penalty is not None and (
        not is_num(repetition_penalty) or repetition_penalty <= 0
    ):
        raise UserError(
            f"repetition_penalty must be a number > 0 (1 = off), got {repetition_penalty!r}"
        )
    if presence_penalty is not None and not is_num(presence_penalty):
        raise UserError(f"presence_penalty must be a finite number, got {presence_penalty!r}")
    if not is_int(prefill_step_size) or prefill_step_size <= 0:
        raise UserError(f"prefill_step_size must be a positive integer, got {prefill_step_size!r}")
    if seed is not None and (not is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise UserError(f"seed must be an integer from 0 to {MAX_SEED} (2**64 - 1), got {seed!r}")
