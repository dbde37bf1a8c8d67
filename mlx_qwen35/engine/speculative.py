"""Speculative decoding for one sequence: draft k tokens, verify k + 1 in one target forward, keep
the longest acceptable prefix, roll every cache back to it.

    for token, logprobs, from_draft in SpeculativeDecoder(model, prompt, drafter=MTPDrafter(model),
                                                          num_draft_tokens=3, ...):

A round, after the committed tokens ... x_n (x_n sampled, not yet fed to the target):
1. the drafter proposes d_1 .. d_k (drafters.py), each through `Sampling.propose`;
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
a T = k + 1 forward and k + 1 single-token ones). p and q are the *processed* distributions:
logits processors (penalties) see the committed tokens plus the drafts before each position, and
top-k / top-p / min-p / temperature shape both, exactly as the plain sampler draws.

The caches never hold a token the consumer has not seen: a round is cut at the first stop token,
and a consumer that stops iterating mid-round gets the caches rolled back to what it took.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx

from ..errors import UserError
from ..model.cache import GatedDeltaCache, KVCache
from ..model.gated_delta.dispatch import MAX_PER_TOKEN_STATES_T

# A verify call carries the last token plus the drafts, and per-token states cover up to 8 tokens.
MAX_DRAFT_TOKENS = MAX_PER_TOKEN_STATES_T - 1


def check_num_draft_tokens(k: Any) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise UserError(
            f"num_draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {k!r}"
        )
    return k


class Sampling:
    """The distributions a token is drawn from, for plain and speculative steps alike.

    `logprobs(logits, drafted)`: log-softmax of the logits after the logits processors, which see
    the committed tokens plus `drafted` (what a plain step reports as the token's logprobs).
    `shape(logprobs)`: the distribution a token is actually drawn from: top-p, min-p and top-k
    filters (as mlx-lm's sampler applies them, in that order), then the temperature, normalized.
    """

    def __init__(
        self,
        *,
        temp: float,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        logits_processors: Sequence[Any] = (),
        presence_processors: Sequence[Any] = (),
        prompt: mx.array | None = None,
    ):
        self.temp = temp
        self.greedy = temp == 0
        self.top_p, self.top_k, self.min_p = top_p, top_k, min_p
        self.logits_processors = list(logits_processors)
        self.presence_processors = list(presence_processors)
        self.history = prompt if self.logits_processors else None
        self.generated: mx.array | None = None
        self.plain = not self.logits_processors and not self.presence_processors

    def append(self, tokens: mx.array) -> None:
        """Commit tokens [n] to the context the processors see."""
        if self.history is not None:
            self.history = mx.concatenate([self.history, tokens])
        if self.presence_processors:
            self.generated = (
                tokens if self.generated is None else mx.concatenate([self.generated, tokens])
            )

    def logprobs(self, logits: mx.array, drafted: Sequence[mx.array] = ()) -> mx.array:
        """[1, V] log-probabilities after the processors, with `drafted` as extra context."""
        if self.logits_processors:
            history = mx.concatenate([self.history, *drafted]) if drafted else self.history
            for processor in self.logits_processors:
                logits = processor(history, logits)
        if self.presence_processors:
            parts = ([self.generated] if self.generated is not None else []) + list(drafted)
            if parts:
                generated = mx.concatenate(parts) if len(parts) > 1 else parts[0]
                for processor in self.presence_processors:
                    logits = processor(generated, logits)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def shape(self, logprobs: mx.array) -> mx.array:
        """The normalized log-distribution [n, V] tokens are drawn from (not for greedy)."""
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        scaled = logprobs * (1 / self.temp)
        return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)

    def sample(self, logprobs: mx.array) -> mx.array:
        """A token [n] from each row of processed logprobs [n, V] (argmax when greedy)."""
        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        return mx.random.categorical(self.shape(logprobs))


class _Proposer:
    """Picks drafts for one round and keeps what acceptance needs: the draft tokens and, when
    sampling, their processed distributions q."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.drafts: list[mx.array] = []
        self.q: list[mx.array] = []

    def __call__(self, head: Any, hidden: mx.array, i: int) -> mx.array:
        s = self.sampling
        logits = head(hidden)
        if s.greedy and s.plain:  # the argmax needs no full-vocabulary row
            idx = mx.argmax(logits, axis=-1)
            d = head.ids[idx] if head.ids is not None else idx
        else:
            lp = s.logprobs(head.full(logits), self.drafts)
            if s.greedy:
                d = mx.argmax(lp, axis=-1)
            else:
                q = s.shape(lp)
                d = mx.random.categorical(q)
                self.q.append(q)
        d = d.astype(mx.uint32)
        self.drafts.append(d)
        return d


class SpeculativeDecoder:
    """Iterate for (token, logprobs [V], from_draft). `drafted` / `accepted` count draft tokens
    proposed and kept (acceptance rate = accepted / drafted).

    Arguments as `generate_step`'s, plus the drafter (drafters.py), `num_draft_tokens` k and
    `stop_tokens` (a round is cut after the first one). The first token comes from the prompt's
    logits as in plain decoding; rounds then emit 1 to k + 1 tokens each.
    """

    def __init__(
        self,
        model: Any,
        prompt: mx.array,
        *,
        drafter: Any,
        num_draft_tokens: int,
        max_tokens: int,
        sampling: Sampling,
        prefill_step_size: int = 2048,
        cache: list[Any] | None = None,
        on_prefill: Any = None,
        input_embeddings: mx.array | None = None,
        position_ids: mx.array | None = None,
        stop_tokens: Sequence[int] = (),
    ):
        self.model = model
        self.prompt = prompt
        self.drafter = drafter
        self.k = check_num_draft_tokens(num_draft_tokens)
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.prefill_step_size = prefill_step_size
        self.cache = model.make_cache() if cache is None else cache
        self.on_prefill = on_prefill
        self.input_embeddings = input_embeddings
        self.position_ids = position_ids
        self.stop_tokens = set(stop_tokens)
        self.drafted = 0
        self.accepted = 0
        self.rounds = 0

    def __iter__(self) -> Iterator[tuple[int, mx.array, bool]]:
        token, logprobs = self._prefill()
        self.sampling.append(token)
        remaining = self.max_tokens - 1
        yield int(token.item()), logprobs[0], False
        if int(token.item()) in self.stop_tokens:
            return
        while remaining > 0:
            k = min(self.k, remaining - 1)
            if k == 0:  # one token left: a draft could not be kept anyway
                logits = self.model(token[None], cache=self.cache)[:, -1, :]
                lp = self.sampling.logprobs(logits)
                yield int(self.sampling.sample(lp).item()), lp[0], False
                return
            emitted, lps, a, steps = self._round(token, k)
            remaining -= len(emitted)
            for j, tok in enumerate(emitted):
                try:
                    yield tok, lps[j], j < a
                except GeneratorExit:
                    # Stopped after emitted[j]: keep only what the consumer took.
                    _rewind(self.cache, steps, keep=j + 2, held=a + 1)
                    raise
                if tok in self.stop_tokens:
                    return
            token = mx.array([emitted[-1]], dtype=mx.uint32)

    def _prefill(self) -> tuple[mx.array, mx.array]:
        prompt, step = self.prompt, self.prefill_step_size
        emb, pos = self.input_embeddings, self.position_ids
        if emb is not None:
            mx.eval(emb)
        hidden = None
        with_media = emb is not None
        for s in range(0, prompt.size, step):
            e = min(s + step, prompt.size)
            kwargs = {}
            if emb is not None:
                kwargs["input_embeddings"] = emb[:, s:e]
            if pos is not None:
                kwargs["position_ids"] = pos[..., s:e]
            hidden = self.model.hidden_states(prompt[None, s:e], self.cache, **kwargs)
            self.drafter.prefill(
                prompt[s:e],
                emb[:, s:e] if with_media else None,
                hidden,
                pos[..., s:e] if pos is not None else None,
            )
            mx.eval([c.state for c in self.cache])
            if self.on_prefill is not None:
                self.on_prefill(e - s)
        self.drafter.sync_positions(self.cache)
        logits = self.model.language_model.logits(hidden[:, -1:, :])[:, -1, :]
        logprobs = self.sampling.logprobs(logits)
        token = self.sampling.sample(logprobs).astype(mx.uint32)
        mx.eval(token, logprobs)
        return token, logprobs

    def _round(self, token: mx.array, k: int):
        s = self.sampling
        proposer = _Proposer(s)
        drafts = self.drafter.draft(token, k, proposer)
        gdn = [c for c in self.cache if isinstance(c, GatedDeltaCache)]
        for c in gdn:
            c.record_steps = True
        try:
            hidden = self.model.hidden_states(mx.concatenate([token, *drafts])[None], self.cache)
        finally:
            for c in gdn:
                c.record_steps = False
        logits = self.model.language_model.logits(hidden)[0]  # [k + 1, V]
        if s.plain:
            lps = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        else:
            lps = mx.concatenate([s.logprobs(logits[i : i + 1], drafts[:i]) for i in range(k + 1)])
        d = mx.concatenate(drafts)
        if s.greedy:
            best = mx.argmax(lps, axis=-1)
            ok = best[:k] == d
            candidates = best  # the next token after a accepted drafts
        else:
            p = mx.exp(s.shape(lps))  # [k + 1, V]
            q = mx.exp(mx.concatenate(proposer.q))  # [k, V]
            rows = mx.arange(k)
            u = mx.random.uniform(shape=(k,))
            ok = u * q[rows, d] < p[rows, d]  # accept with probability min(1, p / q)
            residual = mx.maximum(p[:k] - q, 0.0)
            # p == q leaves no residual (and then rejection has probability 0): fall back to p.
            residual = mx.where(residual.sum(-1, keepdims=True) > 0, residual, p[:k])
            candidates = mx.random.categorical(mx.log(mx.concatenate([residual, p[k:]])))
        n_ok = mx.cumprod(ok.astype(mx.int32)).sum()
        mx.eval(n_ok, candidates, d, lps)
        a = int(n_ok.item())
        emitted = d[:a].tolist() + [int(candidates[a].item())]
        cut = next((j for j, t in enumerate(emitted) if t in self.stop_tokens), None)
        if cut is not None and cut < a:
            a, emitted = cut + 1, emitted[: cut + 1]  # the stop token is a kept draft
        steps = [c.steps for c in gdn]
        _rewind(self.cache, steps, keep=a + 1, held=k + 1)
        self.drafter.commit(a, drafts, hidden[:, : a + 1])
        self.drafted += k
        self.accepted += a
        self.rounds += 1
        s.append(mx.array(emitted, dtype=mx.uint32))
        return emitted, [lps[j] for j in range(len(emitted))], a, steps


def _rewind(cache: list[Any], steps: list[Any], *, keep: int, held: int) -> None:
    """Roll the target cache back from `held` tokens of the last verify call to its first
    `keep`: KV caches trimmed, DeltaNet states from the recorded per-token states."""
    if keep >= held:
        return
    linear = iter(steps)
    for c in cache:
        if isinstance(c, KVCache):
            c.trim(held - keep)
        elif isinstance(c, GatedDeltaCache):
            c.steps = next(linear)
            c.keep_steps(keep)
