"""Saving a chat session to one safetensors file and loading it back.

The JSON parts (history, settings, rendered segments, the session's prefix-cache entries: their
tokens, media keys and kind) go into the file's metadata, the arrays (each entry's KV and DeltaNet
states, processed images) into its tensors; no pickle. Loading checks everything against the model
it is loaded with (every field's type and range, every tensor's full shape and dtype) before any
of it is used, so a bad file is one UserError line and changes nothing; then the entries go into
the engine's prefix cache, and the next turn resumes exactly where the saved session would have.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import UserError
from .prefix_cache import PrefixEntry
from .request import MediaSpan
from .session_render import MEDIA_KEYS, Segment

SESSION_FORMAT = "mlx_qwen35.session"
SESSION_VERSION = 2
SETTINGS = (
    "system",
    "tools",
    "enable_thinking",
    "thinking_budget",
    "max_tokens",
    "temp",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "seed",
    "prefill_step_size",
    "max_snapshots",
)
ROLES = ("system", "user", "assistant", "tool")
MAX_JSON_DEPTH = 64


def save_session(session: Any, path: str | os.PathLike) -> None:
    """Write `session` to `path` atomically (temp file + rename). The directory must exist; any
    OS error is one UserError line."""
    path = Path(path).expanduser()
    arrays: dict[str, mx.array] = {}
    conversation = session._conversation
    segments = []
    for j, seg in enumerate(s for s in conversation.segments.values() if s.media):
        for key, value in seg.arrays.items():
            arrays[f"segment.{j}.{key}"] = value
        segments.append({"text": seg.text, "media": list(seg.media), "ids": seg.ids})
    entries = []
    for j, entry in enumerate(session.engine.prefix_cache.entries(session._owner)):
        for i, (_, layer) in enumerate(entry.layers):
            for k, array in enumerate(layer):
                arrays[f"entry.{j}.{i}.{k}"] = array
        if entry.rope_delta is not None:
            arrays[f"entry.{j}.rope_delta"] = entry.rope_delta
        entries.append(
            {
                "tokens": list(entry.tokens),
                "media": [list(m) for m in entry.media],
                "kind": entry.kind,
            }
        )
    state = {
        "model": _fingerprint(session.model),
        "settings": session._settings(),
        "messages": conversation.messages,
        "media": {str(i): [kind for kind, _ in m] for i, m in conversation.media.items()},
        "segments": segments,
        "entries": entries,
        "anchors": sorted(session._anchors),
    }
    metadata = {
        "format": SESSION_FORMAT,
        "version": str(SESSION_VERSION),
        "session": json.dumps(state, ensure_ascii=False, allow_nan=False),
    }
    if path.is_dir():
        raise UserError(f"cannot save the session to {path}: it is a directory; give a file name")
    if not path.parent.is_dir():
        raise UserError(
            f"cannot save the session to {path}: the directory {path.parent} does not exist"
        )
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot save the session to {path}: {_reason(e)}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            mx.save_safetensors(f, arrays, metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot save the session to {path}: {_reason(e)}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_session(
    cls: Any, path: str | os.PathLike, model: Any, processor: Any, **overrides: Any
) -> Any:
    """A session saved by `save_session`, checked against `model` and ready to continue;
    `overrides` replace saved settings."""
    path = Path(path).expanduser()
    try:
        if not path.is_file():
            raise UserError(f"{path}: no such session file")
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"{path}: cannot read the session file ({_reason(e)})") from e
    except Exception as e:  # MLX raises RuntimeError/ValueError with multi-line text
        raise UserError(f"{path}: not a readable session file ({_first_line(e)})") from e
    try:
        if metadata.get("format") != SESSION_FORMAT:
            raise ValueError("not a chat session file")
        if metadata.get("version") != str(SESSION_VERSION):
            raise ValueError(
                f"session format version {metadata.get('version')} is not {SESSION_VERSION}; "
                "it was saved by another version of mlx-qwen35"
            )
        state = _parse_json(metadata.get("session"))
        _expect(state, dict, "the session")
        if state.get("model") != _fingerprint(model):
            raise UserError(
                f"{path}: this session was saved with a different model; load it with the "
                "model it was saved with"
            )
        settings = _settings(state.get("settings"))
        session = cls(model, processor, **{**settings, **overrides})
        _restore(session, state, arrays)
    except UserError as e:
        message = str(e)
        raise UserError(message if str(path) in message else f"{path}: {message}") from e
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
        raise UserError(f"{path}: corrupted session file ({_first_line(e)})") from e
    return session


def _restore(session: Any, state: dict[str, Any], arrays: dict[str, mx.array]) -> None:
    """Check everything, then fill the (fresh) session and the prefix cache."""
    model = session.model
    vocab = model.args.vocab_size
    messages = _expect(state.get("messages"), list, "messages")
    for m in messages:
        _expect(m, dict, "a message")
        if m.get("role") not in ROLES:
            raise ValueError(f"a message has role {m.get('role')!r}")
        if not isinstance(m.get("content", ""), (str, list)):
            raise ValueError("a message's content is neither text nor a list of parts")
    media_state = _expect(state.get("media"), dict, "media")
    media: dict[int, list[tuple[str, Any]]] = {}
    for index, kinds in media_state.items():
        i = int(index)
        if not 0 <= i < len(messages) or not isinstance(kinds, list):
            raise ValueError(f"media of message {index} do not belong to a message")
        if not all(k in ("image", "video") for k in kinds):
            raise ValueError(f"media of message {index} are not images or videos")
        media[i] = [(kind, None) for kind in kinds]  # the raw images are gone: see segments
    segments = {}
    for j, seg in enumerate(_expect(state.get("segments"), list, "segments")):
        _expect(seg, dict, "a segment")
        text = _expect(seg.get("text"), str, "a segment's text")
        indices = tuple(_ints(seg.get("media"), 0, len(messages), "a segment's messages"))
        ids = _ints(seg.get("ids"), 0, vocab, "a segment's token ids")
        found = {k: arrays[f"segment.{j}.{k}"] for k in MEDIA_KEYS if f"segment.{j}.{k}" in arrays}
        _check_media_arrays(found, j)
        segments[(text, indices)] = Segment(text, indices, ids, found)
    anchors = set(_ints(state.get("anchors"), 0, None, "anchors"))
    entries = [
        _entry(e, j, arrays, model)
        for j, e in enumerate(_expect(state.get("entries"), list, "entries"))
    ]
    # Nothing failed: now fill the session, then share its states.
    conversation = session._conversation
    conversation.messages = messages
    conversation.media = media
    conversation.segments = segments
    conversation.template(messages, False, session.enable_thinking)  # the template accepts them
    session._anchors = anchors
    for entry in entries:
        entry.owners = {session._owner}
        session.engine.prefix_cache.insert(entry)


def _entry(info: Any, j: int, arrays: dict[str, mx.array], model: Any) -> PrefixEntry:
    _expect(info, dict, "a cache entry")
    args = model.args
    tokens = tuple(_ints(info.get("tokens"), 0, args.vocab_size, "an entry's tokens"))
    n = len(tokens)
    if not n:
        raise ValueError(f"cache entry {j} is empty")
    kind = info.get("kind")
    if kind not in ("boundary", "final"):
        raise ValueError(f"cache entry {j} has kind {kind!r}")
    media = []
    for span in _expect(info.get("media"), list, "an entry's media"):
        if (
            not isinstance(span, list)
            or len(span) != 3
            or not isinstance(span[2], str)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in span[:2])
            or not 0 <= span[0] < span[1] <= n
        ):
            raise ValueError(f"cache entry {j} has a bad media span {span!r}")
        media.append(MediaSpan(span[0], span[1], span[2]))
    act = _activation_dtype(model)
    layers = []
    for i, layer in enumerate(model.layers):
        a, b = arrays.get(f"entry.{j}.{i}.0"), arrays.get(f"entry.{j}.{i}.1")
        if a is None or b is None:
            raise ValueError(f"cache entry {j} has no state for layer {i}")
        if layer.is_linear:
            conv = (1, args.linear_conv_kernel_dim - 1, args.conv_dim)
            rec = (
                1,
                args.linear_num_value_heads,
                args.linear_value_head_dim,
                args.linear_key_head_dim,
            )
            _check_tensor(a, conv, act, f"entry {j} layer {i} conv state")
            _check_tensor(b, rec, mx.float32, f"entry {j} layer {i} recurrent state")
            layers.append(("gdn", (a, b)))
        else:
            shape = (1, args.num_key_value_heads, n, args.head_dim)
            _check_tensor(a, shape, act, f"entry {j} layer {i} keys")
            _check_tensor(b, shape, act, f"entry {j} layer {i} values")
            layers.append(("kv", (a, b)))
    rope_delta = arrays.get(f"entry.{j}.rope_delta")
    if rope_delta is not None:
        _check_tensor(rope_delta, (1,), mx.int32, f"entry {j} rotary offset")
        if not -n <= int(rope_delta.item()) <= args.max_position_embeddings:
            raise ValueError(f"cache entry {j} has a rotary offset out of range")
    mx.eval([x for _, pair in layers for x in pair])
    return PrefixEntry(tokens, layers, rope_delta, tuple(media), kind=kind)


def _check_tensor(x: mx.array, shape: tuple[int, ...], dtype: mx.Dtype, what: str) -> None:
    if tuple(x.shape) != shape or x.dtype != dtype:
        raise ValueError(
            f"{what} is {list(x.shape)} {x.dtype}, the model needs {list(shape)} {dtype}"
        )


def _check_media_arrays(found: dict[str, mx.array], j: int) -> None:
    for kind in ("image", "video"):
        pixels = found.get("pixel_values" + ("_videos" if kind == "video" else ""))
        grid = found.get(f"{kind}_grid_thw")
        if (pixels is None) != (grid is None):
            raise ValueError(f"segment {j} has {kind} pixels without their grid, or the reverse")
        if pixels is None:
            continue
        if pixels.ndim != 2 or not mx.issubdtype(pixels.dtype, mx.floating):
            raise ValueError(f"segment {j} {kind} pixels are not a float matrix")
        if grid.ndim != 2 or grid.shape[1] != 3 or not mx.issubdtype(grid.dtype, mx.integer):
            raise ValueError(f"segment {j} {kind} grid is not [n, 3] integers")


def _activation_dtype(model: Any) -> mx.Dtype:
    embed = model.language_model.model.embed_tokens
    weight = embed.weight
    return weight.dtype if mx.issubdtype(weight.dtype, mx.floating) else embed.scales.dtype


def _settings(value: Any) -> dict[str, Any]:
    _expect(value, dict, "settings")
    unknown = set(value) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    for key in ("temp", "top_p", "min_p", "repetition_penalty", "presence_penalty"):
        v = value.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"setting {key} is not a number")
    for key in (
        "max_tokens",
        "top_k",
        "thinking_budget",
        "seed",
        "prefill_step_size",
        "max_snapshots",
    ):
        v = value.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"setting {key} is not an integer")
    if value.get("system") is not None and not isinstance(value["system"], str):
        raise ValueError("setting system is not text")
    if value.get("tools") is not None and not isinstance(value["tools"], list):
        raise ValueError("setting tools is not a list")
    return dict(value)


def _parse_json(text: Any) -> Any:
    if not isinstance(text, str):
        raise ValueError("no session data")
    depth = 0
    in_string = escaped = False
    for ch in text:  # refuse deep nesting before the parser recurses into it
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"session data nested deeper than {MAX_JSON_DEPTH} levels")
        elif ch in "]}":
            depth -= 1

    def refuse(name: str) -> Any:
        raise ValueError(f"session data holds {name}, which is not a number JSON allows")

    return json.loads(text, parse_constant=refuse)


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise ValueError(f"{what} is not a {kind.__name__}")
    return value


def _ints(value: Any, low: int, high: int | None, what: str) -> list[int]:
    _expect(value, list, what)
    for v in value:
        if (
            isinstance(v, bool)
            or not isinstance(v, int)
            or v < low
            or (high is not None and v >= high)
        ):
            raise ValueError(f"{what} hold {v!r}, not an integer in range")
    return value


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


def _reason(error: OSError) -> str:
    return error.strerror or _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
