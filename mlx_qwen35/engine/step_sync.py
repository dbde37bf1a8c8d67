"""One engine over several processes: the server with `--distributed` (model/distributed.py).

With a sharded or split model every forward holds collectives, so every rank must run the same
engine steps over the same rows in the same order. Rank 0 takes the requests (the HTTP server);
the other ranks, the followers, run `follow`. At the start of each step rank 0 sends a packet
(JSON bytes, broadcast as an all_sum to which the followers add zeros): the requests submitted
since the last step (what a follower needs to rebuild an identical row) and the uids of the rows
to drop (cancelled, or failed on rank 0), decided once for every rank. A follower rebuilds those
rows, drops those, and runs the same step. The packet travels on the engine's stream, behind the
previous step's collectives, so every rank issues its collectives in the same order.

The tokens are rank 0's on every rank (`agree`: one lazy all_sum in which the followers add
zeros): logits processors (grammars, thinking budgets), seeds and penalties act on rank 0 only,
and a row stops on every rank at the same token. A follower's rows hence sample greedily, and
carry no processors, seeds or log-probabilities.

Requests are text only: embeddings (images, videos), speculative drafts and prefix entries are
refused at `Engine.submit`. In pipeline mode each rank holds other layers, so the prefix caches
would fill and evict differently: the server turns the prefix cache off there (`prefix_cache_ok`).
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import UserError
from .request import MediaSpan, Request, RequestHandle

SHUTDOWN = -1


def prefix_cache_ok(mode: str) -> bool:
    """Whether the ranks' prefix caches stay alike: tensor parallelism gives every rank caches
    of the same shapes (the same bytes, the same evictions); a pipeline does not."""
    return mode == "tensor"


class StepSync:
    """Rank 0's or a follower's end of the per-step agreement (see the module doc)."""

    def __init__(self, group: Any):
        self.group = group
        self.root = group.rank() == 0
        self.handles: dict[int, RequestHandle] = {}  # a follower's requests (kept alive)
        self._packet: dict[str, Any] = {}

    # ---------------------------------------------------------------- called by the engine

    def check(self, request: Request) -> None:
        """Raise UserError for what cannot travel in a packet."""
        if request.input_embeddings is not None or request.position_ids is not None:
            raise UserError(
                "a server started with --distributed serves text only: images and videos need "
                "the server without --distributed"
            )
        if request.draft_model is not None:
            raise UserError("speculative decoding does not run with --distributed")
        if request.prefix is not None or request.cache_owner is not None:
            raise UserError("with --distributed, requests cannot name prefix-cache entries")

    def exchange(self, engine: Any, new: list[Any]) -> tuple[list[Any], set[int]]:
        """(rows to queue, uids of rows to drop) for this step, the same on every rank."""
        if not self.root:
            packet, self._packet = self._packet, {}
            rows = [self._rebuild(engine, d) for d in packet.get("new", ())]
            return rows, set(packet.get("drop", ()))
        rows = [*engine._waiting, *new, engine._prefilling, *engine._running]
        drop = sorted(r.uid for r in rows if r is not None and (r.cancelled or r.failed))
        packet = {"new": [_describe(r) for r in new], "drop": drop} if new or drop else None
        self._broadcast(json.dumps(packet).encode() if packet else b"")
        return new, set(drop)

    def agree(self, tokens: mx.array) -> mx.array:
        """Rank 0's tokens [B], on every rank (lazy)."""
        mine = tokens.astype(mx.int32) if self.root else mx.zeros(tokens.shape, mx.int32)
        return mx.distributed.all_sum(mine, group=self.group).astype(mx.uint32)

    # ---------------------------------------------------------------- driving

    def close(self, engine: Any) -> None:
        """Rank 0: tell the followers to exit (once the engine has stopped stepping). Followers
        already gone (the ring lost them) need no telling."""
        try:
            with mx.stream(engine._stream):
                self._broadcast(None)
        except RuntimeError:
            pass

    def _broadcast(self, data: bytes | None) -> bytes | None:
        """Rank 0's bytes on every rank (None: shut down); followers pass anything."""
        size = (SHUTDOWN if data is None else len(data)) if self.root else 0
        size = int(mx.distributed.all_sum(mx.array([size], mx.int32), group=self.group).item())
        if size <= 0:
            return None if size == SHUTDOWN else b""
        if self.root:
            buf = mx.array(np.frombuffer(data, np.uint8))
        else:
            buf = mx.zeros((size,), mx.uint8)
        return bytes(np.array(mx.distributed.all_sum(buf, group=self.group)))

    def _rebuild(self, engine: Any, d: dict[str, Any]) -> Any:
        request = Request(
            prompt=d["prompt"],
            max_tokens=d["max_tokens"],
            stop_token_ids=set(d["stop"]),
            boundaries=d["boundaries"],
            media_spans=[MediaSpan(*s) for s in d["media_spans"]],
            cache_final=d["cache_final"],
            prefill_step_size=d["prefill_step_size"],
            kv_bits=d["kv_bits"],
            kv_group_size=d["kv_group_size"],
            quantized_kv_start=d["quantized_kv_start"],
        )
        handle = RequestHandle(engine, request, d["uid"])
        self.handles[handle.uid] = handle
        return engine._row(handle)


def follow(engine: Any, sync: StepSync) -> None:
    """A follower's loop: receive rank 0's packet, run the same step, until rank 0 says stop.
    Raises RuntimeError when rank 0 is gone (the ring reports the lost connection)."""
    while True:
        with mx.stream(engine._stream):
            data = sync._broadcast(b"")
        if data is None:
            return
        sync._packet = json.loads(data) if data else {}
        engine.step()
        # Nobody reads a follower's tokens: drop them, and the handles of finished rows.
        for uid, handle in list(sync.handles.items()):
            handle._events.clear()
            if handle.finished:
                del sync.handles[uid]


def _describe(row: Any) -> dict[str, Any]:
    r = row.request
    return {
        "uid": row.uid,
        "prompt": row.prompt,
        "max_tokens": r.max_tokens,
        "stop": sorted(row.stop),
        "boundaries": [int(b) for b in r.boundaries],
        "media_spans": [list(s) for s in r.media_spans],
        "cache_final": r.cache_final,
        "prefill_step_size": r.prefill_step_size,
        "kv_bits": r.kv_bits,
        "kv_group_size": r.kv_group_size,
        "quantized_kv_start": r.quantized_kv_start,
    }
