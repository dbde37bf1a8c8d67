"""CPU emulation of `mx.fast.metal_kernel`, for testing Metal kernels on machines without Metal.

emulator.py: the drop-in factory and how a launch runs; codegen.py: the text MLX generates;
runtime.cpp: fibers, SIMD-group and barrier rendezvous, guards; prelude.h: Metal mapped to C++;
build.py: compiling and caching; lint.py: the kernel subset the harness supports;
gdn_reference.py: float64 references for the gated-delta kernels.
Needs a C++17 compiler (g++; CI: `apt-get install g++`).
"""

from .build import CompileError, CompilerMissing, compiler
from .emulator import (
    Call,
    EmulationError,
    Emulator,
    Recorder,
    emulate_metal,
    skip_on_real_metal,
    skip_unless_kernels_can_run,
    use_real_metal,
)

__all__ = [
    "Call",
    "CompileError",
    "CompilerMissing",
    "EmulationError",
    "Emulator",
    "Recorder",
    "compiler",
    "emulate_metal",
    "skip_on_real_metal",
    "skip_unless_kernels_can_run",
    "use_real_metal",
]
