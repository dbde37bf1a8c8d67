"""Click options shared by the command lines (`python -m mlx_qwen35.generate` and `.chat`).

A flag both commands take means the same thing in both, so its name, parameter and type are
written here once. Options that read the same in both --help texts are ready decorators; for the
others each command passes what it words or defaults differently (help text, defaults), and
keeps the order of its own --help.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from ..errors import UserError

DEFAULT_MODEL = "mlx-community/Qwen3.5-4B-MLX-4bit"
# The weight dtypes --dtype takes (the loader's and the converter's; a test keeps them equal).
DTYPES = ("float32", "bfloat16", "float16")
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def options(*decorators: Decorator) -> Decorator:
    """One decorator that applies these as if stacked in this order (the first listed is the
    first in --help)."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


model_option = click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Local checkpoint directory, Hugging Face repo id, or tiny-random (built in, offline).",
)
system_option = click.option("--system", default=None, help="System prompt.")
seed_option = click.option(
    "--seed", type=int, default=None, help="Random seed for sampling (0 to 2**64 - 1)."
)
think_option = click.option(
    "--think/--no-think",
    "think",
    default=None,
    help="Turn the thinking block on or off (default: the chat template's default).",
)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default=None,
    help="Cast the weights (default: as stored).",
)


speculative_options = options(
    click.option(
        "--draft-model",
        default=None,
        help="Speculative decoding: mtp (the model's own MTP head) or a smaller Qwen3.5 "
        "checkpoint with the same tokenizer. The output does not change.",
    ),
    click.option(
        "--num-draft-tokens",
        type=int,
        default=3,
        show_default=True,
        help="Tokens drafted per verification (1 to 7), with --draft-model.",
    ),
    click.option(
        "--draft-vocab",
        type=int,
        default=None,
        help="Let the draft head score only the N likeliest token ids (cheaper drafts).",
    ),
)


def check_speculative(draft_model: str | None, num_draft_tokens: int, draft_vocab: Any) -> None:
    """Check the speculative flags before a model is loaded."""
    from ..engine.draft_vocab import check_draft_vocab
    from ..engine.speculative import check_num_draft_tokens

    if draft_model is None:
        if draft_vocab is not None:
            raise UserError("--draft-vocab needs --draft-model (mtp or a draft checkpoint)")
        return
    check_num_draft_tokens(num_draft_tokens)
    check_draft_vocab(draft_vocab, 1 << 62)


def image_option(help: str) -> Decorator:
    return click.option("--image", "images", multiple=True, metavar="PATH", help=help)


def video_option(help: str) -> Decorator:
    return click.option("--video", "videos", multiple=True, metavar="PATH", help=help)


def fps_option(help: str) -> Decorator:
    return click.option("--fps", type=float, default=None, help=help)


def max_pixels_option(help: str) -> Decorator:
    return click.option("--max-pixels", type=int, default=None, help=help)


def max_frames_option(help: str) -> Decorator:
    return click.option("--max-frames", type=int, default=None, help=help)


def max_tokens_option(default: int | None, help: str | None = None) -> Decorator:
    """-m/--max-tokens; a default other than None is shown in --help."""
    return click.option(
        "--max-tokens", "-m", type=int, default=default, show_default=default is not None, help=help
    )


def prefill_step_size_option(help: str) -> Decorator:
    return click.option("--prefill-step-size", type=int, default=2048, show_default=True, help=help)


def sampling_options(*, model_card: bool) -> Decorator:
    """--temp, --top-p, --top-k, --min-p, --repetition-penalty and --presence-penalty.

    model_card=False (generate): temp, top-p, top-k and min-p default to their off values, shown in
    --help. model_card=True (chat): every one defaults to None, which the session fills per turn
    from the model card's recommended settings; --help says so in brackets.
    """

    def option(flag: str, kind: type, off: Any, help: str) -> Decorator:
        if model_card:
            return click.option(flag, type=kind, default=None, help=f"{help} [model card].")
        return click.option(flag, type=kind, default=off, show_default=True, help=f"{help}.")

    presence = (
        "Subtracted from the logits of every token of the reply so far [model card]."
        if model_card
        else "Subtracted from the logits of every token generated so far."
    )
    return options(
        option("--temp", float, 0.0, "Sampling temperature (0 = greedy)"),
        option("--top-p", float, 1.0, "Nucleus sampling (1 = off)"),
        option("--top-k", int, 0, "Top-k sampling (0 = off)"),
        option("--min-p", float, 0.0, "Min-p sampling (0 = off)"),
        click.option(
            "--repetition-penalty",
            type=float,
            default=None,
            help="Multiplicative penalty for the last 20 tokens (1 = off)"
            + (" [off]." if model_card else "."),
        ),
        click.option("--presence-penalty", type=float, default=None, help=presence),
    )


def check_utf8(text: str, what: str) -> str:
    """`text`, unless it came from bytes that are not UTF-8 (Python keeps those as lone
    surrogates in argv and in streams read with errors="surrogateescape")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise UserError(
            f"{what} is not valid UTF-8 text ({bad} at character {e.start}); pass UTF-8"
        ) from None
    return text


def read_stdin(what: str) -> str:
    """All of stdin as text, or a UserError if it is not UTF-8 (whatever the locale says)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        return check_utf8(sys.stdin.read(), what)
    data = stream.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{what} is not valid UTF-8 text (byte 0x{data[e.start]:02x} at byte {e.start}); "
            "pass UTF-8"
        ) from None


def thinking_budget_option(help: str) -> Decorator:
    return click.option("--thinking-budget", type=click.IntRange(min=0), default=None, help=help)


# mlx-lm's KV-cache defaults, as model/cache.py has them (not imported here: --help stays light;
# a test keeps them equal).
KV_GROUP_SIZE = 64
QUANTIZED_KV_START = 5000

kv_cache_options = options(
    click.option(
        "--kv-bits",
        type=int,
        default=None,
        help="Quantize the KV cache to 4 or 8 bits (long contexts in less memory) [off].",
    ),
    click.option(
        "--kv-group-size",
        type=int,
        default=KV_GROUP_SIZE,
        show_default=True,
        help="Group size of the KV cache quantization.",
    ),
    click.option(
        "--quantized-kv-start",
        type=int,
        default=QUANTIZED_KV_START,
        show_default=True,
        help="With --kv-bits, quantize once the cache holds this many tokens.",
    ),
)


distributed_option = click.option(
    "--distributed",
    type=click.Choice(["tensor", "pipeline"]),
    default=None,
    help="Run on the machines that mlx.launch started: tensor or pipeline parallel (rank 0 "
    "prints).",
)
