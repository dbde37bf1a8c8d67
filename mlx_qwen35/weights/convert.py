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

from pathlib import Path

from ..errors import UserError
from .convert_card import _card_inputs, _planned_files, _print_plan
from .convert_plan import (
    DTYPES,
    MAX_SHARD_BYTES,
    ConversionResult,
    _choose_recipe,
    make_plan,
)
from .convert_write import _check_disk, _check_writable, _write_atomically
from .loading import (
    resolve_model_path,
)
from .upload import (
    check_repo_id,
    check_token,
    upload,
)


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
    _check_writable(out.parent)
    _check_disk(out.parent, plan.weight_bytes)
    _print_plan(plan, out, None, None)
    result = _write_atomically(plan, out, card, force=force, report=report, progress=progress)
    if upload_repo is not None:
        print(f"Uploading {out} to {upload_repo}")
        result.url = upload(out, upload_repo)
        print(f"Uploaded: {result.url}")
    return result
