"""Saving a chat session to one safetensors file and loading it back.

The JSON parts (history, settings, token ids, snapshot positions) go into the file's metadata, the
arrays (caches, snapshots, processed images) into its tensors; no pickle. A loaded session is
checked against the model it is loaded with before anything of it is used.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import UserError
from ..model.cache import KVCache

SESSION_FORMAT = "mlx_qwen35.session"
SESSION_VERSION = 1


def save_session(session: Any, path: str | os.PathLike) -> None:
    """Write the session (history, settings, caches, snapshots, processed images) to one
    safetensors file, the JSON parts in its metadata; atomically (temp file + rename)."""
    session._finish_pending()
    path = Path(path).expanduser()
    arrays: dict[str, mx.array] = {}
    _save_cache(arrays, session._cache)
    snapshots = []
    for j, snapshot in enumerate(session._snapshots):
        _save_snapshot(arrays, f"snapshot.{j}", snapshot.layers)
        snapshots.append({"position": snapshot.position, "anchor": snapshot.anchor})
    segments = []
    for j, seg in enumerate(s for s in session._segments.values() if s.media):
        for key, value in seg.arrays.items():
            arrays[f"segment.{j}.{key}"] = value
        segments.append(
            {
                "text": seg.text,
                "media": list(seg.media),
                "ids": seg.ids,
                "keys": list(seg.arrays),
            }
        )
    state = {
        "model": _fingerprint(session.model),
        "settings": session._settings(),
        "messages": session._messages,
        "media": {str(i): [kind for kind, _ in m] for i, m in session._media.items()},
        "cached": session._cached,
        "snapshots": snapshots,
        "segments": segments,
    }
    metadata = {
        "format": SESSION_FORMAT,
        "version": str(SESSION_VERSION),
        "session": json.dumps(state, ensure_ascii=False),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            mx.save_safetensors(f, arrays, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_session(
    cls: Any, path: str | os.PathLike, model: Any, processor: Any, **overrides: Any
) -> Any:
    """A session saved by `save`, ready to continue; `overrides` replace saved settings
    (and give `logits_processors`, which are not saved)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such session file")
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # MLX raises RuntimeError/ValueError with multi-line text
        raise UserError(f"{path}: not a readable session file ({_first_line(e)})") from e
    try:
        if metadata.get("format") != SESSION_FORMAT:
            raise ValueError("not a chat session file")
        if metadata.get("version") != str(SESSION_VERSION):
            raise ValueError(f"session format version {metadata.get('version')} is unknown")
        state = json.loads(metadata["session"])
        if state["model"] != _fingerprint(model):
            raise UserError(
                f"{path}: this session was saved with a different model; load it with the "
                "model it was saved with"
            )
        settings = {**state["settings"], **overrides}
        session = cls(model, processor, **settings)
        _restore(session, state, arrays)
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise UserError(f"{path}: corrupted session file ({_first_line(e)})") from e
    return session


def _restore(session: Any, state: dict[str, Any], arrays: dict[str, mx.array]) -> None:
    from .session import _Segment, _Snapshot

    session._messages = list(state["messages"])
    # The raw images are gone; their processed form is in the segments.
    session._media = {
        int(i): [(kind, None) for kind in kinds] for i, kinds in state["media"].items()
    }
    session._cached = [int(t) for t in state["cached"]]
    args = session.model.args
    _load_cache(session._cache, arrays, len(session._cached), args)
    session._snapshots = []
    for j, s in enumerate(state["snapshots"]):
        position = int(s["position"])
        if not 0 < position <= len(session._cached):
            raise ValueError(f"snapshot {j} at position {position} is outside the cache")
        layers = _load_snapshot(session._cache, arrays, f"snapshot.{j}", args)
        session._snapshots.append(_Snapshot(position, bool(s["anchor"]), layers))
    session._segments = {}
    for j, seg in enumerate(state["segments"]):
        arrays_j = {k: arrays[f"segment.{j}.{k}"] for k in seg["keys"]}
        media = tuple(int(i) for i in seg["media"])
        session._segments[(seg["text"], media)] = _Segment(
            seg["text"], media, [int(t) for t in seg["ids"]], arrays_j
        )


def _fingerprint(model: Any) -> dict[str, Any]:
    c = model.args
    return {
        "layer_types": list(c.layer_types),
        "hidden_size": c.hidden_size,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "linear": [
            c.linear_num_key_heads,
            c.linear_num_value_heads,
            c.linear_key_head_dim,
            c.linear_value_head_dim,
            c.linear_conv_kernel_dim,
        ],
        "vocab_size": c.vocab_size,
    }


def _save_cache(arrays: dict[str, mx.array], cache: list[Any]) -> None:
    for i, c in enumerate(cache):
        if isinstance(c, KVCache):
            if c.keys is not None and c.offset:
                arrays[f"cache.{i}.keys"] = c.keys[..., : c.offset, :]
                arrays[f"cache.{i}.values"] = c.values[..., : c.offset, :]
            if c.rope_delta is not None:
                arrays[f"cache.{i}.rope_delta"] = c.rope_delta
        elif c[1] is not None:
            arrays[f"cache.{i}.conv"], arrays[f"cache.{i}.state"] = c[0], c[1]


def _save_snapshot(arrays: dict[str, mx.array], prefix: str, layers: list[Any]) -> None:
    for i, layer in enumerate(layers):
        if isinstance(layer, tuple):
            arrays[f"{prefix}.{i}.conv"], arrays[f"{prefix}.{i}.state"] = layer
        elif layer is not None:
            arrays[f"{prefix}.{i}.rope_delta"] = layer


def _load_cache(cache: list[Any], arrays: dict[str, mx.array], length: int, args: Any) -> None:
    for i, c in enumerate(cache):
        if isinstance(c, KVCache):
            if length:
                keys, values = arrays[f"cache.{i}.keys"], arrays[f"cache.{i}.values"]
                if keys.ndim != 4 or keys.shape[2] != length or values.shape[2] != length:
                    raise ValueError(f"layer {i} does not hold {length} positions")
                c.state = (keys, values, length)
            c.rope_delta = arrays.get(f"cache.{i}.rope_delta")
        elif length:
            c[0], c[1] = _gdn_states(arrays, f"cache.{i}", args)


def _load_snapshot(
    cache: list[Any], arrays: dict[str, mx.array], prefix: str, args: Any
) -> list[Any]:
    return [
        arrays.get(f"{prefix}.{i}.rope_delta")
        if isinstance(c, KVCache)
        else _gdn_states(arrays, f"{prefix}.{i}", args)
        for i, c in enumerate(cache)
    ]


def _gdn_states(arrays: dict[str, mx.array], prefix: str, args: Any) -> tuple[mx.array, mx.array]:
    conv, state = arrays[f"{prefix}.conv"], arrays[f"{prefix}.state"]
    conv_shape = (1, args.linear_conv_kernel_dim - 1, args.conv_dim)
    state_shape = (
        1,
        args.linear_num_value_heads,
        args.linear_value_head_dim,
        args.linear_key_head_dim,
    )
    if tuple(conv.shape) != conv_shape or tuple(state.shape) != state_shape:
        raise ValueError(f"{prefix}: DeltaNet state of the wrong shape")
    return conv, state


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
