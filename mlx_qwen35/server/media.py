"""Images and videos named by a request: `data:` URLs, http(s) URLs, and local paths (or file://
URLs) only when the server runs with --allow-local-files. Every image is checked before it is
decoded (size in bytes, pixel count), so a request cannot make the server decode a bomb."""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import APIError

FETCH_TIMEOUT_S = 20


@dataclass
class MediaLimits:
    allow_local_files: bool = False
    max_bytes: int = 64 * 1024 * 1024  # per image or video
    max_image_pixels: int = 40_000_000


class TempFiles:
    """Downloaded videos, deleted when the request has been prepared."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __enter__(self) -> TempFiles:
        return self

    def __exit__(self, *exc: Any) -> None:
        for path in self.paths:
            Path(path).unlink(missing_ok=True)


def load_image(url: Any, limits: MediaLimits, param: str) -> Any:
    """A PIL image (RGB) for an image URL, or a 400 APIError saying what was wrong."""
    from PIL import Image

    data = _read(url, limits, param)
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise APIError(
                400,
                f"{param}: the image is {width}x{height} pixels, more than the server's limit "
                f"of {limits.max_image_pixels}; send a smaller image",
                param=param,
            )
        image.load()
    except APIError:
        raise
    except Exception as e:  # PIL raises many kinds for undecodable data
        raise APIError(400, f"{param}: cannot decode the image ({e})", param=param) from e
    return image.convert("RGB")


def load_video(source: Any, limits: MediaLimits, param: str, temp: TempFiles) -> Any:
    """A video for the processor: a list of frame images for a list of URLs, else the path of
    a local copy of the file (decoded by the video processor)."""
    if isinstance(source, list):
        if not source:
            raise APIError(400, f"{param}: a video needs at least one frame", param=param)
        return [load_image(u, limits, f"{param}[{i}]") for i, u in enumerate(source)]
    local = _local_path(source)
    if local is not None:
        _check_local(local, limits, param)
        return str(local)
    data = _read(source, limits, param)
    handle, path = tempfile.mkstemp(prefix="mlx_qwen35-video-", suffix=".bin")
    temp.paths.append(path)
    with os.fdopen(handle, "wb") as f:
        f.write(data)
    return path


def _read(url: Any, limits: MediaLimits, param: str) -> bytes:
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{param}: expected a URL string", param=param)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise APIError(400, f"{param}: only base64 data: URLs are supported", param=param)
        if len(payload) * 3 // 4 > limits.max_bytes:
            raise APIError(413, f"{param}: the data is larger than the server's limit", param=param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"{param}: the data: URL is not valid base64", param=param) from e
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch(url, limits, param)
    local = _local_path(url)
    if local is None:
        raise APIError(
            400, f"{param}: unsupported URL scheme {scheme!r}; use data:, http(s)", param=param
        )
    _check_local(local, limits, param)
    return local.read_bytes()


def _local_path(url: str) -> Path | None:
    if not isinstance(url, str):
        return None
    if url.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme and len(scheme) > 1:  # "C:" style drive letters are paths
        return None
    return Path(url)


def _check_local(path: Path, limits: MediaLimits, param: str) -> None:
    if not limits.allow_local_files:
        raise APIError(
            400,
            f"{param}: local files are refused; start the server with --allow-local-files, or "
            "send the data as a data: URL",
            param=param,
        )
    if not path.is_file():
        raise APIError(400, f"{param}: no such file: {path}", param=param)
    if path.stat().st_size > limits.max_bytes:
        raise APIError(413, f"{param}: the file is larger than the server's limit", param=param)


def _fetch(url: str, limits: MediaLimits, param: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310
            data = response.read(limits.max_bytes + 1)
    except Exception as e:  # URLError, HTTPError, timeouts, bad hosts
        raise APIError(400, f"{param}: cannot fetch {url} ({e})", param=param) from e
    if len(data) > limits.max_bytes:
        raise APIError(413, f"{param}: {url} is larger than the server's limit", param=param)
    return data
