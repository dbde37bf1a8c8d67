"""A drop-in for `mx.fast.metal_kernel` that runs the kernel on the CPU.

`Emulator().metal_kernel(...)` takes the same arguments as `mx.fast.metal_kernel` and returns a
callable with the same keywords (inputs, output_shapes, output_dtypes, grid, threadgroup, template,
init_value, verbose, stream). Calling it generates MLX's kernel text, compiles it (cached), copies
the inputs into guarded buffers, poisons the outputs with NaN bytes (0xFF) unless `init_value` is
given, runs the grid with MLX's dispatch rules (threadgroup clamped to the grid, partial edge
threadgroups) under each configured thread schedule, and returns `mx.array`s. A launch fails with
`EmulationError` on divergent SIMD-group operations or barriers, out-of-bounds accesses,
clobbered guard bytes, or results that depend on the schedule (a race). Inputs are always
passed row-contiguous (what MLX does with ensure_row_contiguous=True, the only mode our kernels
use).

`emulate_metal(monkeypatch)` installs it as `mx.fast.metal_kernel` and makes
`mx.metal.is_available()` return True, so production dispatch code runs unchanged. With
MLX_QWEN35_METAL_EMU=0 on a Mac it installs a `Recorder` instead: the real kernels run on the GPU
and the same call log is kept, so the kernel tests check real Metal.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from . import build, codegen

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}

_NUMPY_DTYPES = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,  # raw bits
    mx.bool_: np.bool_,
    mx.int8: np.int8,
    mx.int16: np.int16,
    mx.int32: np.int32,
    mx.int64: np.int64,
    mx.uint8: np.uint8,
    mx.uint16: np.uint16,
    mx.uint32: np.uint32,
    mx.uint64: np.uint64,
}


class EmulationError(RuntimeError):
    """The kernel did something Metal would not do reliably (or at all)."""


@dataclass
class Call:
    """One kernel invocation as the production code made it."""

    name: str
    kernel_name: str
    text: str
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    template: list[tuple[str, object]]
    input_shapes: list[tuple[int, ...]]
    input_dtypes: list[mx.Dtype]
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[mx.Dtype]


def _call(name, gen, arrays, grid, threadgroup, template, output_shapes, output_dtypes) -> Call:
    return Call(
        name,
        gen.kernel_name,
        gen.text,
        tuple(grid),
        tuple(threadgroup),
        list(template or []),
        [tuple(a.shape) for a in arrays],
        [a.dtype for a in arrays],
        [tuple(s) for s in output_shapes],
        list(output_dtypes),
    )


def _to_array(x) -> mx.array:
    if isinstance(x, mx.array):
        return x
    if isinstance(x, bool):
        return mx.array(x, dtype=mx.bool_)
    if isinstance(x, int):
        return mx.array(x, dtype=mx.int32)
    if isinstance(x, float):
        return mx.array(x, dtype=mx.float32)
    raise TypeError(f"kernel inputs are arrays or Python scalars, not {type(x).__name__}")


def to_numpy(a: mx.array) -> np.ndarray:
    """Row-contiguous host copy; bfloat16 comes back as its uint16 bit patterns."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a))


def from_numpy(x: np.ndarray, dtype: mx.Dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(x.view(np.uint16)).view(mx.bfloat16)
    return mx.array(x)


def _fill_bytes(value: float, dtype: mx.Dtype) -> np.ndarray:
    return to_numpy(mx.array(value, dtype=mx.float32).astype(dtype)).reshape(-1).view(np.uint8)


class _Buffers:
    """Guarded host buffers, freed together."""

    def __init__(self):
        self.rt = build.runtime()
        self.ptrs: list[int] = []
        self.names: list[str] = []

    def alloc(self, nbytes: int, align: int, what: str) -> tuple[int, np.ndarray]:
        ptr = self.rt.mtlemu_alloc(nbytes, align, what.encode())
        self.ptrs.append(ptr)
        self.names.append(what)
        view = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=np.uint8)
        return ptr, view

    def check_guards(self) -> None:
        for ptr, what in zip(self.ptrs, self.names, strict=True):
            off = self.rt.mtlemu_check_guard(ptr)
            if off >= 0:
                raise EmulationError(f"out-of-bounds write to {what}: {off} bytes before its start")

    def free(self) -> None:
        for ptr in self.ptrs:
            self.rt.mtlemu_free(ptr)
        self.ptrs.clear()


@dataclass
class Emulator:
    """The factory; `calls` records every launch for tests of the dispatch parameters."""

    schedules: tuple[str, ...] = ("forward", "reverse")
    seed: int = 0
    timeout_s: float = 60.0  # CPU seconds per launch before the watchdog reports an endless loop
    calls: list[Call] = field(default_factory=list)

    def metal_kernel(
        self,
        name: str,
        input_names: list[str],
        output_names: list[str],
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
        compile_options: dict | None = None,
    ) -> EmulatedKernel:
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        return EmulatedKernel(
            self, name, list(input_names), list(output_names), source, header, atomic_outputs
        )


class EmulatedKernel:
    def __init__(self, emulator, name, input_names, output_names, source, header, atomic_outputs):
        self.emulator = emulator
        self.name = name
        self.input_names = input_names
        self.output_names = output_names
        self.source = source
        self.header = header
        self.atomic_outputs = atomic_outputs

    def generate(self, inputs, output_dtypes, template) -> codegen.Generated:
        arrays = [_to_array(x) for x in inputs]
        return codegen.generate(
            name=self.name,
            input_names=self.input_names,
            output_names=self.output_names,
            source=self.source,
            header=self.header,
            atomic_outputs=self.atomic_outputs,
            inputs=[codegen.InputMeta(a.dtype, a.ndim, a.size) for a in arrays],
            output_dtypes=list(output_dtypes),
            template=template,
        )

    def __call__(
        self,
        *,
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        template=None,
        init_value=None,
        verbose=False,
        stream=None,
    ) -> list[mx.array]:
        for what, seq in (("inputs", inputs), ("output_shapes", output_shapes)):
            want = len(self.input_names if what == "inputs" else self.output_names)
            if len(seq) != want:
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {want}")
        arrays = [_to_array(x) for x in inputs]
        gen = self.generate(arrays, output_dtypes, template)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{gen.text}\n```")
        self.emulator.calls.append(
            _call(self.name, gen, arrays, grid, threadgroup, template, output_shapes, output_dtypes)
        )
        lib = build.load_kernel(build.compile_kernel(codegen.translation_unit(gen)))
        host_inputs = [to_numpy(a) for a in arrays]
        results = None
        for schedule in self.emulator.schedules:
            outs = self._launch(
                lib,
                gen,
                arrays,
                host_inputs,
                output_shapes,
                output_dtypes,
                grid,
                threadgroup,
                init_value,
                schedule,
            )
            if results is None:
                results, first = outs, schedule
            elif any(a.tobytes() != b.tobytes() for a, b in zip(results, outs, strict=True)):
                raise EmulationError(
                    f"{self.name}: outputs differ between the '{first}' and '{schedule}' thread "
                    "schedules: a data race (a missing barrier, or threads of one SIMD group "
                    "sharing threadgroup memory without one)"
                )
        return [from_numpy(x, d) for x, d in zip(results, output_dtypes, strict=True)]

    def _launch(
        self,
        lib,
        gen,
        arrays,
        host_inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        init_value,
        schedule,
    ) -> list[np.ndarray]:
        bufs = _Buffers()
        try:
            slots = []
            out_views = []
            for p in gen.params:
                if p.kind == "attribute":
                    continue
                if p.kind == "input":
                    data = host_inputs[p.index].reshape(-1).view(np.uint8)
                    what = f"input '{p.name}'"
                elif p.kind == "shape":
                    data = np.array(arrays[p.index].shape, np.int32).view(np.uint8)
                    what = f"'{p.name}_shape'"
                elif p.kind == "strides":
                    shape = arrays[p.index].shape
                    strides = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
                    data = np.array(strides, np.int64).view(np.uint8)
                    what = f"'{p.name}_strides'"
                elif p.kind == "ndim":
                    data = np.array([arrays[p.index].ndim], np.int32).view(np.uint8)
                    what = f"'{p.name}_ndim'"
                else:
                    dtype = output_dtypes[p.index]
                    n = int(np.prod(output_shapes[p.index]))
                    itemsize = np.dtype(_NUMPY_DTYPES[dtype]).itemsize
                    ptr, view = bufs.alloc(n * itemsize, itemsize, f"output '{p.name}'")
                    if init_value is None:
                        view[:] = 0xFF  # NaN in every float format
                    elif n:
                        view[:] = np.tile(_fill_bytes(init_value, dtype), n)
                    out_views.append((view, dtype, output_shapes[p.index]))
                    slots.append(ptr)
                    continue
                # End-aligned on a page, so every element is naturally aligned.
                ptr, view = bufs.alloc(max(data.size, 1), 1, what)
                view[: data.size] = data
                slots.append(ptr)
            c_bufs = (ctypes.c_void_p * max(len(slots), 1))(*slots)
            c_grid = (ctypes.c_int64 * 3)(*grid)
            c_tg = (ctypes.c_int64 * 3)(*threadgroup)
            err = ctypes.create_string_buffer(8192)
            entry = ctypes.cast(lib.mtlemu_entry, ctypes.c_void_p).value
            status = bufs.rt.mtlemu_launch(
                entry,
                c_bufs,
                c_grid,
                c_tg,
                SCHEDULES[schedule],
                self.emulator.seed,
                self.emulator.timeout_s,
                err,
                len(err),
            )
            if status != 0:
                raise EmulationError(self._explain(gen, err.value.decode(errors="replace")))
            bufs.check_guards()
            return [
                view.copy().view(_NUMPY_DTYPES[dtype]).reshape(shape)
                for view, dtype, shape in out_views
            ]
        finally:
            bufs.free()

    def _explain(self, gen: codegen.Generated, msg: str) -> str:
        lines = []
        for n in sorted({int(m) for m in re.findall(r"line (\d+)", msg)}):
            where = codegen.body_line(gen, self.source, n)
            if where is not None:
                body, code = where
                loc = f"source line {body}" if body else "generated text"
                lines.append(f"  line {n} ({loc}): {code}")
        return f"{self.name}: {msg}" + ("\n" + "\n".join(lines) if lines else "")


# Captured before any test patches them: what this machine really has.
_REAL_METAL_KERNEL = mx.fast.metal_kernel
_REAL_IS_AVAILABLE = mx.metal.is_available


def use_real_metal() -> bool:
    """MLX_QWEN35_METAL_EMU=0: run the kernel tests on the real GPU (a Mac), not the emulator."""
    return os.environ.get("MLX_QWEN35_METAL_EMU", "1") == "0"


def skip_unless_kernels_can_run() -> None:
    """Module-level guard for kernel tests: a compiler for the emulator, or real Metal."""
    import pytest

    if use_real_metal():
        if not _REAL_IS_AVAILABLE():
            pytest.skip("MLX_QWEN35_METAL_EMU=0 needs Metal", allow_module_level=True)
        return
    try:
        build.compiler()
    except build.CompilerMissing as exc:  # CI installs g++ (.ci/run)
        pytest.skip(str(exc), allow_module_level=True)


def skip_on_real_metal() -> None:
    """Module-level guard for tests of the emulator itself."""
    import pytest

    if use_real_metal():
        pytest.skip("tests of the emulator; MLX_QWEN35_METAL_EMU=0", allow_module_level=True)


@dataclass
class Recorder:
    """Real Metal with the same call log as the Emulator (MLX_QWEN35_METAL_EMU=0)."""

    calls: list[Call] = field(default_factory=list)

    def metal_kernel(
        self,
        name,
        input_names,
        output_names,
        source,
        header="",
        ensure_row_contiguous=True,
        atomic_outputs=False,
        compile_options=None,
    ):
        real = _REAL_METAL_KERNEL(
            name=name,
            input_names=input_names,
            output_names=output_names,
            source=source,
            header=header,
            ensure_row_contiguous=ensure_row_contiguous,
            atomic_outputs=atomic_outputs,
        )
        spec = EmulatedKernel(
            self, name, list(input_names), list(output_names), source, header, atomic_outputs
        )

        def call(**kw):
            arrays = [_to_array(x) for x in kw["inputs"]]
            gen = spec.generate(arrays, kw["output_dtypes"], kw.get("template"))
            self.calls.append(
                _call(
                    name,
                    gen,
                    arrays,
                    kw["grid"],
                    kw["threadgroup"],
                    kw.get("template"),
                    kw["output_shapes"],
                    kw["output_dtypes"],
                )
            )
            return real(**kw)

        return call


def emulate_metal(monkeypatch, **options) -> Emulator | Recorder:
    """Route `mx.fast.metal_kernel` to a fresh Emulator and report Metal as available.

    With MLX_QWEN35_METAL_EMU=0 (on a Mac) the real kernels run instead, through a Recorder.
    """
    if use_real_metal():
        rec = Recorder()
        monkeypatch.setattr(mx.fast, "metal_kernel", rec.metal_kernel)
        return rec
    emu = Emulator(**options)
    monkeypatch.setattr(mx.fast, "metal_kernel", emu.metal_kernel)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    return emu
