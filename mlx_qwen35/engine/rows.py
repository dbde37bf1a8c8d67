"""One request inside the engine: its checks, its chunked prefill, its place in the batch.

A row is prefilled alone (batch of one) in chunks of `prefill_step_size` tokens, each chunk ending
early at the next message boundary so that the prefix cache can snapshot the state there. The last
chunk runs the head on the last prompt position only and samples the first token; the row then
joins the decode batch with its cache.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import UserError
from .kv_settings import cache_format, kv_settings
from .prefix_cache import PrefixCache, PrefixEntry
from .request import MediaSpan, Request, RequestHandle
from .sampling import RowSampler, check_prefill_step_size, sample_batch


def check_request(request: Request, model: Any) -> None:
    """Raise UserError for anything the engine cannot run."""
    args = model.args
    prompt = request.prompt
    if not isinstance(prompt, Sequence) or isinstance(prompt, str) or not prompt:
        raise UserError("the prompt must be a non-empty list of token ids")
    vocab = args.vocab_size
    if not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab for t in prompt):
        raise UserError(f"token ids must be integers in [0, {vocab})")
    mt = request.max_tokens
    if not isinstance(mt, int) or isinstance(mt, bool) or mt <= 0:
        raise UserError(f"max_tokens must be a positive integer, got {mt!r}")
    request.sampling.check()
    kv_settings(request).check(args.head_dim)
    if request.prefill_step_size is not None:
        check_prefill_step_size(request.prefill_step_size)
    T = len(prompt)
    for b in request.boundaries:
        if not isinstance(b, int) or not 0 < b <= T:
            raise UserError(f"boundaries must be prompt positions in [1, {T}], got {b!r}")
    for s in request.media_spans:
        if len(s) < 2 or not 0 <= s[0] < s[1] <= T:
            raise UserError(f"media spans must be ranges inside the prompt, got {s!r}")
    if request.draft_model is not None:
        from .draft_vocab import check_draft_vocab
        from .speculative import check_draft_model, check_num_draft_tokens

        check_draft_model(request.draft_model, model)
        check_num_draft_tokens(request.num_draft_tokens)
        check_draft_vocab(request.draft_vocab, vocab)
    if request.prefix is not None:
        n = request.prefix.length
        if (
            not isinstance(request.prefix, PrefixEntry)
            or n >= T
            or tuple(prompt[:n]) != (request.prefix.tokens)
        ):
            raise UserError("the request's prefix is not a prefix-cache entry covering its prompt")


def prepared_media(request: Request, hidden: int) -> tuple[mx.array | None, mx.array | None, int]:
    """(embeddings [1, T', H], positions [3, 1, T'], first prompt position they cover)."""
    T = len(request.prompt)
    emb, pos = request.input_embeddings, request.position_ids
    if emb is not None:
        emb = mx.array(emb) if not isinstance(emb, mx.array) else emb
        emb = emb[None] if emb.ndim == 2 else emb
        if emb.ndim != 3 or emb.shape[0] != 1 or emb.shape[2] != hidden or emb.shape[1] > T:
            raise UserError(
                f"input_embeddings must be [T, {hidden}] for T <= {T} prompt tokens, got "
                f"{list(emb.shape)}"
            )
    if pos is not None:
        pos = mx.array(pos).astype(mx.int32)
        pos = pos[:, None] if pos.ndim == 2 else pos
        covered = emb.shape[1] if emb is not None else T
        if pos.shape != (3, 1, covered):
            raise UserError(
                f"position_ids must be [3, {covered}] (one column per embedded prompt token), "
                f"got {list(pos.shape)}"
            )
    start = T - emb.shape[1] if emb is not None else 0
    if start > 0 and (request.prefix is None or request.prefix.length < start):
        raise UserError(
            f"input_embeddings cover only the last {T - start} prompt tokens; pass a prefix "
            "that covers the rest"
        )
    if emb is not None or pos is not None:
        mx.eval([x for x in (emb, pos) if x is not None])
    return emb, pos, start


def media_spans(request: Request, media_ids: Sequence[int], emb: Any, pos: Any, start: int):
    """The request's media spans with content keys. Given spans are kept (keys computed from the
    embeddings where missing); without any, each run of image/video pad tokens is a span."""
    prompt = list(request.prompt)
    spans = [MediaSpan(*s) for s in request.media_spans]
    if not spans:
        ids = np.asarray(prompt)
        pads = np.isin(ids, list(media_ids))
        edges = np.flatnonzero(np.diff(np.concatenate([[0], pads.astype(np.int8), [0]])))
        spans = [MediaSpan(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    out = []
    for s in spans:
        key = s.key
        if key is None and emb is not None and s.start >= start:
            key = _content_key(emb, pos, s.start - start, s.end - start)
        out.append(MediaSpan(s.start, s.end, key))
    return tuple(out)


def _content_key(emb: mx.array, pos: mx.array | None, a: int, b: int) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.array(emb[0, a:b].astype(mx.float32)).tobytes())
    if pos is not None:
        digest.update(np.array(pos[:, 0, a:b]).tobytes())
    return digest.hexdigest()


class Row:
    """A request's state from admission to its last token."""

    def __init__(
        self,
        handle: RequestHandle,
        model: Any,
        stop_ids: frozenset[int],
        media_ids,
        processor: Any = None,
    ):
        request = handle.request
        self.handle_ref = weakref.ref(handle)
        self.uid = handle.uid
        self.failed = False  # failed on rank 0 and left for the next step (step_sync.py)
        self.stats = handle.stats
        self.request = request
        self.prompt = [int(t) for t in request.prompt]
        self.max_tokens = request.max_tokens
        self.stop = (
            frozenset(request.stop_token_ids) if request.stop_token_ids is not None else (stop_ids)
        )
        self.vocab = model.args.vocab_size
        self.sampler: RowSampler | None = None  # made on the engine's stream, at admission
        self.kv = kv_settings(request)
        self.emb, self.pos, self.emb_start = prepared_media(request, model.args.hidden_size)
        self.media_ids = frozenset(media_ids)
        self.media = media_spans(request, media_ids, self.emb, self.pos, self.emb_start)
        self.cache: list[Any] | None = None  # while prefilling (one row)
        self.done = 0  # prompt tokens in the cache
        self.generated: list[int] = []
        self.fed = 0  # tokens (prompt and generated) the cache holds
        self.first_token_time = 0.0
        self.prefill_start = 0.0
        self.spec = None  # speculative decoding (speculative.py)
        if request.draft_model is not None and not _stateful(request.logits_processors):
            from .speculative import Speculation

            self.spec = Speculation(model, request, processor)

    @property
    def handle(self) -> RequestHandle | None:
        return self.handle_ref()

    @property
    def cancelled(self) -> bool:
        handle = self.handle
        return handle is None or handle.cancelled

    # ---------------------------------------------------------------- admission and prefill

    def admit(self, model: Any, prefix_cache: PrefixCache) -> None:
        """Pick the resume point and make the row's cache and sampler. (Run by the engine: arrays
        made lazily on the submitting thread's stream could not be evaluated on another.)"""
        self.sampler = RowSampler(self.request, self.vocab)
        entry = self.request.prefix
        if entry is None:
            entry = prefix_cache.lookup(self.prompt, self.media, self.kv)
            if entry is not None and entry.length < self.emb_start:
                entry = None
        if entry is not None:
            self.cache = entry.make_cache()
            self.done = entry.length
        else:
            self.cache = model.make_cache()
            self.done = 0
        if self.kv.due(self.cache, self.done):  # quantized_kv_start 0: quantized from the start
            self.kv.convert(self.cache)
        self.stats.cached_tokens = self.done
        if self.spec is not None:
            self.spec.start(self.prompt, self.done)
        self.prefill_start = time.perf_counter()
        T = len(self.prompt)
        inside = [s for s in self.media if s.start < s.end]
        self.boundaries = sorted(
            {
                b
                for b in self.request.boundaries
                if self.done < b <= T and not any(s.start < b < s.end for s in inside)
            }
        )
        if self.emb is None and any(t in self.media_ids for t in self.prompt[self.done :]):
            raise UserError(
                "the prompt holds image or video tokens but no input_embeddings; pass the "
                "embeddings from Model.prepare_inputs"
            )

    def prefill_chunk(self, model: Any, step_size: int, prefix_cache: PrefixCache) -> bool:
        """Run one prefill chunk; True when the prompt is done (the first token is pending)."""
        T = len(self.prompt)
        a = self.done
        b = min(a + (self.request.prefill_step_size or step_size), T)
        if self.boundaries:
            b = min(b, self.boundaries[0])
        b = self.kv.cut(a, b)  # the cache changes format after exactly quantized_kv_start tokens
        kwargs = self._chunk_inputs(a, b)
        inputs = None if "input_embeddings" in kwargs else mx.array([self.prompt[a:b]], mx.uint32)
        positions = self.spec.positions(self.cache, b - a, kwargs) if self.spec else None
        # A chunk before the last only fills the caches, unless a drafter reads its hidden states.
        fill_only = b < T and self.spec is None
        hidden = model.hidden_states(inputs, self.cache, fill_only=fill_only, **kwargs)
        if self.spec is not None:  # the drafter follows the prompt chunk by chunk
            self.spec.prefill(self.prompt[a:b], kwargs, hidden, positions)
        if b < T:
            mx.eval([c.state for c in self.cache])
        else:
            self.logits = model.language_model.logits(hidden[:, -1:, :])[:, -1, :]
        if self.kv.due(self.cache, b):
            self.kv.convert(self.cache)
        self.done = b
        self.stats.prefilled_tokens += b - a
        if self.boundaries and self.boundaries[0] == b:
            self.boundaries.pop(0)
            self._snapshot(prefix_cache, b, kind="boundary")
        mx.clear_cache()
        if self.request.on_prefill is not None:
            self.request.on_prefill(b, T)
        return b == T

    def _chunk_inputs(self, a: int, b: int) -> dict[str, mx.array]:
        out = {}
        if self.emb is not None:
            out["input_embeddings"] = self.emb[:, a - self.emb_start : b - self.emb_start]
        if self.pos is not None:
            out["position_ids"] = self.pos[..., a - self.emb_start : b - self.emb_start]
        return out

    def kv_format(self) -> tuple[int, int, int] | None:
        """The format of the row's KV cache now (the batch it joins): None while plain."""
        return cache_format(self.cache, self.kv)

    def first_token(self) -> tuple[mx.array, mx.array, Any]:
        """Sample the first token from the last prompt position's logits (lazily)."""
        tokens, logits, top = sample_batch(self.logits, [self.sampler], None)
        del self.logits
        self.fed = len(self.prompt)
        return tokens, logits, top

    def _snapshot(self, prefix_cache: PrefixCache, n: int, kind: str) -> None:
        tokens = (self.prompt + self.generated)[:n]
        kv_format = self.kv_format()
        owner = self.request.cache_owner
        if kind == "boundary" and prefix_cache.adopt(tokens, self.media, owner, kv_format):
            return
        if not prefix_cache.max_bytes:
            return
        entry = PrefixEntry.from_cache(
            self.cache, tokens, self.media, kind=kind, owner=owner, kv_format=kv_format
        )
        prefix_cache.insert(entry)

    def keep_final(self, cache: list[Any], prefix_cache: PrefixCache) -> None:
        """Snapshot the state after the reply (its one-row cache holds `fed` tokens)."""
        if not prefix_cache.max_bytes:
            return
        tokens = (self.prompt + self.generated)[: self.fed]
        entry = PrefixEntry.from_cache(
            cache,
            tokens,
            self.media,
            kind="final",
            owner=self.request.cache_owner,
            kv_format=cache_format(cache, self.kv),
        )
        prefix_cache.insert(entry)


def _stateful(processors: Sequence[Any]) -> bool:
    """Whether a logits processor must see each token once, in order (a grammar matcher):
    speculation, which shows processors draft tokens that may be rejected, steps aside then."""
    return any(getattr(p, "stateful", False) for p in processors)
