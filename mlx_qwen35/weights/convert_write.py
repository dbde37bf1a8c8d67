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
    _open_lazy,
    unit_pieces,
)
from .quantize import dequantize
from .safetensors_file import ShardWriter
from .upload import (
    format_size,
    model_card,
)

# ---------------------------------------------------------------- safetensors writing


def _write_weights(plan: Plan, folder: Path, report: bool, progress: bool) -> dict:
    """Stream every tensor into its output file; with `report`, the per-tensor errors."""
    from tqdm import tqdm

    file_of = {t.key: name for name, ts in plan.files.items() for t in ts}
    shard_of = {key: shard for shard, keys in plan.inputs for key in keys}
    writers: dict[str, ShardWriter] = {}
    sums: dict[str, tuple[int, float, float]] = {}  # key -> (bits, sum diff^2, sum original^2)
    bar = tqdm(
        total=sum(t.nbytes for ts in plan.files.values() for t in ts),
        unit="B",
        unit_scale=True,
        desc="Converting",
        disable=not progress,
    )
    # Every shard is opened lazily up front (nothing is read until evaluated): an expert stack
    # may draw on several shards. Each source is dropped once its unit is written.
    lazy: dict[str, mx.array] = {}
    for shard, _ in plan.inputs:
        lazy.update(_open_lazy(shard))
    try:
        for unit in plan.units:
            bar.set_postfix_str(shard_of[unit.sources[-1]].name)
            for piece in unit_pieces(unit, lazy, plan.ctx):
                tensors = {k: mx.contiguous(v) for k, v in piece.tensors.items()}
                original = piece.original if report else None
                mx.eval(tensors)
                if report and piece.decision.spec is not None:
                    restored = dequantize(tensors, piece.key, piece.decision.spec)
                    bits, d2, a2 = sums.get(piece.key, (piece.decision.spec.bits, 0.0, 0.0))
                    d2_piece, a2_piece = quality.squared_error(original, restored)
                    sums[piece.key] = (bits, d2 + d2_piece, a2 + a2_piece)
                for k, v in tensors.items():
                    name = file_of[k]
                    if name not in writers:
                        writers[name] = ShardWriter(folder / name, plan.files[name])
                    writers[name].write(k, v, piece.index)
                    bar.update(v.nbytes)
                del tensors, original, piece
                mx.clear_cache()
            for source in unit.sources:
                lazy.pop(source)
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    unfinished = [w.path.name for w in writers.values() if not w.done]
    if unfinished or len(writers) != len(plan.files):
        raise RuntimeError(f"output shards incomplete: {unfinished}")
    return {key: (bits, (d2 / max(a2, 1e-30)) ** 0.5) for key, (bits, d2, a2) in sums.items()}


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
