"""The Metal subset the emulator supports, as a lint over kernel source and header text.

Kernels that stay inside it compile the same way under Metal and under the emulator's prelude:
- buffers are indexed directly: no pointer variables or helper parameters carrying an address
  space (MLX passes inputs under 8 elements in `constant`, larger ones in `device`, so such code
  can compile for one size and not another);
- threadgroup memory only as `threadgroup T name[N];` at the start of a line;
- math through `metal::` (no unqualified `exp(...)`, which binds to C's double version on the CPU)
  and only functions both sides have (no `log1p`/`expm1`: Metal has none);
- SIMD-group functions from the list the runtime implements, on scalars;
- thread attributes whose meaning the emulator reproduces (not the edge-threadgroup sizes
  `threads_per_threadgroup` / `simdgroups_per_threadgroup`, whose values for partial threadgroups
  were not checked on hardware);
- no textures, samplers, simdgroup matrices, vector types or swizzles, doubles, atomics,
  lambdas, recursion, `std::`, `if constexpr`, preprocessor directives.
"""

from __future__ import annotations

import re

from .codegen import attributes

MATH = {
    "exp",
    "exp2",
    "log",
    "log2",
    "sqrt",
    "rsqrt",
    "tanh",
    "pow",
    "floor",
    "ceil",
    "fma",
    "abs",
    "fabs",
    "max",
    "min",
    "clamp",
    "isnan",
    "isinf",
}
# Names that must not be called unqualified (they exist in C's math library as doubles).
_UNQUALIFIED = MATH | {"log1p", "expm1", "sin", "cos", "tan", "round", "trunc", "fmod", "erf"}
SIMD = {
    "simd_sum",
    "simd_max",
    "simd_min",
    "simd_shuffle",
    "simd_shuffle_xor",
    "simd_shuffle_down",
    "simd_shuffle_up",
    "simd_broadcast",
    "simd_prefix_exclusive_sum",
    "simd_prefix_inclusive_sum",
    "simd_all",
    "simd_any",
    "simdgroup_barrier",
}
ATTRIBUTES = {
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "threadgroup_position_in_grid",
    "thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup",
    "thread_index_in_threadgroup",
    "threadgroups_per_grid",
    "threads_per_grid",
    "grid_size",
}
TG_TYPES = {"float", "int", "uint", "short", "ushort", "half", "bfloat", "bfloat16_t", "float16_t"}

_FORBIDDEN = [
    (r"\btexture\w*|\bsampler\b", "textures and samplers"),
    (
        r"\bsimdgroup_(?:matrix|float8x8|half8x8|bfloat8x8)\w*|\bsimdgroup_multiply\w*",
        "simdgroup matrices",
    ),
    (r"\bquad_\w+", "quad-group functions"),
    (
        r"\b(?:bool|char|uchar|short|ushort|int|uint|long|ulong|half|float|bfloat)[2-4](?:x[2-4])?\b",
        "vector and matrix types",
    ),
    (r"\bpacked_\w+", "packed vector types"),
    (r"\.(?:[xyzw]{2,4}|[rgba]{2,4})\b", "swizzles"),
    (r"\bdouble\b", "doubles"),
    (r"\batomic\w*", "atomics"),
    (r"\bimageblock\w*", "imageblocks"),
    (r"\bstd::", "the C++ standard library"),
    (r"\bif\s+constexpr\b", "if constexpr"),
    (r"\bgoto\b|\bthrow\b|\btry\b|\bnew\b|\bdelete\b|\bprintf\b", "goto/exceptions/new/printf"),
    (r"\[\s*[=&]?\s*\]\s*\(|\[\s*[=&]\s*[,\]]", "lambdas"),
    (r"\bas_type\b", "as_type"),
    (r"^\s*#", "preprocessor directives"),
    (r"\b(?:device|constant)\b", "pointers with an address space (index the buffers directly)"),
]
_TG_DECL = re.compile(r"^\s*threadgroup\s+([A-Za-z_][\w:]*)\s+[A-Za-z_]\w*\s*\[[^\]\n]+\]\s*;\s*$")
_FUNC = re.compile(
    r"^\s*(?:inline\s+)?[A-Za-z_][\w:<>]*\s+([A-Za-z_]\w*)\s*\(([^)]*)\)\s*\{", re.MULTILINE
)


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def lint(source: str, header: str = "") -> list[str]:
    """Problems with a kernel (body `source` and `header`), as messages; empty when clean."""
    problems: list[str] = []
    for part, text in (("source", source), ("header", header)):
        code = _strip_comments(text)
        for pattern, what in _FORBIDDEN:
            for m in re.finditer(pattern, code, flags=re.MULTILINE):
                problems.append(f"{part}: {what} are outside the subset: {m.group(0).strip()!r}")
        for line in code.splitlines():
            if re.search(r"\bthreadgroup\b", line):
                m = _TG_DECL.match(line)
                if not m:
                    problems.append(
                        f"{part}: threadgroup only as 'threadgroup T name[N];': {line!r}"
                    )
                elif m.group(1) not in TG_TYPES:
                    problems.append(f"{part}: threadgroup array of unsupported type {m.group(1)}")
        for m in re.finditer(r"\bmetal::(?:precise::|fast::)?(\w+)", code):
            if m.group(1) not in MATH:
                problems.append(f"{part}: metal::{m.group(1)} is not in the emulated math set")
        for m in re.finditer(r"(?<![\w:.])(\w+)\s*\(", code):
            if m.group(1) in _UNQUALIFIED:
                problems.append(f"{part}: call math as metal::{m.group(1)}, not unqualified")
        for m in re.finditer(r"\b(simd\w*)\s*\(", code):
            if m.group(1) not in SIMD:
                problems.append(f"{part}: {m.group(1)} is not an emulated SIMD-group function")
        for m in _FUNC.finditer(code):
            name, params = m.group(1), m.group(2)
            if name in ("if", "for", "while", "switch"):
                continue
            if "*" in params or "&" in params:
                problems.append(f"{part}: helper {name} takes a pointer or reference: {params!r}")
            end = _matching_brace(code, m.end() - 1)
            if re.search(rf"\b{name}\s*\(", code[m.end() : end]):
                problems.append(f"{part}: {name} is recursive")
    for attr, _ in attributes(source):
        if attr not in ATTRIBUTES:
            problems.append(f"source: attribute {attr} is outside the subset")
    return problems


def _matching_brace(code: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(code)):
        if code[i] == "{":
            depth += 1
        elif code[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return len(code)
