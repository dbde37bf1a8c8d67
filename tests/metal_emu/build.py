"""Compiling the emulator's runtime and kernels with the system C++ compiler, cached by hash.

A kernel instantiation (its full generated text) compiles once into a shared library named by the
SHA-256 of compiler, flags, prelude and text; later runs load it from the cache directory
(`$MLX_QWEN35_METAL_EMU_CACHE`, default `<tmp>/mlx_qwen35_metal_emu_<uid>`). Writes go through a
temporary file and an atomic rename, so concurrent test processes can share the cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

HERE = Path(__file__).parent
PRELUDE = HERE / "prelude.h"
ABI = HERE / "abi.h"
RUNTIME = HERE / "runtime.cpp"

# Plain IEEE single precision: no contraction into FMAs, no fast-math, no fortified longjmp
# (the runtime jumps out of a signal handler across fiber stacks).
COMMON_FLAGS = [
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fno-strict-aliasing",
    "-U_FORTIFY_SOURCE",
    "-D_FORTIFY_SOURCE=0",
]
# Kernels leave the runtime's symbols to be resolved when loaded (macOS needs to be told).
KERNEL_FLAGS = ["-O1", "-w"] + (
    ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
)
RUNTIME_FLAGS = ["-O2", "-Wall", "-pthread"]


class CompilerMissing(RuntimeError):
    pass


class CompileError(RuntimeError):
    pass


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise CompilerMissing("no C++ compiler: install g++ (apt-get install g++) or set CXX")
    return cxx


def cache_dir() -> Path:
    env = os.environ.get("MLX_QWEN35_METAL_EMU_CACHE")
    path = Path(env) if env else Path(tempfile.gettempdir()) / f"mlx_qwen35_metal_emu_{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@cache
def _compiler_id(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else cxx


def _compile(text: str, flags: list[str], tag: str) -> Path:
    cxx = compiler()
    key = hashlib.sha256()
    for part in (_compiler_id(cxx), " ".join(flags), ABI.read_text(), PRELUDE.read_text(), text):
        key.update(part.encode())
        key.update(b"\0")
    out = cache_dir() / f"{tag}-{key.hexdigest()[:24]}.so"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        src = Path(tmp) / f"{tag}.cpp"
        src.write_text(text)
        lib = Path(tmp) / "out.so"
        cmd = [cxx, *flags, "-I", str(HERE), str(src), "-o", str(lib)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise CompileError(f"{' '.join(cmd)}\n{res.stderr[-6000:]}")
        os.replace(lib, out)
    return out


def compile_kernel(tu: str) -> Path:
    return _compile(tu, COMMON_FLAGS + KERNEL_FLAGS, "kernel")


@cache
def _runtime(ucontext: bool) -> ctypes.CDLL:
    flags = COMMON_FLAGS + RUNTIME_FLAGS + (["-DMTLEMU_UCONTEXT"] if ucontext else [])
    path = _compile(RUNTIME.read_text(), flags, "runtime")
    # RTLD_GLOBAL: the kernels resolve mtlemu_simd_exchange & co. against this library.
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    lib.mtlemu_launch.restype = ctypes.c_int
    lib.mtlemu_launch.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_int64),
        ctypes.POINTER(ctypes.c_int64),
        ctypes.c_int,
        ctypes.c_uint64,
        ctypes.c_double,
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    lib.mtlemu_alloc.restype = ctypes.c_void_p
    lib.mtlemu_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_char_p]
    lib.mtlemu_check_guard.restype = ctypes.c_long
    lib.mtlemu_check_guard.argtypes = [ctypes.c_void_p]
    lib.mtlemu_free.restype = None
    lib.mtlemu_free.argtypes = [ctypes.c_void_p]
    lib.mtlemu_uses_ucontext.restype = ctypes.c_int
    return lib


def runtime() -> ctypes.CDLL:
    # MTLEMU_UCONTEXT=1 swaps the hand-written x86-64 context switch for ucontext (one runtime
    # per process: the kernels bind to whichever was loaded first).
    return _runtime(os.environ.get("MTLEMU_UCONTEXT") == "1")


_loaded: dict[Path, ctypes.CDLL] = {}


def load_kernel(path: Path) -> ctypes.CDLL:
    runtime()
    if path not in _loaded:
        _loaded[path] = ctypes.CDLL(str(path))
    return _loaded[path]
