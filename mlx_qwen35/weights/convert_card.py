"""What a conversion tells people: the plan summary, the model card's inputs, the dry run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import quality
from .convert_plan import (
    INDEX_FILE,
    MTP_FILE,
    Plan,
    Tensor,
    file_size,
)
from .convert_write import _index_json
from .upload import (
    base_model_id,
    describe_upload,
    format_size,
    model_card,
    source_license,
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
    files = [(name, file_size(ts)) for name, ts in plan.files.items()]
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
