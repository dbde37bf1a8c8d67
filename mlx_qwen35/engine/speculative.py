"""Speculative decoding as a decode strategy of the engine: draft k tokens, verify k + 1 in one
target forward, keep the longest acceptable prefix, roll every cache back to it.

A request asks for it with `Request(draft_model="mtp" | Model, num_draft_tokens=k)`. A round,
after the committed tokens ... x_n (x_n sampled, not yet fed to the target):
1. the drafter proposes d_1 .. d_k (drafters.py), each picked by the row's own sampler;
2. the target runs [x_n, d_1 .. d_k] once, its DeltaNet layers recording the state after every
   token (`GatedDeltaCache.record_steps`), and gives the distributions p_0 .. p_k;
3. acceptance. Greedy: the longest prefix with d_i = argmax p_{i-1}; the next token is
   argmax p_a. Sampling: the standard rule (Leviathan et al. 2023; Chen et al. 2023), accept d_i
   with probability min(1, p(d_i) / q(d_i)); at the first rejection draw from
   normalize(max(0, p - q)), else draw the bonus from p_k. Every emitted token is then distributed
   exactly as under plain sampling: the output is the target's whatever the draft proposes;
4. rollback to [x_n, d_1 .. d_a]: KV caches trimmed by k - a, DeltaNet recurrent and conv states
   taken from the recorded per-token states (no re-prefill), the drafter's caches realigned.
Greedy output is the plain greedy output token for token (up to the last-bit differences between
a T = k + 1 forward and k + 1 single-token ones). p and q are the row sampler's own laws
(`RowSampler.distribution`): logits processors and penalties see the committed tokens plus the
drafts before each position (processors must be functions of the tokens they are given, as
mlx-lm's are; a request with a processor marked `stateful`, such as a grammar matcher that must see
each token once, decodes plainly), then top-k / top-p / min-p and the temperature, exactly as a
plain step draws; a seeded request draws every random number of a round from its own key.

When it steps aside (the engine's rule, scheduler.py): a request speculates while it is the only
row decoding. With several rows every row decodes plainly in the shared batch: batching already
spends the memory bandwidth that speculation saves, and rows accept different numbers of drafts,
which the batch's common KV index cannot follow. Its drafter keeps up with the plain steps
(`Speculation.observe`), so speculation resumes as soon as the row is alone again. A round never
drafts past max_tokens, is cut at the first stop token, and leaves the caches holding exactly the
emitted tokens that were fed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..model.cache import AttentionCache, GatedDeltaCache, owned_copy
from ..model.gated_delta.dispatch import MAX_PER_TOKEN_STATES_T
from .draft_vocab import check_draft_vocab, draft_vocab_ids
from .drafters import ModelDrafter, MTPDrafter
from .sampling import RowSampler, _adjusted

# A verify call carries the last token plus the drafts, and per-token states cover up to 8 tokens.
MAX_DRAFT_TOKENS = MAX_PER_TOKEN_STATES_T - 1


def check_num_draft_tokens(k: Any) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise UserError(
            f"num_draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {k!r}"
        )
    return k


def check_draft_model(draft: Any, model: Any) -> None:
    """Raise UserError unless `draft` can draft for `model` ("mtp", a Model, or None)."""
    if draft is None:
        return
    if isinstance(draft, str):
        if draft != "mtp":
            raise UserError(
                f"draft_model {draft!r}: pass 'mtp' (the model's MTP head), a loaded draft "
                "Model, or a checkpoint path to the front door that loads it"
            )
        if getattr(model, "mtp", None) is None:
            reason = getattr(model, "mtp_unavailable", None) or "the model has no MTP head"
            raise UserError(f"cannot draft with the MTP head: {reason}")
        return
    if not hasattr(draft, "make_cache") or not hasattr(draft, "language_model"):
        raise UserError("draft_model must be 'mtp' or a Qwen3.5 Model (mlx_qwen35.load)")
    if draft.args.vocab_size != model.args.vocab_size:
        raise UserError(
            f"the draft model has {draft.args.vocab_size} vocabulary rows, the target "
            f"{model.args.vocab_size}; use a draft of the same family (same tokenizer)"
        )


def head_ids(model: Any, processor: Any, n: int | None) -> np.ndarray | None:
    """The draft vocabulary of `n` ids for this model's tokenizer (None: the whole head).
    Without a processor (no tokenizer) the first n ids: Qwen's ids follow its merge order."""
    n = check_draft_vocab(n, model.args.vocab_size)
    if n is None:
        return None
    cache = vars(model).setdefault("_mlx_qwen35_draft_vocab", {})
    if n not in cache:
        tokenizer = getattr(processor, "tokenizer", None)
        cache[n] = (
            np.arange(n, dtype=np.int32)
            if tokenizer is None
            else draft_vocab_ids(
                tokenizer, n, model.args.vocab_size, getattr(processor, "model_dir", None)
            )
        )
    return cache[n]


class Speculation:
    """One request's speculative decoding: its drafter and draft count."""

    def __init__(self, model: Any, request: Any, processor: Any):
        self.k = request.num_draft_tokens
        ids = head_ids(model, processor, request.draft_vocab)
        draft = request.draft_model
        self.drafter = MTPDrafter(model, ids) if draft == "mtp" else ModelDrafter(draft, ids)

    def start(self, prompt: list[int], done: int) -> None:
        """The row resumes after `done` prompt tokens (prefix cache): a draft model feeds them
        itself; the MTP head starts its pairs at the resume point."""
        if done and isinstance(self.drafter, ModelDrafter):
            self.drafter.catch_up(prompt[:done])

    def positions(self, cache: list[Any], T: int, kwargs: dict) -> mx.array:
        """The target's positions [3, 1, T] of the next prompt chunk (before it runs)."""
        given = kwargs.get("position_ids")
        return given if given is not None else _positions(cache, T)

    def prefill(self, ids: list[int], kwargs: dict, hidden: mx.array, positions: mx.array) -> None:
        """One prompt chunk: its ids, the target's inputs (merged media embeddings), hidden
        states [1, T, H] and positions [3, 1, T]."""
        self.drafter.prefill(
            mx.array(ids, mx.uint32), kwargs.get("input_embeddings"), hidden, positions
        )

    def observe(self, token: mx.array, hidden: mx.array, position: mx.array) -> None:
        """A plain decode step of this row: `token` [1] was fed at `position` [3, 1, 1] and gave
        the target's hidden state [1, 1, H]."""
        self.drafter.observe(token, hidden, position)

    def budget(self, generated: int, max_tokens: int) -> int:
        """Drafts for the next round: a round emits the pending token, up to k drafts, and leaves
        the next token pending, all within max_tokens."""
        return min(self.k, max_tokens - generated - 2)


@dataclass
class Round:
    """What one round produced. tokens: the accepted drafts (all emitted now; cut after a stop
    token); accepted: how many; logits [len(tokens) + 1, V]: the adjusted logits each accepted
    draft and then the next token were drawn from; next_token [1]: the token now pending (not fed;
    None when the round was cut at a stop token)."""

    tokens: list[int]
    accepted: int
    logits: mx.array
    next_token: mx.array | None


def speculative_round(
    model: Any,
    cache: list[Any],
    spec: Speculation,
    sampler: RowSampler,
    token: mx.array,
    k: int,
    stop: frozenset[int],
) -> Round:
    """Draft k tokens after `token` [1] (the row's pending token), verify, accept, roll back.
    `cache`: the row's target cache (a batch of one). The sampler ends fed with the kept tokens."""
    picker = _Picker(sampler)
    sampler.feed(token)
    picker.states.append(sampler.state())
    position = _positions(cache, k + 1)
    drafts = spec.drafter.draft(token, k, picker, position)
    gdn = [c for c in cache if isinstance(c, GatedDeltaCache)]
    for c in gdn:
        c.record_steps = True
    try:
        hidden = model.hidden_states(mx.concatenate([token, *drafts])[None], cache)
    finally:
        for c in gdn:
            c.record_steps = False
    logits = model.language_model.logits(hidden)[0].astype(mx.float32)  # [k + 1, V]
    if sampler.adjusts_logits:
        adjusted = []
        for i in range(k + 1):
            sampler.restore(picker.states[i])
            adjusted.append(_adjusted(sampler, logits[i : i + 1]))
        logits = mx.concatenate(adjusted)
    d = mx.concatenate(drafts)
    if sampler.greedy:
        candidates = mx.argmax(logits, axis=-1)
        ok = candidates[:k] == d
    else:
        p = mx.exp(sampler.distribution(logits))  # [k + 1, V]
        q = mx.exp(mx.concatenate(picker.q))  # [k, V]
        rows = mx.arange(k)
        ok = sampler.uniform(k) * q[rows, d] < p[rows, d]  # probability min(1, p / q)
        residual = mx.maximum(p[:k] - q, 0.0)
        # p == q leaves no residual (and then rejection has probability 0): fall back to p.
        residual = mx.where(residual.sum(-1, keepdims=True) > 0, residual, p[:k])
        candidates = sampler.draw(mx.log(mx.concatenate([residual, p[k:]])))
    n_ok = mx.cumprod(ok.astype(mx.int32)).sum()
    mx.eval(n_ok, candidates, d, logits)
    a = int(n_ok.item())
    tokens = d[:a].tolist()
    cut = next((j for j, t in enumerate(tokens) if t in stop), None)
    if cut is not None:
        a, tokens = cut + 1, tokens[: cut + 1]
    _rewind(cache, [c.steps for c in gdn], keep=a + 1, held=k + 1)
    spec.drafter.commit(a, drafts, hidden[:, : a + 1], position[..., : a + 1])
    sampler.restore(picker.states[a])
    next_token = None if cut is not None else candidates[a : a + 1].astype(mx.uint32)
    return Round(tokens, a, logits[: a + 1], next_token)


class _Picker:
    """Picks the drafts of one round with the row's sampler, feeding each to it (so that the
    next draft and the verification see it) and keeping, when sampling, each draft law q."""

    def __init__(self, sampler: RowSampler):
        self.sampler = sampler
        self.states: list[Any] = []
        self.q: list[mx.array] = []

    def __call__(self, head: Any, hidden: mx.array) -> mx.array:
        s = self.sampler
        logits = head(hidden).astype(mx.float32)
        if s.greedy and not s.adjusts_logits:  # the argmax needs no full-vocabulary row
            idx = mx.argmax(logits, axis=-1)
            d = head.ids[idx] if head.ids is not None else idx
        else:
            adjusted = _adjusted(s, head.full(logits))
            if s.greedy:
                d = mx.argmax(adjusted, axis=-1)
            else:
                q = s.distribution(adjusted)
                d = s.draw(q)
                self.q.append(q)
        d = d.astype(mx.uint32)
        s.feed(d)
        self.states.append(s.state())
        return d


def _positions(cache: list[Any], T: int, batch: int = 1) -> mx.array:
    """Rotary positions [3, batch, T] of the next T tokens of each row of a target cache."""
    kv = next((c for c in cache if isinstance(c, AttentionCache)), None)
    start = mx.array([kv.offset if kv is not None else 0])
    if kv is not None and kv.rope_delta is not None:
        start = start + kv.rope_delta.astype(mx.int32)
    pos = mx.broadcast_to(start[:, None] + mx.arange(T)[None], (batch, T))
    return mx.broadcast_to(pos[None], (3, batch, T))


def decode_positions(cache: list[Any], batch: int) -> mx.array:
    """Positions [3, batch, 1] the batch's next decode step feeds (one token per row)."""
    return _positions(cache, 1, batch)


def _rewind(cache: list[Any], steps: list[Any], *, keep: int, held: int) -> None:
    """Roll the target cache back from `held` tokens of the last verify call to its first
    `keep`: KV caches trimmed, DeltaNet states from the recorded per-token states."""
    linear = iter(steps)
    for c in cache:
        if isinstance(c, AttentionCache):  # plain or quantized KV
            c.trim(held - keep)
        elif isinstance(c, GatedDeltaCache):
            c.steps = next(linear)
            c.keep_steps(keep)
            # Own buffers: a view would keep every recorded state alive and alter later bits.
            c[0], c[1] = owned_copy(c[0]), owned_copy(c[1])


_loaded: dict[str, Any] = {}  # the last draft checkpoint a front door loaded, by resolved path


def resolve_draft_model(draft: Any, model: Any, processor: Any) -> Any:
    """What a front door's `draft_model=` names, as a Request takes it: None, "mtp", a Model,
    or a checkpoint (path or Hub id: loaded once and kept, its tokenizer checked)."""
    if (
        draft is None
        or draft == "mtp"
        or not isinstance(draft, (str, bytes))
        and not hasattr(draft, "__fspath__")
    ):
        check_draft_model(draft, model)
        return draft
    from ..weights.loading import load, resolve_model_path
    from .drafters import check_same_tokenizer

    path = str(resolve_model_path(draft))
    if path not in _loaded:
        _loaded.clear()
        _loaded[path] = load(path)
    draft_model, draft_processor = _loaded[path]
    if processor is not None:
        check_same_tokenizer(processor, draft_processor, str(draft))
    check_draft_model(draft_model, model)
    return draft_model
