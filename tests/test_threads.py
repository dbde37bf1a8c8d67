"""Generation on worker threads, then a clean interpreter exit (a subprocess).

MLX keeps its compile cache and random key per thread and frees them when the thread's OS-level
exit runs, which may be after join() has returned and the main thread has begun to finalize: the
process then aborted ("terminate called without an active exception", exit 134). The script
below makes that race certain where it can (glibc): each worker delays its OS-level exit by
100 ms, and the main thread releases the GIL while finalizing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlx_qwen35.weights.tiny_random import CACHE_ENV, ensure_tiny_random

SCRIPT = r"""
import ctypes
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx_qwen35

model, processor = mlx_qwen35.load("tiny-random")
libc = ctypes.CDLL(None)
thread_atexit = getattr(libc, "__cxa_thread_atexit_impl", None)


def delay_os_thread_exit():
    # Thread-exit destructors run last in, first out: this usleep(100 ms) runs before MLX's.
    if thread_atexit is not None:
        usleep = ctypes.cast(libc.usleep, ctypes.c_void_p)
        thread_atexit(usleep, ctypes.c_void_p(100_000), None)


texts = {"main": mlx_qwen35.generate(model, processor, "hi", max_tokens=4)}
generated = threading.Event()


def worker():
    texts["greedy"] = mlx_qwen35.generate(model, processor, "hi", max_tokens=4)
    texts["sampled"] = mlx_qwen35.generate(
        model, processor, "hi", max_tokens=4, temp=0.7, top_k=20, seed=0
    )
    generated.set()
    delay_os_thread_exit()


def forward():
    y = model(mx.array([[1, 2, 3]]), cache=model.make_cache())
    mx.async_eval(y)
    mx.eval(y)
    generated.wait()  # both threads end together, just before the interpreter's exit
    delay_os_thread_exit()
    return y.shape


thread = threading.Thread(target=worker)
thread.start()
with ThreadPoolExecutor(1) as pool:
    shape = pool.submit(forward).result()
thread.join()
assert shape[:2] == (1, 3), shape
assert texts["greedy"] == texts["main"], texts  # the same greedy text on any thread


class ReleaseGilWhileFinalizing:
    def __del__(self, sleep=time.sleep):
        sleep(0.3)  # a worker still exiting takes the GIL now, during finalization


keep = ReleaseGilWhileFinalizing()
print("ok", len(texts))
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    ensure_tiny_random(root)
    return root


def test_generation_on_worker_threads_exits_cleanly(cache):
    env = dict(os.environ, **{CACHE_ENV: str(cache)}, HF_HUB_OFFLINE="1")
    env.pop("MLX_QWEN35_GDN_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert "terminate" not in out.stderr and "Fatal Python error" not in out.stderr, out.stderr
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok 3"
