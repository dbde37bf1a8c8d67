"""`python -m mlx_qwen35.convert`: convert (and quantize, and upload) a Qwen3.5 checkpoint."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import click

from ..errors import UserError
from ..weights.recipes import builtin_names
from .options import DTYPES


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
    "--q-bits", type=click.Choice(["4", "8"]), help="With -q: the 4bit or 8bit recipe [4]."
)
@click.option(
    "--q-group-size",
    type=click.Choice(["32", "64", "128"]),
    help="With -q or --recipe: quantization group size (default: the recipe's, 64).",
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
    from ..weights.convert import convert  # here: --help answers without loading MLX models

    previous = _on_sigterm(_raise_terminated)
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
    except Terminated:
        click.echo(f"Error: terminated; nothing was written to {mlx_path}", err=True)
        sys.exit(128 + signal.SIGTERM)
    finally:
        _on_sigterm(previous)


class Terminated(BaseException):
    """SIGTERM, raised where the conversion is, so it unwinds (and removes its temporary
    directory of up to the model's size) the way Ctrl-C does, instead of dying on the spot."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _on_sigterm(handler: Any) -> Any:
    """Install `handler` for SIGTERM and return the previous one (signals can only be handled in
    the main thread; elsewhere nothing changes)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)
