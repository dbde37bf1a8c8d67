"""Make MLX's per-thread state safe for apps that run the model on worker threads.

MLX (0.31+) keeps the `mx.compile` cache and the random key in C++ thread_local storage, and their
entries hold Python objects. A thread that used them frees them in its thread-exit destructors,
which run after `Thread.join()` has returned and need the GIL: if the interpreter is finalizing by
then, Python ends that thread with pthread_exit() inside a noexcept destructor and the whole
process aborts ("terminate called without an active exception", exit 134). Every forward pass
compiles (our conv/decode steps, mlx.nn activations, mlx-lm's samplers), so any worker thread that
generates is exposed. MLX's remedy is `mx.clear_streams()` at the end of the thread, which
`release_thread_state_at_exit` arranges without the caller having to know.
"""

from __future__ import annotations

import threading

import mlx.core as mx

_per_thread = threading.local()


class _ClearStreamsAtExit:
    """Held in `_per_thread` by one thread. Python drops a thread's threading.local values on the
    thread itself when it ends, with the GIL held and before join() returns."""

    __slots__ = ("ident",)

    def __init__(self) -> None:
        self.ident = threading.get_ident()

    def __del__(self) -> None:
        if threading.get_ident() == self.ident:  # not when freed by another thread at shutdown
            try:
                mx.clear_streams()
            except Exception:  # a destructor must not raise; the thread is ending anyway
                pass


def release_thread_state_at_exit() -> None:
    """Have the calling thread drop its per-thread MLX state (compile cache, random key, streams)
    when it ends, while the interpreter is still alive. ~60 ns once registered.

    Not for the main thread, nor for threads Python did not start (`_DummyThread`): those may
    re-enter Python later with a fresh thread state and still need their MLX streams.
    """
    if "hook" in _per_thread.__dict__:
        return
    thread = threading.current_thread()
    main_or_foreign = thread is threading.main_thread() or isinstance(
        thread, threading._DummyThread
    )
    _per_thread.hook = None if main_or_foreign else _ClearStreamsAtExit()
