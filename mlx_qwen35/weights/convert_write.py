"""Writing a planned conversion: safetensors shards with their headers first, streamed tensor by
tensor, into a temporary directory that is renamed into place at the end."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import UserError
from . import quality
from .convert_plan import (
    INDEX_FILE,
    MTP_FILE,
    REPORT_FILE,
    ConversionResult,
    Plan,
    Tensor,
    _convert_tensor,
    _header,
    _open_lazy,
)
from .quantize import dequantize
from .upload import (
    format_size,
    model_card,
)

# ---------------------------------------------------------------- safetensors writing


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
        # mkdtemp makes it private (0700); the finished folder gets what the umask gives any
        # new directory, as `mkdir` would.
        os.chmod(tmp, 0o777 & ~_umask())
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


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _existing_ancestor(folder: Path) -> Path:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _check_writable(folder: Path) -> None:
    """UserError unless a directory can be created in `folder` (or, if it does not exist yet,
    in its nearest existing ancestor): checked before the disk space, since a location we cannot
    write to often reports no free space at all (/proc, read-only mounts)."""
    probe = _existing_ancestor(folder)
    if not probe.is_dir():
        raise UserError(f"cannot write to {folder}: {probe} is a file; pick another --mlx-path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mlx_qwen35-probe-", dir=probe))
    except OSError as e:
        raise UserError(
            f"cannot write to {probe} ({e.strerror or e}); pick a writable --mlx-path"
        ) from None


def _check_disk(folder: Path, need: int) -> None:
    probe = _existing_ancestor(folder)
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < need * 1.02:
        raise UserError(
            f"not enough disk space in {probe}: the output needs {format_size(need)}, "
            f"{format_size(free)} is free"
        )
