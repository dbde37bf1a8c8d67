"""The tokenizer: `tokenizer.json` through the `tokenizers` library, special tokens and the chat
template from the checkpoint's other files, and a streaming detokenizer.

We load it ourselves rather than through mlx-lm's `tokenizer_utils` (transformers' AutoTokenizer):
importing either costs ~2 s (transformers, and torch when installed) before a command can start,
and for Qwen3.5 both end at the same `tokenizers.Tokenizer`. The interface is the part of mlx-lm's
`TokenizerWrapper` that code around a Qwen model uses (encode/decode, special tokens, eos ids,
`apply_chat_template`, `detokenizer` with `add_token`/`finalize`/`last_segment`, think and
tool-call markers), so code written for mlx-lm's wrapper keeps working.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import chat_template as templates

# Special tokens a template sees as variables (transformers' special_tokens_map keys).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"


class StreamingDetokenizer:
    """Text of generated tokens, one token at a time (`tokenizers`' DecodeStream), holding back a
    character until all its bytes have arrived.

        detok = tokenizer.detokenizer        # a fresh one per generation
        detok.add_token(id); detok.last_segment   # the new printable text since the last read
        detok.finalize()                     # flush what is held back (as U+FFFD if incomplete)

    `text` is all the text so far; after finalize() it equals `tokenizer.decode(tokens)`.
    """

    def __init__(self, backend: Any):
        self._backend = backend
        self.reset()

    def reset(self) -> None:
        from tokenizers.decoders import DecodeStream

        self._stream = DecodeStream(skip_special_tokens=False)
        self._held = 0  # tokens added since the last text came out
        self.text = ""
        self.tokens: list[int] = []
        self.offset = 0

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        piece = self._stream.step(self._backend, token)
        if piece is None:
            self._held += 1
        else:
            self.text += piece
            self._held = 0

    def finalize(self) -> None:
        if self._held:
            # An incomplete character at the end: write it as decode() does (U+FFFD).
            full = self._backend.decode(self.tokens, skip_special_tokens=False)
            if full.startswith(self.text):
                self.text = full
            else:
                self.text += self._backend.decode(self.tokens[-self._held :])
        from tokenizers.decoders import DecodeStream

        self._stream = DecodeStream(skip_special_tokens=False)
        self._held = 0

    @property
    def last_segment(self) -> str:
        """The text added since the last time this was read."""
        segment = self.text[self.offset :]
        self.offset = len(self.text)
        return segment


class Tokenizer:
    """A checkpoint's tokenizer (see the module docstring). Build it with `Tokenizer.from_dir`.

    Args:
        backend: a `tokenizers.Tokenizer`.
        special_tokens: {"eos_token": "<|im_end|>", "pad_token": ..., ...} (None = not set).
        chat_template: the template text, named templates {name: text}, or None.
        eos_token_ids: ids that end generation, besides the eos token's own.
    """

    def __init__(
        self,
        backend: Any,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
    ):
        self.backend = backend
        self.special_tokens = {
            name: token for name, token in (special_tokens or {}).items() if token is not None
        }
        self.chat_template = chat_template
        # A plain attribute, as on mlx-lm's wrapper (which sets it on the tokenizer it wraps).
        self.has_chat_template = bool(chat_template)
        self.eos_token_ids = set(eos_token_ids)
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)

    @classmethod
    def from_dir(cls, model_dir: str | Path, eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` (special tokens, maybe the template) and
        the chat template files the way transformers does (`chat_template.jinja` and
        `additional_chat_templates/*.jinja` first, then tokenizer_config's, then
        `chat_template.json`)."""
        from tokenizers import Tokenizer as Backend

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            what = (
                "has tokenizer_config.json but no tokenizer.json"
                if (model_dir / "tokenizer_config.json").is_file()
                else "has no tokenizer.json"
            )
            raise UserError(
                f"{model_dir} {what} (the tokenizer's vocabulary); the checkpoint is incomplete, "
                "download or convert it again"
            )
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception for any malformed file
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{path}: cannot load the tokenizer ({reason})") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        legacy = _read_json(model_dir / "special_tokens_map.json")
        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = config.get(name, legacy.get(name))
            special[name] = _token_text(value)
        return cls(backend, special, _chat_template(model_dir, config), eos_token_ids)

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise UserError(f"text to encode must be a string, got {type(text).__name__}")
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except (TypeError, UnicodeError):
            _check_utf8(text)
            raise

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> Any:
        """Id of a token (None if it is not in the vocabulary), or a list of them."""
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> Any:
        """Token string of an id (None if out of range), or a list of them."""
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer (one per generation: each keeps its own state)."""
        return StreamingDetokenizer(self.backend)

    # -- special tokens ---------------------------------------------------------------------

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self.special_tokens)

    def add_eos_token(self, token: str | int) -> None:
        """Also stop generation at `token` (a token string or id)."""
        token_id = token if isinstance(token, int) else self.backend.token_to_id(token)
        if token_id is None:
            raise UserError(f"{token!r} is not a token of this tokenizer")
        self.eos_token_ids.add(token_id)

    @property
    def think_start_id(self) -> int | None:
        return self.backend.token_to_id(THINK_START)

    @property
    def think_end_id(self) -> int | None:
        return self.backend.token_to_id(THINK_END)

    @property
    def has_thinking(self) -> bool:
        return self.think_start_id is not None and self.think_end_id is not None

    @property
    def tool_call_start(self) -> str | None:
        """The XML tool-call markers, when the chat template writes them (as mlx-lm infers)."""
        template = self.chat_template
        texts = template.values() if isinstance(template, Mapping) else [template or ""]
        return TOOL_CALL_START if any(TOOL_CALL_START in t for t in texts) else None

    @property
    def tool_call_end(self) -> str | None:
        return TOOL_CALL_END if self.tool_call_start else None

    @property
    def has_tool_calling(self) -> bool:
        return self.tool_call_start is not None

    # -- chat template ----------------------------------------------------------------------

    @property
    def _tokenizer(self) -> Tokenizer:
        # mlx-lm's wrapper keeps the tokenizer that owns `chat_template` here; ours is itself.
        return self

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """The conversation rendered by the chat template (transformers' semantics: the special
        tokens and `kwargs` are template variables); token ids unless `tokenize=False`."""
        template = chat_template or templates.pick_template(self.chat_template, tools)
        text = templates.render(
            template,
            conversation,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs},
        )
        return self.encode(text) if tokenize else text


def _check_utf8(text: str) -> None:
    """UserError for text holding lone surrogates (bytes that were not UTF-8, decoded with
    errors="surrogateescape", as argv is), which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(
            f"the text holds U+{ord(text[e.start]):04X}, a lone surrogate (what Python makes of "
            "bytes that are not UTF-8); pass UTF-8 text"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); download the checkpoint again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; download the checkpoint again")
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the chat template ({e})") from None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config writes it: a string or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(model_dir: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    named: dict[str, str] = {}
    main = model_dir / "chat_template.jinja"
    if main.is_file():
        named["default"] = _read_text(main)
    extra = model_dir / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            named[path.name.removesuffix(".jinja")] = _read_text(path)
    if not named:
        template = config.get("chat_template")
        if template is None:
            template = _read_json(model_dir / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {
                t["name"]: t["template"]
                for t in template
                if isinstance(t, Mapping) and isinstance(t.get("template"), str)
            }
        elif isinstance(template, str):
            return template
    if list(named) == ["default"]:
        return named["default"]
    return named or None
