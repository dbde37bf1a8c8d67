"""The kernel text `mx.fast.metal_kernel` generates, reproduced line for line, and the C++
translation unit the emulator compiles from it.

The generation follows MLX's `write_signature`, `write_template` and kernel naming
(mlx/backend/common/metal_kernel.cpp). A test traces MLX's own text through `mx.export_function`
and compares, so a change in MLX's code generation fails loudly instead of drifting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

# Inputs with fewer elements are passed in the `constant` address space (MLX's
# max_constant_array_size).
MAX_CONSTANT_ARRAY_SIZE = 8

# MLX's list, in MLX's order: an attribute is added when its name occurs anywhere in the source.
METAL_ATTRIBUTES: list[tuple[str, str]] = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

_TYPE_STRINGS = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float64: "double",
    mx.complex64: "complex64_t",
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}


def type_string(dtype: mx.Dtype) -> str:
    return _TYPE_STRINGS[dtype]


@dataclass(frozen=True)
class InputMeta:
    """What the generated signature depends on for one input."""

    dtype: mx.Dtype
    ndim: int
    size: int

    @property
    def scalar(self) -> bool:
        return self.ndim == 0

    @property
    def constant(self) -> bool:
        return self.size < MAX_CONSTANT_ARRAY_SIZE


@dataclass(frozen=True)
class Param:
    """One parameter of the generated kernel, in signature order."""

    kind: str  # "input" | "shape" | "strides" | "ndim" | "output" | "attribute"
    name: str
    ctype: str  # C++ type the launcher passes (pointer or value)
    index: int  # input or output index (or -1)


@dataclass(frozen=True)
class Generated:
    kernel_name: str
    text: str
    template_def: str  # "<float, 16, 1>" or ""
    params: tuple[Param, ...]


def attributes(source: str) -> list[tuple[str, str]]:
    return [(a, t) for a, t in METAL_ATTRIBUTES if a in source]


def shape_infos(input_names: list[str], source: str) -> list[tuple[bool, bool, bool]]:
    return [
        (f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source)
        for n in input_names
    ]


def _template_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, mx.Dtype):
        return type_string(value)
    raise TypeError(f"template values are bool, int or Dtype, not {type(value).__name__}")


def _template_param_type(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return "typename"


def template_def(template: list[tuple[str, object]]) -> str:
    return "<" + ", ".join(_template_value(v) for _, v in template) + ">"


def template_hash(tdef: str) -> str:
    out = []
    i = 0
    while i < len(tdef):
        c = tdef[i]
        if c in "<>":
            out.append("_")
        elif c == "," and i + 1 < len(tdef) and tdef[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]


def kernel_name(
    name: str,
    template: list[tuple[str, object]],
    inputs: list[InputMeta],
    output_dtypes: list[mx.Dtype],
) -> str:
    kname = "custom_kernel_" + name
    if template:
        kname += "_" + template_hash(template_def(template))
    for m in inputs:
        kname += "_" + type_string(m.dtype)
        if m.scalar:
            kname += "s"
        elif m.constant:
            kname += "c"
    for d in output_dtypes:
        kname += "_" + type_string(d)
    return kname


def generate(
    *,
    name: str,
    input_names: list[str],
    output_names: list[str],
    source: str,
    header: str,
    atomic_outputs: bool,
    inputs: list[InputMeta],
    output_dtypes: list[mx.Dtype],
    template: list[tuple[str, object]] | None,
) -> Generated:
    """The exact text MLX hands to the Metal compiler (minus MLX's utils prelude)."""
    template = list(template or [])
    kname = kernel_name(name, template, inputs, output_dtypes)
    attrs = attributes(source)
    infos = shape_infos(input_names, source)
    params: list[Param] = []

    text = header
    if template:
        text += (
            "template <" + ", ".join(f"{_template_param_type(v)} {n}" for n, v in template) + ">\n"
        )
    text += f"[[kernel]] void {kname}(\n"
    index = 0
    for i, (iname, meta) in enumerate(zip(input_names, inputs, strict=True)):
        dtype = type_string(meta.dtype)
        location = "constant" if meta.constant else "device"
        ref = "&" if meta.scalar else "*"
        text += f"  const {location} {dtype}{ref} {iname} [[buffer({index})]],\n"
        params.append(Param("input", iname, f"const {dtype}{ref}", i))
        index += 1
        if meta.ndim > 0:
            has_shape, has_strides, has_ndim = infos[i]
            if has_shape:
                text += f"  const constant int* {iname}_shape [[buffer({index})]],\n"
                params.append(Param("shape", iname, "const int*", i))
                index += 1
            if has_strides:
                text += f"  const constant int64_t* {iname}_strides [[buffer({index})]],\n"
                params.append(Param("strides", iname, "const int64_t*", i))
                index += 1
            if has_ndim:
                text += f"  const constant int& {iname}_ndim [[buffer({index})]],\n"
                params.append(Param("ndim", iname, "const int&", i))
                index += 1
    for i, (oname, dtype) in enumerate(zip(output_names, output_dtypes, strict=True)):
        tstr = type_string(dtype)
        if atomic_outputs:
            tstr = f"atomic<{tstr}>"
        text += f"  device {tstr}* {oname} [[buffer({index})]]"
        # MLX compares the buffer index (which counts shape buffers) with the number of inputs
        # and outputs; reproduced as is.
        if index < len(inputs) + len(output_names) - 1 or attrs:
            text += ",\n"
        else:
            text += ") {\n"
        params.append(Param("output", oname, f"{tstr}*", i))
        index += 1
    for j, (attr, atype) in enumerate(attrs):
        text += f"  {atype} {attr} [[{attr}]]"
        text += ",\n" if j < len(attrs) - 1 else ") {\n"
        params.append(Param("attribute", attr, atype, -1))
    text += source
    text += "\n}\n"
    tdef = ""
    if template:
        tdef = template_def(template)
        full = kname + tdef
        text += f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({full}) {full};\n'
    return Generated(kname, text, tdef, tuple(params))


# `threadgroup T name[N];` at the start of a line: the only threadgroup form in the subset.
_TG_DECL = re.compile(
    r"^(\s*)threadgroup\s+([A-Za-z_][\w:]*)\s+([A-Za-z_]\w*)\s*\[([^\]\n]+)\]\s*;",
    re.MULTILINE,
)


def rewrite_threadgroup_arrays(text: str) -> str:
    """Turn each threadgroup array into the emulator's shared block (same line count)."""
    return _TG_DECL.sub(r"\1MTLEMU_TG_ARRAY(\2, \3, (\4));", text)


def translation_unit(gen: Generated) -> str:
    """prelude + MLX's text (line numbers preserved) + the entry point the runtime calls."""
    args = []
    slot_index = 0
    for p in gen.params:
        if p.kind == "attribute":
            args.append(f"a->{p.name}")
            continue
        slot = f"bufs[{slot_index}]"  # buffers in signature order, attributes excluded
        slot_index += 1
        if p.ctype.endswith("&"):
            base = p.ctype[:-1].removeprefix("const ")
            args.append(f"*static_cast<const {base}*>({slot})")
        else:
            args.append(f"static_cast<{p.ctype}>({slot})")
    call = ",\n      ".join(args)
    return (
        '#include "prelude.h"\n'
        f'#line 1 "{gen.kernel_name}"\n'
        + rewrite_threadgroup_arrays(gen.text)
        + '\n#line 100000 "mtlemu_entry"\n'
        + 'extern "C" void mtlemu_entry(void** bufs, const mtlemu_attrs* a) {\n'
        + f"  (void)a;\n  {gen.kernel_name}{gen.template_def}(\n      {call});\n"
        + "}\n"
    )


def body_line(gen: Generated, source: str, line: int) -> tuple[int, str] | None:
    """Map a line of the generated text to (line within `source`, that line's code)."""
    lines = gen.text.splitlines()
    if not 1 <= line <= len(lines):
        return None
    start = gen.text.find(source)
    first = gen.text.count("\n", 0, start) + 1 if start >= 0 else 0
    code = lines[line - 1].strip()
    if start >= 0 and first <= line < first + source.count("\n") + 1:
        return line - first + 1, code
    return 0, code
