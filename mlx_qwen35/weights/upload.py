"""Sharing a converted model: the model card, and the upload to the Hugging Face Hub.

The upload goes through `huggingface_hub.HfApi` (create the repo if needed, upload the folder); the
token comes from where huggingface_hub always looks (`HF_TOKEN`, then `hf auth login`'s cache).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
MTP_NOTE = "in mtp.safetensors (mlx-lm and mlx-vlm ignore it)"
_HF_CACHE_DIR = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/")


def check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise UserError(
            f"--upload-repo {repo_id!r} is not a Hugging Face repo id; use USER/NAME "
            f"(letters, digits, '-', '_', '.')"
        )


def check_token() -> None:
    """Fail before a long conversion when there is no token to upload with."""
    from huggingface_hub import get_token

    if not get_token():
        raise UserError(
            "--upload-repo needs a Hugging Face token: run `hf auth login` or set HF_TOKEN"
        )


def upload(folder: Path, repo_id: str) -> str:
    """Create `repo_id` (a model repo, kept if it exists) and upload `folder` into it; the URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=f"Upload {folder.name} converted with mlx-qwen35",
        )
    except Exception as e:  # huggingface_hub raises many types: auth, network, HTTP
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"upload to {repo_id} failed ({type(e).__name__}: {first}); the converted model is "
            f"at {folder}: check your token and network, then run `hf upload {repo_id} {folder}`"
        ) from None
    return f"https://huggingface.co/{repo_id}"


def describe_upload(files: Sequence[tuple[str, int]], repo_id: str) -> list[str]:
    """The lines --dry-run prints for an upload: where, and every file with its size."""
    total = sum(size for _, size in files)
    lines = [
        f"Would upload {len(files)} files ({format_size(total)}) to "
        f"https://huggingface.co/{repo_id} (model repo, created if missing):"
    ]
    lines += [f"  {name}  {format_size(size)}" for name, size in files]
    return lines


def format_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def base_model_id(hf_path: str, source_dir: Path, raw_config: dict[str, Any]) -> str | None:
    """The Hub id the conversion started from, when it can be known."""
    if not Path(hf_path).expanduser().exists() and _REPO_ID.match(hf_path):
        return hf_path
    cached = _HF_CACHE_DIR.search(str(source_dir.resolve()) + "/")
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    name = raw_config.get("_name_or_path")
    if isinstance(name, str) and _REPO_ID.match(name) and not Path(name).exists():
        return name
    return None


def source_license(source_dir: Path) -> str | None:
    """The `license:` of the source's model card front matter, if it has one."""
    readme = source_dir / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    match = re.search(r"^license:\s*(\S+)\s*$", front, re.MULTILINE)
    return match.group(1) if match else None


def model_card(
    *,
    title: str,
    base_model: str | None,
    license_id: str | None,
    recipe_line: str,
    bits_table: Sequence[tuple[str, str, str]],
    dtype: str,
    size_bytes: int,
    vision: bool,
    mtp: bool,
    quality: dict[str, Any] | None,
) -> str:
    """README.md for the converted model (Hub metadata front matter + usage)."""
    repo = title
    front = ["---", "library_name: mlx"]
    if license_id:
        front.append(f"license: {license_id}")
    if base_model:
        front += ["base_model:", f"- {base_model}", "base_model_relation: quantized"]
    front.append(f"pipeline_tag: {'image-text-to-text' if vision else 'text-generation'}")
    front += ["tags:", "- mlx", "- mlx-qwen35", "- qwen3_5", "---", ""]
    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "Qwen3.5"
    lines = [
        f"# {title}",
        "",
        f"{source} converted to MLX with mlx-qwen35 "
        f"(format 1: norms hold 1 + w, conv1d in MLX layout).",
        "",
        "| | |",
        "|---|---|",
        f"| Quantization | {recipe_line} |",
        f"| Other tensors | {dtype} (A_log and the DeltaNet norm in float32) |",
        f"| Size on disk | {format_size(size_bytes)} |",
        f"| Vision tower | {'included' if vision else 'removed (text only)'} |",
        f"| MTP head | {MTP_NOTE if mtp else 'removed'} |",
        "",
    ]
    if bits_table:
        lines += ["| Tensors | Bits | Share of weights |", "|---|---|---|"]
        lines += [f"| {what} | {bits} | {share} |" for what, bits, share in bits_table]
        lines.append("")
    if quality:
        lines += [
            "Against the unquantized model on fixed token sequences: mean KL "
            f"{quality['mean_kl']:.4g} nats, top-1 agreement {100 * quality['top1']:.1f}% "
            "(details in quality_report.json).",
            "",
        ]
    lines += [
        "## Use",
        "",
        "With mlx-qwen35 (text, images and video):",
        "",
        "```bash",
        "pip install mlx-qwen35",
        f'python -m mlx_qwen35.generate --model {repo} --prompt "Hello"',
        "```",
        "",
        "With mlx-lm (text only):",
        "",
        "```python",
        "from mlx_lm import load, generate",
        f'model, tokenizer = load("{repo}")',
        'print(generate(model, tokenizer, prompt="Hello", max_tokens=100))',
        "```",
        "",
    ]
    if vision:
        lines += [
            "With mlx-vlm:",
            "",
            "```bash",
            f"python -m mlx_vlm.generate --model {repo} --image photo.jpg "
            '--prompt "Describe this image."',
            "```",
            "",
        ]
    return "\n".join(front + lines)
