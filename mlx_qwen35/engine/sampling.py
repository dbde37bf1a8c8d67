"""The one sampler: every request's settings, per row of a batch.

For each row, in this order: its logits processors (given the prompt and the tokens generated so
far), the repetition penalty (last `repetition_context_size` tokens, prompt included), presence and
frequency penalties (generated tokens), then a token is drawn:
- temp 0: the argmax;
- top_k > 0: among the top_k candidates, cut further by top_p and min_p;
- otherwise: over the whole vocabulary, cut by top_p (a full sort, as mlx-lm) and min_p.
The cuts follow mlx-lm's sampler (on the log-probabilities before temperature; top_p keeps the
tokens with less than top_p of the mass above them) and a token is drawn by the Gumbel-max trick:
argmax(logprob / temp + Gumbel noise). A seeded request draws its noise from its own key, split
once per token, over a shape that depends only on its own settings: whatever shares its batch,
the same seed gives the same samples. Unseeded rows share MLX's global generator.

`RowSampler` holds one request's state (penalty counts, its key, its token history for the
processors); `sample_batch` draws the next token of every row of a batch at once. The
log-probabilities are not computed here: a TokenEvent normalises its logits row when read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from ..errors import UserError
from .request import MAX_SEED, Request, SamplingParams

__all__ = ["MAX_SEED", "RowSampler", "check_prefill_step_size", "check_sampling", "sample_batch"]


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
    frequency_penalty: float | None = None,
    seed: int | None = None,
) -> None:
    """Raise UserError, saying what to pass instead, for any out-of-range setting."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
        raise UserError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    SamplingParams(
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
    ).check()
    check_prefill_step_size(prefill_step_size)


def check_prefill_step_size(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"prefill_step_size must be a positive integer, got {value!r}")


class RowSampler:
    """One request's sampling state: what its next token depends on besides the logits."""

    def __init__(self, request: Request, vocab: int):
        p = request.sampling
        self.params = p
        self.vocab = vocab
        self.processors = list(request.logits_processors)
        self.key = mx.random.key(p.seed) if p.seed is not None else None
        prompt = mx.array(list(request.prompt), dtype=mx.int32)
        # Token history for the processors: the prompt and every generated token.
        self.history = prompt if self.processors else None
        self.window = None  # the repetition penalty's last tokens
        if p.repetition_penalty is not None and p.repetition_penalty != 1.0:
            self.window = prompt[-p.repetition_context_size :]
        self.counts = None  # occurrences of each generated token
        if p.presence_penalty or p.frequency_penalty:
            self.counts = mx.zeros((1, vocab), mx.float32)
        self.error: BaseException | None = None  # raised by a logits processor: the row fails
        # Made by the engine when it admits the request (rows.py), on its own stream: arrays made
        # lazily on a submitting thread's stream could not be computed by the engine's thread.

    @property
    def greedy(self) -> bool:
        return self.params.temp == 0

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.processors) or self.window is not None or self.counts is not None

    def feed(self, token: mx.array) -> None:
        """Record the generated token [1] now fed to the model (lazily)."""
        if self.history is not None:
            self.history = mx.concatenate([self.history, token.astype(mx.int32)])
        if self.window is not None:
            size = self.params.repetition_context_size
            self.window = mx.concatenate([self.window, token.astype(mx.int32)])[-size:]
        if self.counts is not None:
            self.counts = self.counts.at[0, token].add(1.0)

    def adjust(self, logits: mx.array) -> mx.array:
        """Processors and penalties on this row's logits [1, V]."""
        for processor in self.processors:
            logits = processor(self.history, logits)
        p = self.params
        if self.window is not None and self.window.size:
            seen = mx.zeros((1, self.vocab), mx.int32).at[0, self.window].add(1) > 0
            penalty = p.repetition_penalty
            penalised = mx.where(logits < 0, logits * penalty, logits / penalty)
            logits = mx.where(seen, penalised, logits)
        if self.counts is not None:
            if p.presence_penalty:
                logits = logits - p.presence_penalty * (self.counts > 0)
            if p.frequency_penalty:
                logits = logits - p.frequency_penalty * self.counts
        return logits

    def noise(self, n: int) -> mx.array | None:
        """Gumbel noise [n] from this request's own key (None when unseeded)."""
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return mx.random.gumbel((n,), key=sub)

    # Speculative decoding (speculative.py) needs what `sample_batch` only uses inside: the law a
    # token is drawn from, draws from other laws with this row's random stream, and the state the
    # penalties depend on, to adjust logits as if draft tokens had been fed and then roll back.

    def state(self) -> tuple[Any, Any, Any]:
        """What `feed` changes (history, repetition window, counts): to restore with `restore`."""
        return self.history, self.window, self.counts

    def restore(self, state: tuple[Any, Any, Any]) -> None:
        self.history, self.window, self.counts = state

    def distribution(self, logits: mx.array) -> mx.array:
        """The log-probabilities [n, V] that `sample_batch` draws this row's token from, for
        adjusted logits [n, V]: the top_k, top_p and min_p cuts, then the temperature (not for
        greedy rows, which take the argmax)."""
        p = self.params
        x = logits.astype(mx.float32)
        vocab = x.shape[-1]
        keep = mx.ones(x.shape, mx.bool_)
        if 0 < p.top_k < vocab:
            kth = -mx.partition(-x, kth=p.top_k - 1, axis=-1)[:, p.top_k - 1 : p.top_k]
            keep = keep & (x >= kth)
        if p.top_p < 1.0:
            vals = mx.sort(x, axis=-1)[:, ::-1]
            top_p = mx.full((x.shape[0], 1), p.top_p, mx.float32)
            keep = keep & (x >= _top_p_threshold(x, vals, top_p))
        if p.min_p > 0:
            keep = keep & (x >= mx.max(x, axis=-1, keepdims=True) + math.log(p.min_p))
        scores = mx.where(keep, x / p.temp, -math.inf)
        return scores - mx.logsumexp(scores, axis=-1, keepdims=True)

    def draw(self, logprobs: mx.array) -> mx.array:
        """One token [n] from each row of log-probabilities [n, V] (Gumbel-max), with this row's
        random stream."""
        n, vocab = logprobs.shape
        own = self.noise(n * vocab)
        noise = mx.random.gumbel((n, vocab)) if own is None else own.reshape(n, vocab)
        return mx.argmax(logprobs + noise, axis=-1)

    def uniform(self, n: int) -> mx.array:
        """n uniform numbers in (0, 1) from this row's random stream."""
        own = self.noise(n)
        g = mx.random.gumbel((n,)) if own is None else own
        return mx.exp(-mx.exp(-g))  # the Gumbel CDF maps Gumbel noise to uniform


def sample_batch(
    logits: mx.array, rows: Sequence[RowSampler], fed: mx.array | None
) -> tuple[mx.array, mx.array, tuple[mx.array, mx.array] | None]:
    """Next tokens for a batch.

    logits: [B, V] from the model; rows: each row's sampler; fed: the tokens [B] just fed to the
    model (None for a first token after the prompt). Returns (tokens [B] uint32, the adjusted
    logits [B, V] the tokens were drawn from, and for rows that asked, the top log-probabilities
    (ids [B, k], values [B, k]) with k the largest request).
    """
    if logits.dtype != mx.float32:
        logits = logits.astype(mx.float32)
    if fed is not None:
        for i, row in enumerate(rows):
            row.feed(fed[i : i + 1])
    if any(row.adjusts_logits for row in rows):
        logits = mx.concatenate([_adjusted(row, logits[i : i + 1]) for i, row in enumerate(rows)])
    tokens = mx.argmax(logits, axis=-1).astype(mx.uint32)
    candidates = [i for i, r in enumerate(rows) if not r.greedy and r.params.top_k > 0]
    full = [i for i, r in enumerate(rows) if not r.greedy and r.params.top_k == 0]
    if candidates:
        tokens = _place(tokens, candidates, _sample_candidates(logits, rows, candidates))
    if full:
        tokens = _place(tokens, full, _sample_full(logits, rows, full))
    return tokens, logits, _top_logprobs(logits, rows)


def _adjusted(row: RowSampler, logits: mx.array) -> mx.array:
    """The row's adjusted logits; a processor that fails (or returns another shape) fails only
    its own row, which then keeps the logits as they were."""
    if not row.adjusts_logits or row.error is not None:
        return logits
    try:
        out = row.adjust(logits)
        if out.shape != logits.shape:
            raise UserError(
                f"a logits processor returned shape {list(out.shape)}, expected "
                f"{list(logits.shape)}"
            )
        return out.astype(mx.float32)
    except Exception as e:
        row.error = e
        return logits


def _place(tokens: mx.array, idx: list[int], values: mx.array) -> mx.array:
    if len(idx) == tokens.size:
        return values.astype(tokens.dtype)
    tokens[mx.array(idx)] = values.astype(tokens.dtype)
    return tokens


def _column(rows: Sequence[RowSampler], idx: list[int], name: str) -> mx.array:
    return mx.array([float(getattr(rows[i].params, name)) for i in idx], mx.float32)[:, None]


def _noise(rows: Sequence[RowSampler], idx: list[int], sizes: list[int], width: int) -> mx.array:
    """Gumbel noise [len(idx), width]: a seeded row's first `size` columns from its own key."""
    shared = None
    out = []
    for j, i in enumerate(idx):
        own = rows[i].noise(sizes[j])
        if own is None:
            if shared is None:
                shared = mx.random.gumbel((len(idx), width))
            out.append(shared[j])
        else:
            out.append(mx.pad(own, (0, width - sizes[j])) if sizes[j] < width else own)
    return mx.stack(out)


def _sample_candidates(logits: mx.array, rows: Sequence[RowSampler], idx: list[int]) -> mx.array:
    """Rows with top_k: draw among each row's top_k tokens, cut by top_p and min_p."""
    x = logits[mx.array(idx)]
    vocab = x.shape[-1]
    ks = [min(rows[i].params.top_k, vocab) for i in idx]
    K = max(ks)
    cand = mx.argpartition(-x, kth=K - 1, axis=-1)[:, :K] if K < vocab else None
    vals = mx.take_along_axis(x, cand, axis=-1) if cand is not None else x
    order = mx.argsort(-vals, axis=-1)
    vals = mx.take_along_axis(vals, order, axis=-1)
    cand = mx.take_along_axis(cand, order, axis=-1) if cand is not None else order
    keep = mx.arange(K)[None] < mx.array(ks)[:, None]
    keep = _cut(keep, x, vals, rows, idx)
    scores = mx.where(keep, vals / _column(rows, idx, "temp"), -math.inf)
    scores = scores + _noise(rows, idx, ks, K)
    choice = mx.argmax(scores, axis=-1)
    return mx.take_along_axis(cand, choice[:, None], axis=-1)[:, 0]


def _sample_full(logits: mx.array, rows: Sequence[RowSampler], idx: list[int]) -> mx.array:
    """Rows without top_k: draw over the whole vocabulary, cut by top_p and min_p."""
    x = logits[mx.array(idx)]
    vocab = x.shape[-1]
    keep = mx.ones(x.shape, mx.bool_)
    if any(rows[i].params.top_p < 1.0 for i in idx):
        vals = mx.sort(x, axis=-1)[:, ::-1]
        threshold = _top_p_threshold(x, vals, _column(rows, idx, "top_p"))
        keep = keep & (x >= threshold)
    if any(rows[i].params.min_p > 0 for i in idx):
        keep = keep & (x >= _min_p_threshold(mx.max(x, axis=-1, keepdims=True), rows, idx))
    scores = mx.where(keep, x / _column(rows, idx, "temp"), -math.inf)
    scores = scores + _noise(rows, idx, [vocab] * len(idx), vocab)
    return mx.argmax(scores, axis=-1)


def _cut(
    keep: mx.array, x: mx.array, vals: mx.array, rows: Sequence[RowSampler], idx: list[int]
) -> mx.array:
    """`keep` [n, K] narrowed by top_p and min_p; vals [n, K] sorted best first."""
    if any(rows[i].params.top_p < 1.0 for i in idx):
        threshold = _top_p_threshold(x, vals, _column(rows, idx, "top_p"))
        keep = keep & (vals >= threshold)
    if any(rows[i].params.min_p > 0 for i in idx):
        keep = keep & (vals >= _min_p_threshold(vals[:, :1], rows, idx))
    return keep


def _top_p_threshold(x: mx.array, vals: mx.array, top_p: mx.array) -> mx.array:
    """[n, 1]: the lowest logit top_p keeps. A token stays while the probability mass of the
    tokens above it is below top_p (mlx-lm's rule); vals: [n, K] best first (K may be < V: a row
    whose cut falls beyond K keeps all K, which its top_k then decides)."""
    lse = mx.logsumexp(x, axis=-1, keepdims=True)
    probs = mx.exp(vals - lse)
    above = mx.cumsum(probs, axis=-1) - probs
    kept = mx.sum(above < top_p, axis=-1, keepdims=True)  # >= 1: nothing is above the first
    threshold = mx.take_along_axis(vals, kept - 1, axis=-1)
    # top_p = 1 is off (rounding must not cut the far tail).
    return mx.where(top_p >= 1.0, -math.inf, threshold)


def _min_p_threshold(best: mx.array, rows: Sequence[RowSampler], idx: list[int]) -> mx.array:
    min_p = [rows[i].params.min_p for i in idx]
    logs = mx.array([math.log(p) if p > 0 else -math.inf for p in min_p], mx.float32)
    return best + logs[:, None]


def _top_logprobs(logits: mx.array, rows: Sequence[RowSampler]) -> tuple[mx.array, mx.array] | None:
    k = max(row.params.top_logprobs for row in rows)
    if not k:
        return None
    k = min(k, logits.shape[-1])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
    vals = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(vals, order, axis=-1)
