"""Which token ids a cheaper draft head scores (`--draft-vocab N`).

A draft step of a small model is dominated by its head: at 0.8B the 248k x 1024 output matrix is
about a third of a decode step, so an MTP draft costs almost as much as it saves. Scoring only the
N likeliest ids makes the draft step cheap, and verification still uses the full head, so the
output does not change: only drafts of rarer tokens are lost.

The N ids are, in order of preference:
1. the checkpoint's `draft_vocab.json` when it has one (next to its tokenizer):
   `{"token_ids": [...]}`, most frequent first (`write_draft_vocab` counts them over a corpus;
   the converter writes it with `--draft-vocab-corpus`);
2. otherwise the tokenizer's merge order: a byte-level BPE learns its merges most frequent first,
   so the earliest merges are the commonest pieces of its training text. The byte tokens come
   first, then the outputs of the first merges.
Special and added tokens (end of turn, thinking and tool-call markers) are always included: a
draft that cannot propose `<|im_end|>` loses the last token of every answer.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

DRAFT_VOCAB_FILE = "draft_vocab.json"


def check_draft_vocab(n: Any, vocab_size: int) -> int | None:
    if n is None:
        return None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"draft_vocab must be a positive number of token ids, got {n!r}")
    return None if n >= vocab_size else n


def draft_vocab_ids(
    tokenizer: Any, n: int, vocab_size: int, model_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """Sorted int32 ids: the n preferred ids (see the module doc: `model_dir`'s frequency file,
    else the tokenizer's merge order) plus every special token."""
    ranked = _frequency_file(model_dir) if model_dir is not None else None
    if ranked is None:
        ranked = merge_order(tokenizer)
    special = _added_ids(tokenizer)
    chosen = [t for t in ranked if 0 <= t < vocab_size][:n]
    ids = np.unique(np.array(chosen + [t for t in special if t < vocab_size], dtype=np.int32))
    return ids


def merge_order(tokenizer: Any) -> list[int]:
    """Token ids ranked by the BPE merge that makes them (byte tokens first); id order when the
    tokenizer is not a BPE with merges (Qwen's ids follow its merge order anyway)."""
    try:
        model = json.loads(_backend(tokenizer).to_str())["model"]
        vocab, merges = model["vocab"], model["merges"]
    except (AttributeError, KeyError, TypeError, ValueError):
        return sorted(tokenizer.get_vocab().values())
    rank: dict[int, int] = {}
    for i, merge in enumerate(merges):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = vocab.get(a + b)
        if token is not None and token not in rank:
            rank[token] = i
    # Tokens no merge makes are the base alphabet (bytes): always needed, so they rank first.
    return sorted(vocab.values(), key=lambda t: (rank.get(t, -1), t))


def write_draft_vocab(model_dir: str | os.PathLike, tokenizer: Any, texts: Iterable[str]) -> Path:
    """Count token frequencies over `texts` and write `draft_vocab.json` into `model_dir`
    (atomically): ids seen, most frequent first, then the rest in merge order."""
    counts: Counter[int] = Counter()
    for text in texts:
        counts.update(tokenizer.encode(text, add_special_tokens=False))
    if not counts:
        raise UserError("the draft-vocab corpus holds no text; pass a non-empty text file")
    seen = [t for t, _ in counts.most_common()]
    known = set(seen)
    ranked = seen + [t for t in merge_order(tokenizer) if t not in known]
    path = Path(model_dir) / DRAFT_VOCAB_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"token_ids": ranked}))
    os.replace(tmp, path)
    return path


def _frequency_file(model_dir: str | os.PathLike) -> list[int] | None:
    path = Path(model_dir) / DRAFT_VOCAB_FILE
    if not path.is_file():
        return None
    try:
        ids = json.loads(path.read_text())["token_ids"]
        if not all(isinstance(t, int) for t in ids):
            raise TypeError("non-integer id")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path}: unreadable draft vocabulary ({e}); delete it or write it again"
        ) from None
    return ids


def _added_ids(tokenizer: Any) -> list[int]:
    ids = set(_backend(tokenizer).get_added_tokens_decoder())
    ids |= set(getattr(tokenizer, "eos_token_ids", []) or [])
    return sorted(int(t) for t in ids)


def _backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind our Tokenizer (or a transformers fast tokenizer)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is not None:
        return backend
    return getattr(tokenizer, "backend_tokenizer", tokenizer)
