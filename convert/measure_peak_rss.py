"""Peak resident memory of converting a 4B-sized checkpoint: ours against mlx-lm's converter.

Generates the synthetic checkpoint (make_synthetic_4b.py) unless it exists, converts it to 4-bit
with `python -m mlx_qwen35.convert` and with `mlx_lm.convert`, each in its own process, and prints
each process's peak RSS next to the budget 1.5 x (largest input shard + largest output shard).
Needs ~9 GB of disk for the input and ~3 GB per output; outside the test suite.

    python convert/measure_peak_rss.py --work /tmp/rss4b [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_synthetic_4b import write  # noqa: E402

GB = 1e9


def peak_rss(cmd: list[str]) -> int:
    """Run `cmd` and return its peak resident set size in bytes (Linux/macOS rusage)."""
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def largest_shard(folder: Path) -> int:
    return max(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/rss4b"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    parser.add_argument("--skip-mlx-lm", action="store_true")
    args = parser.parse_args()
    source, ours, theirs = args.work / "source", args.work / "ours", args.work / "mlx_lm"
    if not source.exists():
        print(f"writing the synthetic 4B checkpoint to {source}")
        write(source)
    for out in (ours, theirs):
        shutil.rmtree(out, ignore_errors=True)
    try:
        ours_rss = peak_rss(
            [
                sys.executable,
                "-m",
                "mlx_qwen35.convert",
                "--hf-path",
                str(source),
                "--mlx-path",
                str(ours),
                "-q",
            ]
        )
        rows = [("mlx_qwen35.convert -q", ours_rss, largest_shard(ours))]
        if not args.skip_mlx_lm:
            theirs_rss = peak_rss(
                [
                    sys.executable,
                    "-m",
                    "mlx_lm",
                    "convert",
                    "--hf-path",
                    str(source),
                    "--mlx-path",
                    str(theirs),
                    "-q",
                ]
            )
            rows.append(("mlx_lm convert -q", theirs_rss, largest_shard(theirs)))
        largest_in = largest_shard(source)
        budget = 1.5 * (largest_in + rows[0][2])
        print(
            f"largest input shard {largest_in / GB:.2f} GB, largest output shard "
            f"{rows[0][2] / GB:.2f} GB -> budget 1.5 x sum = {budget / GB:.2f} GB"
        )
        for name, rss, _ in rows:
            print(f"{name:<24} peak RSS {rss / GB:6.2f} GB  ({rss / budget:.0%} of the budget)")
    finally:
        for out in (ours, theirs):
            shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(source, ignore_errors=True)


if __name__ == "__main__":
    main()
