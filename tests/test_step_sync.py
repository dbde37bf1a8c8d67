"""The engine under a StepSync, in one process (a group of one, rank 0): the packets announce each
request once and every row to drop, a failing logits processor fails its request at once and its
row leaves at the next step by agreement, and what cannot travel in a packet is refused."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from test_engine import script, successor

from mlx_qwen35.engine.request import Request
from mlx_qwen35.engine.scheduler import Engine
from mlx_qwen35.engine.step_sync import StepSync
from mlx_qwen35.errors import UserError
from mlx_qwen35.weights.loading import load_model
from mlx_qwen35.weights.scripted import script_model


@pytest.fixture(scope="module")
def scripted(hf_checkpoint):
    _, path = hf_checkpoint("base")
    model = load_model(path)
    script_model(model, {t: successor(t) for t in range(300)})
    return model


def synced(model) -> tuple[Engine, list[dict]]:
    engine = Engine(model)
    engine.sync = StepSync(mx.distributed.init())
    packets: list[dict] = []
    broadcast = engine.sync._broadcast

    def recording(data):
        if data:
            packets.append(json.loads(data))
        return broadcast(data)

    engine.sync._broadcast = recording
    return engine, packets


def test_packets_announce_requests_and_the_rows_to_drop(scripted):
    engine, packets = synced(scripted)
    a = engine.submit(Request(prompt=[1, 2, 3], max_tokens=6, stop_token_ids={299}))
    b = engine.submit(Request(prompt=[4, 5], max_tokens=50, boundaries=[1]))
    events = iter(b)
    next(events)
    b.cancel()
    assert [e.token for e in a] == script([1, 2, 3], 6)
    assert list(events) == [] and b.stats.finish_reason == "cancelled"
    announced = [d for p in packets for d in p["new"]]
    assert [(d["uid"], d["prompt"], d["max_tokens"]) for d in announced] == [
        (a.uid, [1, 2, 3], 6),
        (b.uid, [4, 5], 50),
    ]
    assert announced[0]["stop"] == [299] and announced[1]["boundaries"] == [1]
    assert [p["drop"] for p in packets if p["drop"]] == [[b.uid]]  # decided once
    assert not engine.has_work()


def test_a_failing_processor_fails_at_once_and_leaves_by_agreement(scripted):
    def broken(tokens, logits):
        if tokens.size > 6:
            raise ValueError("grammar broke")
        return logits

    engine, packets = synced(scripted)
    bad = engine.submit(Request(prompt=[1, 2, 3], max_tokens=10, logits_processors=[broken]))
    good = engine.submit(Request(prompt=[4, 5], max_tokens=10))
    got = []
    with pytest.raises(ValueError, match="grammar broke"):
        for e in bad:
            got.append(e.token)
    assert got == script([1, 2, 3], len(got)) and bad.stats.finish_reason == "error"
    assert [e.token for e in good] == script([4, 5], 10)
    assert [bad.uid] in [p["drop"] for p in packets]  # the followers drop it too


def test_what_cannot_travel_is_refused(scripted):
    engine, _ = synced(scripted)
    with pytest.raises(UserError, match="text only"):
        engine.submit(Request(prompt=[1, 2], max_tokens=2, input_embeddings=mx.zeros((2, 64))))
    with pytest.raises(UserError, match="speculative decoding"):
        engine.submit(Request(prompt=[1, 2], max_tokens=2, draft_model=scripted))
    with pytest.raises(UserError, match="prefix-cache"):
        engine.submit(Request(prompt=[1, 2], max_tokens=2, cache_owner="me"))
