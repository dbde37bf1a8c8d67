"""`python -m mlx_qwen35.convert`: an original Qwen3.5 checkpoint -> an MLX checkpoint (unquantized,
4/8-bit or mixed by a recipe) that our runtime, mlx-lm (text) and mlx-vlm (all of it) load; then,
optionally, an upload to the Hugging Face Hub.

Streaming. Input shards are opened one at a time with `mx.load`, which reads nothing until a tensor
is evaluated. Each tensor goes through our layout (rename; (1 + w) folded in fp32; conv1d
[C, 1, K] -> [C, K, 1]; patch embedding to MLX Conv3d order), the cast and the recipe's
quantization as a lazy graph. Shapes and dtypes of that graph are known without computing it, so
every output shard's safetensors header is written first and each tensor is then evaluated,
appended to its shard and dropped: peak memory is about one tensor with its temporaries, not a
shard and not the model. No transform needs a second tensor (the tied head is simply dropped), so
nothing forces another tensor to load.

The output directory:
  config.json         ModelConfig.to_dict() (with the `mlx_qwen35_format` marker) + `quantization`
  model*.safetensors  text + vision in mlx-vlm's layout, listed in model.safetensors.index.json
  mtp.safetensors     the MTP head (our layout, norms hold 1 + w); outside the index and outside
                      mlx-lm's `model*.safetensors` glob, so mlx-lm and mlx-vlm never see it
  tokenizer, chat template, preprocessor and generation configs, LICENSE: copied from the source
  README.md           the model card;  quality_report.json with --report
It is written into a temporary directory beside the target and renamed into place at the end, so
an error or Ctrl-C leaves nothing at the target.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import mlx.core as mx

from . import quality
from .config import ModelConfig, load_config
from .errors import UserError
from .loading import (
    SHIFTED_NORM_SUFFIXES,
    checkpoint_layout,
    rename_key,
    resolve_model_path,
    weight_files,
)
from .quantize import Decision, decide, dequantize, quantization_block
from .quantize import quantize as quantize_tensor
from .recipes import QuantSpec, Recipe, builtin_names, load_recipe
from .upload import (
    base_model_id,
    check_repo_id,
    check_token,
    describe_upload,
    format_size,
    model_card,
    source_license,
    upload,
)

MAX_SHARD_BYTES = 5 * 10**9
INDEX_FILE = "model.safetensors.index.json"
MTP_FILE = "mtp.safetensors"
REPORT_FILE = "quality_report.json"
DTYPES = ("bfloat16", "float16", "float32")
HEAD = "language_model.lm_head"
EMBED = "language_model.model.embed_tokens"

# Kept in fp32 whatever --dtype says: A_log (the decay exponent; spec §10.2) and the gated
# DeltaNet norm (shipped fp32; mlx-lm and mlx-vlm cast that norm's output back to the activation
# dtype, so fp32 costs them nothing). The (1 + w) norms are folded in fp32 but stored in the
# output dtype: mlx-lm and mlx-vlm run `mx.fast.rms_norm(x, weight)`, whose result takes the
# promoted dtype, so an fp32 weight there would turn their whole residual stream and KV cache fp32.
# Our runtime upcasts those norms to fp32 at load time either way.
_KEEP_FP32 = (".A_log", ".linear_attn.norm.weight")
_COPY_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "LICENSE*")
_NOT_COPIED = {"config.json", INDEX_FILE, REPORT_FILE, "README.md"}
_VISION_FILES = {"preprocessor_config.json", "video_preprocessor_config.json"}
_ST_DTYPES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.uint8: "U8",
    mx.int32: "I32",
    mx.int64: "I64",
}
_METADATA = {"format": "mlx"}


@dataclass(frozen=True)
class Tensor:
    """One output tensor, as planned from the lazy graph."""

    key: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.size
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class _Context:
    """Everything the per-tensor pipeline needs; the same object drives planning and writing."""

    layout: str
    tied: bool
    dtype: mx.Dtype
    recipe: Recipe | None
    vision_sanitize: Callable[[dict[str, mx.array]], dict[str, mx.array]] | None
    mtp: bool


@dataclass
class Plan:
    source: Path
    config: ModelConfig
    ctx: _Context
    inputs: list[tuple[Path, list[str]]]  # input shard -> tensor names in file order
    files: dict[str, list[Tensor]]  # output weight file -> tensors in write order
    config_json: dict[str, Any]
    quantized: dict[str, tuple[QuantSpec, int]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)  # quantizable but left as is -> why
    copies: list[Path] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(_shard_size(ts) for ts in self.files.values())


@dataclass
class ConversionResult:
    out: Path
    files: list[tuple[str, int]]  # (name, bytes) of everything in the output directory
    dry_run: bool = False
    report: dict[str, Any] | None = None
    url: str | None = None


def convert(
    hf_path: str | Path,
    mlx_path: str | Path = "mlx_model",
    *,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    recipe: str | Path | None = None,
    dtype: str | None = None,
    upload_repo: str | None = None,
    vision: bool = True,
    mtp: bool = True,
    force: bool = False,
    dry_run: bool = False,
    report: bool = False,
    max_shard_size: int = MAX_SHARD_BYTES,
    progress: bool = True,
) -> ConversionResult:
    """Convert `hf_path` (Hub repo id or local directory) into `mlx_path`; see the module doc.

    Quantization: `quantize` uses the `4bit` (or `8bit` with `q_bits=8`) recipe; `recipe` names a
    built-in recipe or a recipe file and implies quantization; `q_group_size` overrides the
    recipe's default group size. Without either, tensors are only cast to `dtype`.
    """
    chosen = _choose_recipe(quantize, q_bits, q_group_size, recipe)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if upload_repo is not None:
        check_repo_id(upload_repo)
        if not dry_run:
            check_token()
    out = Path(mlx_path).expanduser().absolute()
    if out.exists() and not force:
        raise UserError(
            f"{out} already exists; pass --force to replace it or pick another --mlx-path"
        )
    source = resolve_model_path(hf_path)
    if source.resolve() == out.resolve() or out.resolve() in source.resolve().parents:
        raise UserError(
            f"--mlx-path {out} would overwrite the source checkpoint; pick another path"
        )
    plan = make_plan(source, chosen, dtype, vision=vision, mtp=mtp, max_shard_size=max_shard_size)
    card = _card_inputs(plan, str(hf_path), upload_repo or out.name)
    if dry_run:
        files = _planned_files(plan, card)
        _print_plan(plan, out, files, upload_repo)
        return ConversionResult(out=out, files=files, dry_run=True)
    _check_disk(out.parent, plan.weight_bytes)
    _print_plan(plan, out, None, None)
    result = _write_atomically(plan, out, card, force=force, report=report, progress=progress)
    if upload_repo is not None:
        print(f"Uploading {out} to {upload_repo}")
        result.url = upload(out, upload_repo)
        print(f"Uploaded: {result.url}")
    return result


# ---------------------------------------------------------------- options


def _choose_recipe(
    quantize: bool, q_bits: int | None, q_group_size: int | None, recipe: str | Path | None
) -> Recipe | None:
    if recipe is None and not quantize:
        if q_bits is not None or q_group_size is not None:
            raise UserError("--q-bits/--q-group-size only apply with -q or --recipe")
        return None
    if recipe is not None and q_bits is not None:
        raise UserError(
            "--q-bits picks the 4bit or 8bit recipe; with --recipe the recipe sets the bits "
            "(copy the recipe file to change them)"
        )
    if q_bits is not None and q_bits not in (4, 8):
        raise UserError(f"--q-bits must be 4 or 8, got {q_bits}")
    chosen = load_recipe(recipe if recipe is not None else f"{q_bits or 4}bit")
    if q_group_size is not None:
        if q_group_size not in (32, 64, 128):
            raise UserError(f"--q-group-size must be 32, 64 or 128, got {q_group_size}")
        chosen = chosen.with_group_size(q_group_size)
    return chosen


def _output_dtype(dtype: str | None, raw: dict[str, Any]) -> str:
    """--dtype, else the dtype the source declares, else bfloat16."""
    if dtype is not None:
        return dtype
    text = raw.get("text_config") or {}
    for d in (raw, text):
        for key in ("dtype", "torch_dtype"):
            if d.get(key) in DTYPES:
                return d[key]
    return "bfloat16"


# ---------------------------------------------------------------- reading


def read_header(path: Path) -> list[str]:
    """The tensor names of a safetensors file in data order, after checking the file is whole
    (a truncated download fails here, before anything is written)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(f.read(n))
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"the file has {size} bytes but its header describes {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise UserError(
            f"{path}: cannot read this safetensors shard ({e}); it is corrupt or truncated, "
            f"download it again"
        ) from None
    return sorted(entries, key=lambda k: int(entries[k]["data_offsets"][0]))


def _open_lazy(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises RuntimeError/ValueError with the parser's message
        raise UserError(
            f"{path}: cannot read this safetensors shard ({str(e).splitlines()[0]}); it is corrupt "
            f"or truncated, download it again"
        ) from None


# ---------------------------------------------------------------- one tensor


def _is_mtp(key: str) -> bool:
    return key.startswith("mtp.") or ".mtp." in key


def _to_our_layout(key: str, value: mx.array, ctx: _Context) -> tuple[str, mx.array] | None:
    """Source key/tensor -> our key/tensor (lazy), or None when the output does not keep it."""
    if _is_mtp(key):
        if not ctx.mtp:
            return None
        # Every MTP norm is a (1 + w) RMSNorm (spec §2); it has no gated norm.
        if ctx.layout == "hf" and value.ndim == 1 and "norm" in key.rsplit(".", 2)[-2]:
            value = value.astype(mx.float32) + 1.0
        return key, value
    new = key if ctx.layout == "ours" else rename_key(key)
    if new is None:
        return None
    if new.startswith("vision_tower."):
        if ctx.vision_sanitize is None:
            return None
        if ctx.layout == "hf":
            moved = ctx.vision_sanitize({new[len("vision_tower.") :]: value})
            if not moved:
                return None  # derived buffers (rotary tables) are not parameters
            ((sub, value),) = moved.items()
            new = f"vision_tower.{sub}"
        return new, value
    if ctx.tied and new == f"{HEAD}.weight":
        return None
    if ctx.layout == "hf":
        if new.endswith("conv1d.weight") and value.ndim == 3:
            value = value.moveaxis(2, 1)
        if new.endswith(SHIFTED_NORM_SUFFIXES):
            value = value.astype(mx.float32) + 1.0
    return new, value


def _cast(key: str, value: mx.array, dtype: mx.Dtype) -> mx.array:
    if not mx.issubdtype(value.dtype, mx.floating):
        return value
    return value.astype(mx.float32 if key.endswith(_KEEP_FP32) else dtype)


def _decide(key: str, shape: tuple[int, ...], ctx: _Context) -> Decision:
    head = HEAD if ctx.tied and key == f"{EMBED}.weight" else None
    return decide(key, shape, ctx.recipe, head_path=head)


def _convert_tensor(
    key: str, value: mx.array, ctx: _Context
) -> tuple[dict[str, mx.array], str | None, mx.array | None, Decision]:
    """One source tensor -> (output tensors, our key, the unquantized tensor, decision); lazy."""
    moved = _to_our_layout(key, value, ctx)
    if moved is None:
        return {}, None, None, Decision(None)
    new, value = moved
    value = _cast(new, value, ctx.dtype)
    decision = _decide(new, tuple(value.shape), ctx)
    if decision.spec is None:
        return {new: value}, new, value, decision
    return quantize_tensor(new, value, decision.spec), new, value, decision


# ---------------------------------------------------------------- planning


def make_plan(
    source: Path,
    recipe: Recipe | None,
    dtype: str | None,
    *,
    vision: bool = True,
    mtp: bool = True,
    max_shard_size: int = MAX_SHARD_BYTES,
) -> Plan:
    """Everything about the output (files, tensors, shapes, config) without computing a tensor."""
    config = load_config(source)
    if config.raw.get("quantization") or config.raw.get("quantization_config"):
        raise UserError(
            f"{source} is already quantized; convert from the original bf16 checkpoint instead"
        )
    inputs = [(f, read_header(f)) for f in weight_files(source)]
    _check_unique(inputs)
    lazy: dict[str, mx.array] = {}
    for f, _ in inputs:
        lazy.update(_open_lazy(f))
    if any(k.endswith(".scales") for k in lazy):
        raise UserError(
            f"{source} holds quantized weights; convert from the original bf16 checkpoint instead"
        )
    keep_vision = vision and config.vision is not None
    out_config = replace(config, vision=config.vision if keep_vision else None)
    dtype_name = _output_dtype(dtype, config.raw)
    ctx = _Context(
        layout=checkpoint_layout(lazy, config),
        tied=config.text.tie_word_embeddings,
        dtype=getattr(mx, dtype_name),
        recipe=recipe,
        vision_sanitize=_vision_sanitizer(out_config) if keep_vision else None,
        mtp=mtp,
    )
    plan = Plan(source, config, ctx, inputs, {}, {})
    main: list[list[Tensor]] = []
    mtp_tensors: list[Tensor] = []
    for _, keys in inputs:
        for key in keys:
            tensors, new, _, decision = _convert_tensor(key, lazy[key], ctx)
            if not tensors:
                continue
            group = [Tensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
            if _is_mtp(new):
                mtp_tensors += group
            else:
                main.append(group)
            _note_decision(plan, new, decision, lazy[key].size)
    del lazy
    _check_complete(source, out_config, keep_vision, {t.key for g in main for t in g}, plan)
    plan.files = _assign_shards(main, max_shard_size)
    if mtp_tensors:
        plan.files[MTP_FILE] = mtp_tensors
    plan.config_json = _config_json(out_config, dtype_name, recipe, plan.quantized)
    plan.copies = _side_files(source, keep_vision)
    return plan


def _check_unique(inputs: list[tuple[Path, list[str]]]) -> None:
    seen: dict[str, Path] = {}
    for f, keys in inputs:
        for key in keys:
            if key in seen:
                raise UserError(
                    f"{key} is stored in both {seen[key].name} and {f.name}; the checkpoint is "
                    f"inconsistent, download it again"
                )
            seen[key] = f


def _vision_sanitizer(config: ModelConfig) -> Callable[[dict[str, mx.array]], dict[str, mx.array]]:
    from .vision import VisionModel

    # Built once; its parameters are lazy and never evaluated, only sanitize_hf is used.
    return VisionModel(config.vision).sanitize_hf


def _note_decision(plan: Plan, key: str | None, decision: Decision, size: int) -> None:
    path = key.removesuffix(".weight") if key else None
    if decision.spec is not None:
        plan.quantized[path] = (decision.spec, size)
    elif decision.reason and plan.ctx.recipe is not None:
        plan.kept[key] = decision.reason


def _check_complete(
    source: Path, config: ModelConfig, keep_vision: bool, planned: set[str], plan: Plan
) -> None:
    """The text (and vision) tensors must be exactly what our model holds: a partial download or
    another architecture fails here, not when someone loads the output."""
    from mlx.utils import tree_flatten

    from .model import Model

    expected = {
        k for k, _ in tree_flatten(Model(config).parameters()) if k.startswith("language_model.")
    }
    if keep_vision:
        from .vision import VisionModel

        expected |= {
            f"vision_tower.{k}" for k, _ in tree_flatten(VisionModel(config.vision).parameters())
        }
    for path, (spec, _) in plan.quantized.items():
        if not _is_mtp(path):
            expected.add(f"{path}.scales")
            if spec.mode == "affine":
                expected.add(f"{path}.biases")
    missing, extra = sorted(expected - planned), sorted(planned - expected)
    if missing:
        raise UserError(
            f"{source}: {len(missing)} tensors the model needs are missing (e.g. {missing[0]}); "
            f"the download is incomplete or this is not a Qwen3.5 checkpoint"
        )
    if extra:
        raise UserError(
            f"{source}: {len(extra)} tensors do not belong to a dense Qwen3.5 model (e.g. "
            f"{extra[0]}); convert the original checkpoint of a dense Qwen3.5 model"
        )


def _assign_shards(groups: list[list[Tensor]], max_bytes: int) -> dict[str, list[Tensor]]:
    """Fill shards in order, up to `max_bytes` each; a tensor's packed parts stay together."""
    shards: list[list[Tensor]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(t.nbytes for t in group)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1] += group
        size += nbytes
    n = len(shards)
    if n == 1:
        return {"model.safetensors": shards[0]}
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": s for i, s in enumerate(shards)}


def _config_json(
    config: ModelConfig,
    dtype_name: str,
    recipe: Recipe | None,
    quantized: dict[str, tuple[QuantSpec, int]],
) -> dict[str, Any]:
    out = config.to_dict()
    for key in ("quantization", "quantization_config", "_name_or_path"):
        out.pop(key, None)
    out["dtype"] = dtype_name
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype_name
    if recipe is not None and quantized:
        block = quantization_block(recipe, quantized)
        # mlx-lm writes both names; mlx-vlm and HF tooling look at quantization_config.
        out["quantization"] = block
        out["quantization_config"] = block
    return out


def _side_files(source: Path, keep_vision: bool) -> list[Path]:
    found: dict[str, Path] = {}
    for pattern in _COPY_PATTERNS:
        for p in source.glob(pattern):
            skip = p.name in _NOT_COPIED or p.name.endswith(".index.json")
            if p.is_file() and not skip and (keep_vision or p.name not in _VISION_FILES):
                found[p.name] = p
    return [found[name] for name in sorted(found)]


# ---------------------------------------------------------------- safetensors writing


def _header(tensors: list[Tensor]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": _METADATA}
    offset = 0
    for t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise UserError(f"{t.key}: dtype {t.dtype} cannot be stored in safetensors")
        entries[t.key] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


def _shard_size(tensors: list[Tensor]) -> int:
    return len(_header(tensors)) + sum(t.nbytes for t in tensors)


class _ShardWriter:
    """Writes a safetensors file whose header is known up front, one tensor at a time."""

    def __init__(self, path: Path, tensors: list[Tensor]):
        self.path = path
        self.pending = list(tensors)
        self.file = open(path, "wb")
        self.file.write(_header(tensors))

    def write(self, key: str, value: mx.array) -> None:
        want = self.pending.pop(0)
        if (key, tuple(value.shape), value.dtype) != (want.key, want.shape, want.dtype):
            raise RuntimeError(f"{key}: produced {value.shape} {value.dtype}, planned {want}")
        data = memoryview(value)
        if not data.c_contiguous:
            raise RuntimeError(f"{key}: not row-contiguous")
        self.file.write(data)

    @property
    def done(self) -> bool:
        return not self.pending

    def close(self) -> None:
        self.file.close()


def _write_weights(plan: Plan, folder: Path, report: bool, progress: bool) -> dict:
    """Stream every tensor into its output file; with `report`, the per-tensor errors."""
    from tqdm import tqdm

    file_of = {t.key: name for name, ts in plan.files.items() for t in ts}
    writers: dict[str, _ShardWriter] = {}
    errors: dict[str, tuple[int, float]] = {}
    bar = tqdm(
        total=sum(t.nbytes for ts in plan.files.values() for t in ts),
        unit="B",
        unit_scale=True,
        desc="Converting",
        disable=not progress,
    )
    try:
        for shard, keys in plan.inputs:
            bar.set_postfix_str(shard.name)
            weights = _open_lazy(shard)
            for key in keys:
                tensors, new, original, decision = _convert_tensor(key, weights.pop(key), plan.ctx)
                if not report:
                    original = None  # let MLX free the cast copy as soon as it is packed
                tensors = {k: mx.contiguous(v) for k, v in tensors.items()}
                mx.eval(tensors)
                if report and decision.spec is not None:
                    restored = dequantize(tensors, new, decision.spec)
                    errors[new] = (decision.spec.bits, quality.relative_error(original, restored))
                for k, v in tensors.items():
                    name = file_of[k]
                    if name not in writers:
                        writers[name] = _ShardWriter(folder / name, plan.files[name])
                    writers[name].write(k, v)
                    bar.update(v.nbytes)
                del tensors, original
                mx.clear_cache()
            del weights
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    unfinished = [w.path.name for w in writers.values() if not w.done]
    if unfinished or len(writers) != len(plan.files):
        raise RuntimeError(f"output shards incomplete: {unfinished}")
    return errors


# ---------------------------------------------------------------- the output directory


def _write_atomically(
    plan: Plan, out: Path, card: dict[str, Any], *, force: bool, report: bool, progress: bool
) -> ConversionResult:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise UserError(
            f"cannot write to {out.parent} ({e.strerror or e}); pick a writable --mlx-path"
        ) from None
    try:
        errors = _write_weights(plan, tmp, report, progress)
        _write_text(tmp, _index_json(plan), INDEX_FILE)
        _write_text(tmp, json.dumps(plan.config_json, indent=2, ensure_ascii=False), "config.json")
        for p in plan.copies:
            shutil.copy2(p, tmp / p.name)
        result_report = None
        if report:
            result_report = _quality_report(plan, tmp, errors)
            card["quality"] = result_report
        card["size_bytes"] = _dir_size(tmp)
        _write_text(tmp, model_card(**card), "README.md")
        _replace(tmp, out, force)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"writing {out} failed ({e}); nothing was written there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted((p.name, p.stat().st_size) for p in out.iterdir())
    print(f"Wrote {out} ({format_size(sum(s for _, s in files))})")
    return ConversionResult(out=out, files=files, report=result_report)


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished `tmp` to `out`; with `force` an existing `out` is set aside first and
    removed only once the new one is in place (put back if that fails or is interrupted)."""
    if not out.exists() and not out.is_symlink():
        os.rename(tmp, out)
        return
    if not force:
        raise UserError(f"{out} appeared while converting; nothing was replaced")
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, aside / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside / out.name, out)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _write_text(folder: Path, text: str, name: str) -> None:
    (folder / name).write_text(text + "\n", encoding="utf-8")


def _index_json(plan: Plan) -> str:
    weight_map = {t.key: name for name, ts in plan.files.items() if name != MTP_FILE for t in ts}
    total = sum(t.nbytes for name, ts in plan.files.items() if name != MTP_FILE for t in ts)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(index, indent=2)


def _dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _quality_report(plan: Plan, folder: Path, errors: dict) -> dict[str, Any]:
    print("Measuring quality against the unquantized model")
    result = quality.compare_dirs(plan.source, folder, plan.config_json["dtype"])
    result["tensors"] = quality.tensor_summary(errors)
    _write_text(folder, json.dumps(result, indent=2), REPORT_FILE)
    for line in quality.format_report(result):
        print(line)
    return result


def _check_disk(folder: Path, need: int) -> None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < need * 1.02:
        raise UserError(
            f"not enough disk space in {probe}: the output needs {format_size(need)}, "
            f"{format_size(free)} is free"
        )


# ---------------------------------------------------------------- summary, card, dry run


def _bits_table(plan: Plan) -> list[tuple[str, str, str]]:
    """Model card rows: which tensors got which bits, and their share of all weights."""
    recipe = plan.ctx.recipe
    if recipe is None or not plan.quantized:
        return []
    by_bits: dict[int, tuple[set[str], int]] = {}
    for path, (spec, size) in plan.quantized.items():
        kinds, total = by_bits.get(spec.bits, (set(), 0))
        kinds.add(quality.kind_of(path).removeprefix("mtp."))
        by_bits[spec.bits] = (kinds, total + size)
    all_weights = sum(t.nbytes // t.dtype.size for t in _unquantized_tensors(plan))
    all_weights += sum(size for _, size in plan.quantized.values())
    rows = []
    for bits in sorted(by_bits):
        kinds, total = by_bits[bits]
        what = (
            "all other linear and embedding layers"
            if bits == recipe.default.bits
            else ", ".join(sorted(kinds))
        )
        rows.append((what, str(bits), f"{100 * total / all_weights:.1f}%"))
    rest = all_weights - sum(size for _, size in plan.quantized.values())
    share = f"{100 * rest / all_weights:.1f}%"
    rows.append(
        ("unquantized (norms, conv1d, biases, kept layers)", plan.config_json["dtype"], share)
    )
    return rows


def _unquantized_tensors(plan: Plan) -> Iterator[Tensor]:
    quantized_keys = set()
    for path in plan.quantized:
        quantized_keys |= {f"{path}.weight", f"{path}.scales", f"{path}.biases"}
    for ts in plan.files.values():
        for t in ts:
            if t.key not in quantized_keys:
                yield t


def _recipe_line(plan: Plan) -> str:
    recipe = plan.ctx.recipe
    if recipe is None:
        return f"none ({plan.config_json['dtype']})"
    d = recipe.default
    return f"{recipe.name}: {d.bits}-bit {d.mode}, group size {d.group_size}. {recipe.description}"


def _card_inputs(plan: Plan, hf_path: str, title: str) -> dict[str, Any]:
    return dict(
        title=title,
        base_model=base_model_id(hf_path, plan.source, plan.config.raw),
        license_id=source_license(plan.source),
        recipe_line=_recipe_line(plan),
        bits_table=_bits_table(plan),
        dtype=plan.config_json["dtype"],
        size_bytes=0,
        vision=plan.ctx.vision_sanitize is not None,
        mtp=MTP_FILE in plan.files,
        quality=None,
    )


def _planned_files(plan: Plan, card: dict[str, Any]) -> list[tuple[str, int]]:
    """What a real run would write, with sizes (exact for weights, index and config)."""
    files = [(name, _shard_size(ts)) for name, ts in plan.files.items()]
    files.append((INDEX_FILE, len(_index_json(plan).encode()) + 1))
    config_text = json.dumps(plan.config_json, indent=2, ensure_ascii=False)
    files.append(("config.json", len(config_text.encode()) + 1))
    files += [(p.name, p.stat().st_size) for p in plan.copies]
    card = dict(card, size_bytes=sum(size for _, size in files))
    files.append(("README.md", len(model_card(**card).encode()) + 1))
    return sorted(files)


def _print_plan(
    plan: Plan, out: Path, files: list[tuple[str, int]] | None, upload_repo: str | None
) -> None:
    n_in = len(plan.inputs)
    print(f"Source: {plan.source} ({plan.ctx.layout} layout, {n_in} shard{'s' * (n_in > 1)})")
    text = plan.config_json["text_config"]
    interval = text["full_attention_interval"]
    pattern = [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention"
        for i in range(len(text["layer_types"]))
    ]
    if pattern != text["layer_types"]:
        print(
            "Note: layer_types do not follow a fixed full_attention_interval; mlx-lm and mlx-vlm "
            "derive the layer pattern from that interval and cannot load this model"
        )
    print(f"Quantization: {_recipe_line(plan)}")
    if plan.quantized:
        counts: dict[int, int] = {}
        for spec, _ in plan.quantized.values():
            counts[spec.bits] = counts.get(spec.bits, 0) + 1
        summary = ", ".join(f"{n} at {b} bits" for b, n in sorted(counts.items()))
        print(f"Quantized layers: {summary}")
        reasons: dict[str, list[str]] = {}
        for key, why in sorted(plan.kept.items()):
            reasons.setdefault(why, []).append(key)
        for why, keys in reasons.items():
            print(f"  not quantized, {why}: {len(keys)} (e.g. {keys[0]})")
    if files is None:
        return
    total = sum(size for _, size in files)
    if upload_repo is None:
        print(f"Would write {len(files)} files ({format_size(total)}) to {out}:")
        for name, size in files:
            print(f"  {name}  {format_size(size)}")
        return
    print(f"Would write {len(files)} files ({format_size(total)}) to {out}, then:")
    for line in describe_upload(files, upload_repo):
        print(line)


# ---------------------------------------------------------------- command line


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--hf-path",
    "--model",
    "hf_path",
    required=True,
    help="Hub repo id or local directory of the original Qwen3.5 checkpoint.",
)
@click.option("--mlx-path", default="mlx_model", show_default=True, help="Output directory.")
@click.option(
    "-q", "--quantize", is_flag=True, help="Quantize with the 4bit recipe (8bit with --q-bits 8)."
)
@click.option(
    "--q-bits", type=click.Choice(["4", "8"]), help="Bits: picks the 4bit or 8bit recipe."
)
@click.option(
    "--q-group-size",
    type=click.Choice(["32", "64", "128"]),
    help="Quantization group size (default: the recipe's, 64).",
)
@click.option(
    "--recipe",
    help=f"A built-in recipe ({', '.join(builtin_names())}) or a recipe .json file; implies -q.",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    help="dtype of the unquantized tensors (default: the source's, else bfloat16).",
)
@click.option("--upload-repo", help="Upload the result to this Hub repo (USER/NAME).")
@click.option("--no-vision", is_flag=True, help="Leave out the vision tower (text-only output).")
@click.option("--no-mtp", is_flag=True, help="Leave out the multi-token-prediction head.")
@click.option("--force", is_flag=True, help="Replace --mlx-path if it exists.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print what would be written (and uploaded, and where); write nothing.",
)
@click.option(
    "--report",
    is_flag=True,
    help="Compare with the unquantized model: per-tensor error, mean KL, top-1 "
    "agreement (printed and saved as quality_report.json).",
)
def main(
    hf_path: str,
    mlx_path: str,
    quantize: bool,
    q_bits: str | None,
    q_group_size: str | None,
    recipe: str | None,
    dtype: str | None,
    upload_repo: str | None,
    no_vision: bool,
    no_mtp: bool,
    force: bool,
    dry_run: bool,
    report: bool,
) -> None:
    """Convert a Qwen3.5 checkpoint to MLX (optionally quantized) and optionally upload it."""
    try:
        convert(
            hf_path,
            mlx_path,
            quantize=quantize,
            q_bits=int(q_bits) if q_bits else None,
            q_group_size=int(q_group_size) if q_group_size else None,
            recipe=recipe,
            dtype=dtype,
            upload_repo=upload_repo,
            vision=not no_vision,
            mtp=not no_mtp,
            force=force,
            dry_run=dry_run,
            report=report,
            progress=sys.stderr.isatty(),
        )
    except UserError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(f"Error: interrupted; nothing was written to {mlx_path}", err=True)
        sys.exit(130)


class _CallableModule(types.ModuleType):
    """`mlx_qwen35.convert(...)` calls `convert()` whether the package attribute holds the
    function or, once `mlx_qwen35.convert` was imported as a module, this module."""

    def __call__(self, *args: Any, **kwargs: Any) -> ConversionResult:
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
