"""Convert the Qwen3.5 family in 4- and 8-bit, and optionally upload.

    python convert/convert_family.py --out-dir ~/mlx-models
    python convert/convert_family.py --out-dir ~/mlx-models --upload-namespace my-user
    python convert/convert_family.py --out-dir /tmp/x --upload-namespace my-user --dry-run
    python convert/convert_family.py --out-dir ~/mlx-models --sizes 27B 35B-A3B --recipes mixed

Without --sizes the small dense models (0.8B, 2B, 4B, 9B) are converted; the large ones (27B and
the MoE 35B-A3B, 122B-A10B, 397B-A17B) are named explicitly. Each model goes to
OUT_DIR/Qwen3.5-<size>-<recipe> (uploaded as NAMESPACE/Qwen3.5-<size>-<recipe>). Conversions run
one after another; each streams one tensor (one expert of a stack) at a time, so memory stays near
the largest source tensor whatever the model's size: the 9B fits an 8 GB Mac, and the 397B needs
disk (about 800 GB in, 220 GB out at 4 bits), not memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlx_qwen35.errors import UserError
from mlx_qwen35.weights.convert import convert

SMALL = ("0.8B", "2B", "4B", "9B")
SIZES = SMALL + ("27B", "35B-A3B", "122B-A10B", "397B-A17B")
RECIPES = ("4bit", "8bit")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--upload-namespace", help="Hub user or organisation to upload to")
    parser.add_argument("--sizes", nargs="+", default=list(SMALL), choices=SIZES)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    parser.add_argument("--dry-run", action="store_true", help="show the plans, write nothing")
    args = parser.parse_args(argv)
    for size in args.sizes:
        for recipe in args.recipes:
            name = f"Qwen3.5-{size}-{recipe}"
            repo = f"{args.upload_namespace}/{name}" if args.upload_namespace else None
            print(f"== Qwen/Qwen3.5-{size} -> {name}", flush=True)
            try:
                convert(
                    f"Qwen/Qwen3.5-{size}",
                    args.out_dir.expanduser() / name,
                    recipe=recipe,
                    upload_repo=repo,
                    force=args.force,
                    dry_run=args.dry_run,
                )
            except UserError as e:
                sys.exit(f"Error: {e}")


if __name__ == "__main__":
    main()
