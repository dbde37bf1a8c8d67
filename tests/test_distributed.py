"""Tensor and pipeline parallelism over `mx.distributed`: two processes launched by
`mlx.launch --backend ring -n 2` on 127.0.0.1 give the single-process logits (full forward and
prefill + decode) for a dense and an MoE checkpoint; `python -m mlx_qwen35.generate --distributed`
prints the single-process reply once, from rank 0."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from distributed_worker import logits
from hf_reference import build_hf_model, build_hf_moe_model, save_hf_checkpoint

from mlx_qwen35.errors import UserError
from mlx_qwen35.model.distributed import pipeline, shard
from mlx_qwen35.weights.loading import load_model
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

TOL = 1e-4
HERE = Path(__file__).parent
LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
pytestmark = pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch not installed")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def free_port() -> int:
    """A starting port with the next one free too (the ring gives each rank its own)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def launch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    command = [LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(free_port())]
    done = subprocess.run(
        [*command, sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=HERE.parent,
    )
    # mlx.launch exits 0 even when a rank fails; it says so on stderr.
    assert "exited with code" not in done.stderr, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    # One KV head for two ranks: tensor parallelism must repeat it.
    dense = build_hf_model("base", num_key_value_heads=1, seed=4)
    moe = build_hf_moe_model("moe", seed=6)
    return {
        "dense": save_hf_checkpoint(dense, root / "dense", keep_vision=False),
        "moe": save_hf_checkpoint(moe, root / "moe", keep_vision=False),
    }


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_two_processes_give_the_single_process_logits(checkpoints, tmp_path, kind, mode):
    path = checkpoints[kind]
    single = logits(load_model(path, "float32"))
    out = tmp_path / "rank0.npz"
    done = launch(str(HERE / "distributed_worker.py"), str(path), mode, str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(out)
    assert int(got["size"]) == 2
    for name in ("full", "incremental"):
        assert rel_err(got[name], single[name]) < TOL, name


def test_generate_cli_prints_the_single_process_reply_once(tmp_path):
    ckpt = ensure_tiny_random(tmp_path / "tiny")
    args = ["-m", "mlx_qwen35.generate", "--model", str(ckpt), "--prompt", "hi", "-m", "12"]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    single = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert single.returncode == 0, single.stderr
    reply = single.stdout.strip()
    assert reply
    for mode in ("tensor", "pipeline"):
        done = launch(*args, "--distributed", mode)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip() == reply  # printed once (rank 0), the same tokens


class _Group:
    """A stand-in group for checks that fail before any communication."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_uneven_heads_and_bad_splits_are_refused(checkpoints):
    model = load_model(checkpoints["dense"], "float32", lazy=True)
    with pytest.raises(UserError, match="num_attention_heads=4.*--distributed pipeline"):
        shard(model, _Group(3))
    with pytest.raises(UserError, match="at least one layer"):
        pipeline(model, _Group(2), split=[4, 0])


def test_pipeline_keeps_only_its_layers(checkpoints):
    model = load_model(checkpoints["moe"], "float32", lazy=True)
    pipeline(model, _Group(2, rank=1))  # the first two layers
    kept = [layer is not None for layer in model.layers]
    assert kept == [True, True, False, False]
    assert model.language_model.model.first_attention == 1
    mx.eval(model.parameters())  # only what this rank keeps is read
