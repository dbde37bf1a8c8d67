"""The two drafters of speculative decoding: the checkpoint's MTP head and a separate draft model.

Both follow one protocol, driven by `speculative.py` for one sequence:

    prefill(ids, embeddings, hidden, position_ids)   one prompt chunk, in order
    draft(token, k, propose)                          k draft tokens after `token`
    commit(accepted, hidden)                          after verification: the first `accepted`
                                                      drafts were kept (hidden: the target's
                                                      hidden states of [token, kept drafts])
`propose(head, hidden, i)` picks draft i from the draft hidden state: drafters never sample by
themselves, so drafts and target share one sampler (and the proposer keeps the draft
distributions that exact rejection sampling needs).

MTP (spec §9). Its KV cache entry p is the pair (next token x_{p+1}, target hidden h_p). Prompt
chunks and verified tokens only queue such pairs; `draft` runs every complete pair in one forward,
whose last output drafts d_1, and chains k - 1 more single steps on its own output. Those chained
entries hold the MTP's hidden instead of the target's, so `commit` trims them and queues the
verified pairs in their place: the cache always holds target-hidden pairs only.

Draft model. Its own hybrid cache follows the committed tokens. Drafting feeds [pending..., token]
and then d_1 .. d_{k-1}; after each step the DeltaNet (conv, recurrent) states are kept by
reference (MLX arrays are immutable, so this copies nothing). `commit` restores the states after
the last kept draft and trims the KV caches; when every draft was kept, d_k has not been fed yet
and waits in `pending`.

Both can score only a subset of the vocabulary (`head_ids`, see draft_vocab.py): verification
uses the full head, so the output does not change, only the cost of a draft step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..model.cache import GatedDeltaCache, KVCache
from ..model.cpu_fast import linear

# propose(head, hidden [1, H], i) -> draft token [1]: scores the head and picks draft i.
Propose = Callable[[Any, mx.array, int], mx.array]


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


class MTPDrafter:
    """Drafts with the target's own MTP head (`model.mtp`)."""

    def __init__(self, model: Any, head_ids: np.ndarray | None = None):
        self.mtp = getattr(model, "mtp", None)
        if self.mtp is None:
            reason = getattr(model, "mtp_unavailable", None) or "the model has no MTP head"
            raise UserError(f"cannot draft with the MTP head: {reason}")
        self.model = model
        self.head = DraftHead(model.language_model, head_ids)
        self.cache = self.mtp.make_cache()
        self._tokens: list[mx.array] = []  # embeddings [1, t, H] of queued next tokens x_{p+1}
        self._hidden: list[mx.array] = []  # target hidden states [1, t, H] of queued h_p
        self._positions: list[mx.array] = []  # explicit positions [3, 1, t] of queued h_p
        self._started = False
        self._chained = 0

    def prefill(
        self,
        ids: mx.array,
        embeddings: mx.array | None,
        hidden: mx.array,
        position_ids: mx.array | None,
    ) -> None:
        """Queue one prompt chunk (ids [T]; its target embeddings [1, T, H] when media are merged
        in, else None; target hidden [1, T, H]; positions [3, 1, T] or None) and run the pairs
        that are complete, so the MTP cache fills chunk by chunk with the target's."""
        emb = embeddings if embeddings is not None else self.model.embed(ids[None])
        if not self._started:
            emb = emb[:, 1:]  # x_0 is nobody's next token
            self._started = True
        self._tokens.append(emb)
        self._hidden.append(hidden)
        if position_ids is not None:
            self._positions.append(position_ids)
        self._run_pairs()
        mx.eval([c.state for c in self.cache])

    def sync_positions(self, target_cache: list[Any]) -> None:
        """Take the target's rotary delta (images advance positions by less than their tokens):
        after the prompt, pair p sits at position p + rope_delta as the target's token p does."""
        kv = next(c for c in target_cache if isinstance(c, KVCache))
        self.cache[0].rope_delta = kv.rope_delta

    def draft(self, token: mx.array, k: int, propose: Propose) -> list[mx.array]:
        self._tokens.append(self.model.embed(token[None]))
        o = self._run_pairs()
        drafts = []
        for i in range(k):
            d = propose(self.head, o[:, -1], i)
            drafts.append(d)
            if i + 1 < k:
                o = self.mtp(self.model.embed(d[None]), o[:, -1:], self.cache)
        self._chained = k - 1
        return drafts

    def commit(self, accepted: int, drafts: list[mx.array], hidden: mx.array) -> None:
        for c in self.cache:
            c.trim(self._chained)
        self._chained = 0
        if accepted:
            self._tokens.append(self.model.embed(mx.concatenate(drafts[:accepted])[None]))
        self._hidden.append(hidden)

    def _run_pairs(self) -> mx.array:
        """Run the MTP over every complete (token, hidden) pair in the queue; a hidden state
        whose next token is not known yet stays queued. Returns the output [1, n, H]."""
        emb = mx.concatenate(self._tokens, axis=1)
        hidden = mx.concatenate(self._hidden, axis=1)
        n = emb.shape[1]
        positions = None
        if self._positions:  # a media prompt: all of its chunks come with positions
            positions = mx.concatenate(self._positions, axis=-1)
        out = None
        if n:
            out = self.mtp(
                emb,
                hidden[:, :n],
                self.cache,
                position_ids=None if positions is None else positions[..., :n],
            )
        self._tokens = []
        self._hidden = [hidden[:, n:]] if hidden.shape[1] > n else []
        self._positions = [positions[..., n:]] if positions is not None and self._hidden else []
        return out


class ModelDrafter:
    """Drafts with a separate, smaller Qwen3.5 model that shares the target's tokenizer."""

    def __init__(self, draft_model: Any, head_ids: np.ndarray | None = None):
        self.model = draft_model
        self.head = DraftHead(draft_model.language_model, head_ids)
        self.cache = draft_model.make_cache()
        self.pending: list[mx.array] = []
        self._snapshots: list[list[tuple[mx.array, mx.array]]] = []
        self._fed_drafts = 0

    def prefill(
        self,
        ids: mx.array,
        embeddings: mx.array | None,
        hidden: mx.array,
        position_ids: mx.array | None,
    ) -> None:
        """Feed one prompt chunk. The draft model sees token ids only: media features belong to
        the target (a text draft just drafts worse right after an image)."""
        self.model.hidden_states(ids[None], self.cache)
        mx.eval([c.state for c in self.cache])

    def sync_positions(self, target_cache: list[Any]) -> None:
        """Nothing to do: the draft model counts positions on its own token ids."""

    def draft(self, token: mx.array, k: int, propose: Propose) -> list[mx.array]:
        fed = mx.concatenate([*self.pending, token])
        self.pending = []
        drafts, self._snapshots = [], []
        for i in range(k):
            hidden = self.model.hidden_states(fed[None], self.cache)
            self._snapshots.append(self._gdn_states())
            d = propose(self.head, hidden[:, -1], i)
            drafts.append(d)
            fed = d
        self._fed_drafts = k - 1
        return drafts

    def commit(self, accepted: int, drafts: list[mx.array], hidden: mx.array) -> None:
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
