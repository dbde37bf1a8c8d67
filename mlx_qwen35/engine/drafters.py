"""The two drafters of speculative decoding: the checkpoint's MTP head and a separate draft model.

Both follow one protocol, driven by `speculative.py` for one row of the engine:

    prefill(ids, embeddings, hidden, positions)   one prompt chunk, in order
    observe(token, hidden, position)              a plain decode step of the row
    draft(token, k, pick, positions)              k draft tokens after `token`
    commit(accepted, drafts, hidden, positions)   after verification: the first `accepted` drafts
                                                  were kept (hidden, positions: the target's, of
                                                  [token, kept drafts])
`pick(head, hidden)` chooses a draft token from a draft hidden state [1, H]: drafters never sample
by themselves, so drafts and target share the row's one sampler (which also keeps the draft
distributions that exact rejection sampling needs). Positions are the target's rotary positions
[3, 1, T] of the tokens concerned.

MTP (spec §9). Its KV cache entry j is the pair (next token x_{p+1}, target hidden h_p) at the
target's position of p. Prompt chunks, plain steps and verified tokens only queue such pairs;
`draft` runs every complete pair in one forward, whose last output drafts d_1, and chains k - 1
single steps on its own output. Those chained entries hold the MTP's hidden instead of the
target's, so `commit` trims them and queues the verified pairs in their place: the cache only ever
holds target-hidden pairs. A row resumed from the prefix cache starts its pairs there.

Draft model. Its own hybrid cache follows the committed tokens (a resumed row first feeds it the
cached prompt, `catch_up`). Drafting feeds [pending..., token] and then d_1 .. d_{k-1}; after each
step the DeltaNet (conv, recurrent) states are kept by reference (MLX arrays are immutable, so
this copies nothing). `commit` restores the states after the last kept draft and trims the KV
caches; when every draft was kept, d_k has not been fed yet and waits in `pending`. It sees token
ids only: media features belong to the target (it just drafts worse right after an image).

Both can score only a subset of the vocabulary (`head_ids`, see draft_vocab.py): verification
uses the full head, so the output does not change, only the cost of a draft step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..model.cache import GatedDeltaCache, KVCache
from ..model.cpu_fast import linear

# pick(head, hidden [1, H]) -> draft token [1]
Pick = Callable[[Any, mx.array], mx.array]
# While its row decodes in a batch, a drafter catches up every this many steps (bounded queues).
CATCH_UP_EVERY = 64


class DraftHead:
    """A model's output head, whole or restricted to the rows of `ids` (drafting only)."""

    def __init__(self, language_model: Any, ids: np.ndarray | None = None):
        self.language_model = language_model
        self.vocab_size = language_model.args.vocab_size
        self.ids = None if ids is None else mx.array(np.asarray(ids, dtype=np.int32))
        if self.ids is None:
            return
        args = language_model.args
        src = (
            language_model.model.embed_tokens
            if args.tie_word_embeddings
            else language_model.lm_head
        )
        self._quant = None
        if "scales" in src:
            biases = src["biases"][self.ids] if "biases" in src else None
            self._quant = (src["scales"][self.ids], biases, src.group_size, src.bits, src.mode)
        self._weight = src["weight"][self.ids]
        mx.eval(self._weight, self._quant[:2] if self._quant else [])

    def __call__(self, hidden: mx.array) -> mx.array:
        """Logits [..., N] for hidden [..., H] (N = vocab size, or len(ids))."""
        if self.ids is None:
            return self.language_model.logits(hidden)
        if self._quant is None:
            return linear(hidden, self._weight)
        scales, biases, group_size, bits, mode = self._quant
        return mx.quantized_matmul(
            hidden, self._weight, scales, biases, True, group_size, bits, mode=mode
        )

    def full(self, logits: mx.array) -> mx.array:
        """Head logits [1, N] as logits over the whole vocabulary [1, V] (-inf off the subset)."""
        if self.ids is None:
            return logits
        out = mx.full((logits.shape[0], self.vocab_size), -mx.inf, dtype=logits.dtype)
        out[:, self.ids] = logits
        return out


def draft_head(language_model: Any, ids: np.ndarray | None) -> DraftHead:
    """The model's draft head for `ids`, made once: a subset copies its head rows, which a
    request should not pay for again (the last subset used is kept on the model)."""
    if ids is None:
        return DraftHead(language_model)
    key = hashlib.blake2b(np.ascontiguousarray(ids, np.int32).tobytes(), digest_size=16).digest()
    kept = vars(language_model).setdefault("_mlx_qwen35_draft_head", {})
    if key not in kept:
        kept.clear()
        kept[key] = DraftHead(language_model, ids)
    return kept[key]


class MTPDrafter:
    """Drafts with the target's own MTP head (`model.mtp`)."""

    def __init__(self, model: Any, head_ids: np.ndarray | None = None):
        self.mtp = model.mtp
        self.model = model
        self.head = draft_head(model.language_model, head_ids)
        self.cache = self.mtp.make_cache()
        self._tokens: list[mx.array] = []  # embeddings [1, t, H] of queued next tokens x_{p+1}
        self._hidden: list[mx.array] = []  # target hidden states [1, t, H] of queued h_p
        self._positions: list[mx.array] = []  # their positions [3, 1, t]
        self._started = False
        self._chained = 0

    def prefill(
        self, ids: mx.array, embeddings: mx.array | None, hidden: mx.array, positions: mx.array
    ) -> None:
        """Queue one prompt chunk (ids [T]; its embeddings [1, T, H] when media are merged in,
        else None; target hidden [1, T, H]; positions [3, 1, T]) and run the complete pairs, so
        the MTP cache fills chunk by chunk with the target's."""
        emb = embeddings if embeddings is not None else self.model.embed(ids[None])
        if not self._started:
            emb = emb[:, 1:]  # the first token's own hidden predecessor is not here
            self._started = True
        self._tokens.append(emb)
        self._queue(hidden, positions)
        self._run_pairs()
        mx.eval([c.state for c in self.cache])

    def observe(self, token: mx.array, hidden: mx.array, position: mx.array) -> None:
        self._tokens.append(self.model.embed(token[None]))
        self._queue(hidden, position)
        if len(self._hidden) > CATCH_UP_EVERY:
            self._run_pairs()
            mx.eval([c.state for c in self.cache])

    def draft(self, token: mx.array, k: int, pick: Pick, positions: mx.array) -> list[mx.array]:
        self._tokens.append(self.model.embed(token[None]))
        o = self._run_pairs()
        drafts = []
        for i in range(k):
            d = pick(self.head, o[:, -1])
            drafts.append(d)
            if i + 1 < k:  # pair (d_{i+1}, own output) at the position of the token before it
                o = self.mtp(
                    self.model.embed(d[None]),
                    o[:, -1:],
                    self.cache,
                    position_ids=positions[..., i : i + 1],
                )
        self._chained = k - 1
        return drafts

    def commit(
        self, accepted: int, drafts: list[mx.array], hidden: mx.array, positions: mx.array
    ) -> None:
        for c in self.cache:
            c.trim(self._chained)
        self._chained = 0
        if accepted:
            self._tokens.append(self.model.embed(mx.concatenate(drafts[:accepted])[None]))
        self._queue(hidden, positions)

    def _queue(self, hidden: mx.array, positions: mx.array) -> None:
        self._hidden.append(hidden)
        self._positions.append(positions)

    def _run_pairs(self) -> mx.array | None:
        """Run the MTP over every complete (token, hidden) pair in the queue; a hidden state
        whose next token is not known yet stays queued. Returns the output [1, n, H]."""
        emb = mx.concatenate(self._tokens, axis=1)
        hidden = mx.concatenate(self._hidden, axis=1)
        positions = mx.concatenate(self._positions, axis=-1)
        n = emb.shape[1]
        out = None
        if n:
            out = self.mtp(emb, hidden[:, :n], self.cache, position_ids=positions[..., :n])
        self._tokens = []
        rest = hidden.shape[1] > n
        self._hidden = [hidden[:, n:]] if rest else []
        self._positions = [positions[..., n:]] if rest else []
        return out


class ModelDrafter:
    """Drafts with a separate, smaller Qwen3.5 model that shares the target's tokenizer."""

    def __init__(self, draft_model: Any, head_ids: np.ndarray | None = None):
        self.model = draft_model
        self.head = draft_head(draft_model.language_model, head_ids)
        self.cache = draft_model.make_cache()
        self.pending: list[mx.array] = []
        self._snapshots: list[list[tuple[mx.array, mx.array]]] = []
        self._fed_drafts = 0

    def catch_up(self, ids: list[int], step: int = 2048) -> None:
        """Feed prompt tokens the target did not prefill (it resumed from the prefix cache)."""
        for s in range(0, len(ids), step):
            self.model.hidden_states(mx.array([ids[s : s + step]], mx.uint32), self.cache)
            mx.eval([c.state for c in self.cache])

    def prefill(
        self, ids: mx.array, embeddings: mx.array | None, hidden: mx.array, positions: mx.array
    ) -> None:
        self.model.hidden_states(ids[None], self.cache)
        mx.eval([c.state for c in self.cache])

    def observe(self, token: mx.array, hidden: mx.array, position: mx.array) -> None:
        self.pending.append(token)
        if len(self.pending) >= CATCH_UP_EVERY:
            self.model.hidden_states(mx.concatenate(self.pending)[None], self.cache)
            mx.eval([c.state for c in self.cache])
            self.pending = []

    def draft(self, token: mx.array, k: int, pick: Pick, positions: mx.array) -> list[mx.array]:
        fed = mx.concatenate([*self.pending, token])
        self.pending = []
        drafts, self._snapshots = [], []
        for _ in range(k):
            hidden = self.model.hidden_states(fed[None], self.cache)
            self._snapshots.append(self._gdn_states())
            d = pick(self.head, hidden[:, -1])
            drafts.append(d)
            fed = d
        self._fed_drafts = k - 1
        return drafts

    def commit(
        self, accepted: int, drafts: list[mx.array], hidden: mx.array, positions: mx.array
    ) -> None:
        if accepted > self._fed_drafts:  # every draft kept: the last one was never fed
            self.pending = [drafts[-1]]
            return
        states = self._snapshots[accepted]
        linear_caches = [c for c in self.cache if isinstance(c, GatedDeltaCache)]
        for c, (conv, rec) in zip(linear_caches, states, strict=True):
            c[0], c[1] = conv, rec
        for c in self.cache:
            if isinstance(c, KVCache):
                c.trim(self._fed_drafts - accepted)
        self._snapshots = []

    def _gdn_states(self) -> list[tuple[mx.array, mx.array]]:
        return [(c[0], c[1]) for c in self.cache if isinstance(c, GatedDeltaCache)]


def check_same_tokenizer(target_processor: Any, draft_processor: Any, draft_name: str) -> None:
    """Raise UserError unless the two tokenizers map every token to the same id."""
    a = target_processor.tokenizer.get_vocab()
    b = draft_processor.tokenizer.get_vocab()
    if a != b:
        raise UserError(
            f"the draft model {draft_name} has a different tokenizer from the target "
            f"({len(b)} vs {len(a)} tokens); use a Qwen3.5 checkpoint of the same family"
        )
