"""Ask Qwen3.5 about a short video.

    python examples/ask_about_video.py --video clip.mp4 --prompt "What happens?"   # needs PyAV
    python examples/ask_about_video.py --video clip.gif --fps 4
    python examples/ask_about_video.py --model tiny-random    # offline; draws a demo clip

A video is a file (through PyAV: pip install 'mlx-qwen35[video]'), an animated GIF/WebP or a folder
of frame images. Frames are sampled at --fps (default 2) and each temporal group gets its timestamp
in the prompt, so the model can say when things happen. tiny-random has random weights: it runs
every step but writes gibberish.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

import mlx_qwen35
from mlx_qwen35.cli.options import DEFAULT_MODEL


def demo_clip(path: Path, frames: int = 12) -> Path:
    """An animated GIF of a ball rolling left to right, 4 frames per second."""
    images = []
    for i in range(frames):
        image = Image.new("RGB", (160, 96), (240, 240, 240))
        x = 10 + i * 120 // (frames - 1)
        ImageDraw.Draw(image).ellipse((x, 40, x + 30, 70), fill=(220, 40, 40))
        images.append(image)
    images[0].save(path, save_all=True, append_images=images[1:], duration=250, loop=0)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint, repo id or tiny-random")
    parser.add_argument("--video", help="video file, GIF/WebP or folder of frames (default: demo)")
    parser.add_argument("--prompt", default="What happens in this video, and when?")
    parser.add_argument("--fps", type=float, default=None, help="frames sampled per second")
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()

    try:
        model, processor = mlx_qwen35.load(args.model)
        with tempfile.TemporaryDirectory() as tmp:
            video = args.video or demo_clip(Path(tmp) / "demo.gif")
            for response in mlx_qwen35.stream_generate(
                model,
                processor,
                args.prompt,
                args.max_tokens,
                videos=[video],
                fps=args.fps,
                max_frames=args.max_frames,
                enable_thinking=False,
            ):
                print(response.text, end="", flush=True)
        print()
    except mlx_qwen35.UserError as e:
        sys.exit(f"Error: {e}")


if __name__ == "__main__":
    main()
