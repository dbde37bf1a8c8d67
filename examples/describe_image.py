"""Describe an image with Qwen3.5.

    python examples/describe_image.py --image photo.jpg
    python examples/describe_image.py --model tiny-random     # offline; draws a demo picture

tiny-random has random weights: it runs every step (preprocessing, vision tower, 3-D positions,
generation) but writes gibberish. Use a real checkpoint for a real description.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

import mlx_qwen35
from mlx_qwen35.cli.options import DEFAULT_MODEL


def demo_image(path: Path) -> Path:
    """A small drawing (sky, sun, house) so the example runs without a file of your own."""
    image = Image.new("RGB", (320, 240), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 170, 320, 240), fill=(90, 160, 70))
    draw.ellipse((230, 20, 290, 80), fill=(250, 210, 60))
    draw.rectangle((70, 110, 170, 190), fill=(200, 70, 60))
    draw.polygon([(60, 110), (120, 60), (180, 110)], fill=(120, 60, 40))
    image.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint, repo id or tiny-random")
    parser.add_argument("--image", help="image file (default: a drawn demo picture)")
    parser.add_argument("--prompt", default="Describe this image in two sentences.")
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()

    try:
        model, processor = mlx_qwen35.load(args.model)
        with tempfile.TemporaryDirectory() as tmp:
            image = args.image or demo_image(Path(tmp) / "demo.png")
            for response in mlx_qwen35.stream_generate(
                model,
                processor,
                args.prompt,
                args.max_tokens,
                images=[image],
                enable_thinking=False,
            ):
                print(response.text, end="", flush=True)
        print()
    except mlx_qwen35.UserError as e:
        sys.exit(f"Error: {e}")


if __name__ == "__main__":
    main()
