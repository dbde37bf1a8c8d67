"""Continuous batching: rows of different lengths (text, an image, a video) that join and leave
mid-decode give each request what it gives alone; finished and cancelled rows free their caches;
decode steps update the KV in place; the Metal kernels take batches (emulated)."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import build_hf_model, save_hf_checkpoint
from metal_emu import emulate_metal, skip_unless_kernels_can_run
from test_multimodal import Prompt
from test_vision import sharpen

from mlx_qwen35.engine.request import Request
from mlx_qwen35.engine.scheduler import Engine
from mlx_qwen35.model.cache import KVCache
from mlx_qwen35.weights.loading import load_model

TOL = 1e-4


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    """Our model from a perturbed HF checkpoint with a vision tower (fp32)."""
    hf = build_hf_model(vision=True)
    sharpen(hf.model.visual)
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("hf-vision") / "ckpt", keep_vision=True)
    return load_model(path)


def request(model, prompt: Prompt, max_tokens: int) -> Request:
    media = {k: v for k, v in prompt.media.items() if v is not None}
    if not media:
        return Request(prompt=prompt.ids, max_tokens=max_tokens)
    embeddings, positions = model.prepare_inputs(prompt.array(), **media)
    return Request(
        prompt=prompt.ids,
        max_tokens=max_tokens,
        input_embeddings=embeddings[0],
        position_ids=positions[:, 0],
    )


def alone(model, req: Request) -> tuple[list[int], list[np.ndarray]]:
    events = list(Engine(model, prefix_cache_bytes=0).submit(copy.copy(req)))
    return [e.token for e in events], [np.array(e.logprobs) for e in events]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def requests(model) -> dict[str, Request]:
    return {
        "short": request(model, Prompt(1).text(7), 9),
        "long": request(model, Prompt(2).text(23), 12),
        "image": request(model, Prompt(3).text(4).image(6, 8).text(5), 10),
        "video": request(model, Prompt(4).text(2).video(2, 4, 6).text(3), 8),
        "late": request(model, Prompt(5).text(40), 6),
    }


def test_rows_joining_and_leaving_match_each_request_alone(vision_model):
    model = vision_model
    reqs = requests(model)
    expected = {name: alone(model, r) for name, r in reqs.items()}
    # Small prefill chunks: the later prompts are prefilled over several steps while the
    # earlier rows decode; "short" leaves while the others go on; "late" joins last.
    engine = Engine(model, prefill_step_size=16, prefix_cache_bytes=0)
    handles = {n: engine.submit(reqs[n]) for n in ("short", "long")}
    schedule = [(3, "image"), (3, "video"), (2, "late")]
    sizes = []
    for steps, name in schedule:
        for _ in range(steps):
            engine.step()
            sizes.append(engine.num_running)
        handles[name] = engine.submit(reqs[name])
    got = {n: [(e.token, np.array(e.logprobs)) for e in h] for n, h in handles.items()}
    assert max(sizes) >= 3  # rows really were decoded together
    for name, (tokens, logprobs) in expected.items():
        assert [t for t, _ in got[name]] == tokens, name
        err = max(rel_err(lp, ref) for (_, lp), ref in zip(got[name], logprobs, strict=True))
        assert err < TOL, (name, err)
        assert handles[name].stats.finish_reason == "length"


def test_finished_and_cancelled_rows_free_their_caches(vision_model):
    model = vision_model
    reqs = requests(model)
    engine = Engine(model, prefix_cache_bytes=0)
    list(engine.submit(copy.copy(reqs["short"])))  # warm-up: compiled functions, constants
    mx.clear_cache()
    idle = mx.get_active_memory()

    handles = [engine.submit(copy.copy(r)) for r in reqs.values()]
    while engine.num_running < len(handles):
        engine.step()
    kv = next(c for c in engine._cache if isinstance(c, KVCache))
    assert kv.batch_size == len(handles)
    handles[1].cancel()
    engine.step()
    assert engine.num_running == len(handles) - 1 and kv.batch_size == len(handles) - 1
    assert handles[1].stats.finish_reason == "cancelled" and list(handles[1]) == []
    dropped = handles.pop(2)
    del dropped  # a handle nobody holds any more cancels its request
    engine.step()
    assert engine.num_running == len(handles) - 1
    for h in handles:
        for _ in h:
            pass
    assert not engine.has_work() and engine._cache is None
    del handles, h, kv
    mx.clear_cache()
    assert mx.get_active_memory() <= idle + 64 * 1024


def _ptr(x: mx.array) -> int:
    return np.asarray(x).__array_interface__["data"][0]


def test_decode_steps_update_the_kv_buffer_in_place(vision_model):
    model = vision_model
    reqs = requests(model)
    engine = Engine(model, prefix_cache_bytes=0)
    handles = [engine.submit(copy.copy(reqs[n])) for n in ("short", "long", "late")]
    while engine.num_running < 3:
        engine.step()
    kv = next(c for c in engine._cache if isinstance(c, KVCache))
    engine.step()
    mx.eval(kv.keys, kv.values)
    before = (_ptr(kv.keys), _ptr(kv.values), kv.offset)
    for _ in range(3):
        engine.step()
    mx.eval(kv.keys, kv.values)
    assert kv.offset == before[2] + 3 and kv.keys.shape[2] > kv.offset
    assert (_ptr(kv.keys), _ptr(kv.values)) == before[:2]
    for h in handles:
        h.cancel()


@pytest.mark.parametrize("rows", [2, 3])
def test_metal_kernels_decode_batches(vision_model, monkeypatch, rows):
    skip_unless_kernels_can_run()
    model = vision_model
    reqs = [request(model, Prompt(10 + i).text(5 + 7 * i), 4) for i in range(rows)]
    expected = [alone(model, r) for r in reqs]
    emu = emulate_metal(monkeypatch)
    monkeypatch.setenv("MLX_QWEN35_GDN_BACKEND", "metal")
    engine = Engine(model, prefix_cache_bytes=0)
    handles = [engine.submit(copy.copy(r)) for r in reqs]
    got = [[(e.token, np.array(e.logprobs)) for e in h] for h in handles]
    for (tokens, logprobs), out in zip(expected, got, strict=True):
        assert [t for t, _ in out] == tokens
        assert max(rel_err(lp, ref) for (_, lp), ref in zip(out, logprobs, strict=True)) < TOL
    batches = {c.input_shapes[0][0] for c in emu.calls}
    assert rows in batches  # the fused decode kernel ran with all rows at once
