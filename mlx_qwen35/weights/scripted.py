"""Scripted checkpoints: real weights made to follow a known script under greedy decoding.

Tests of tool calls, stop rules, batching and speculation need to know the output in advance, and
benches of speculative decoding need a draft that is always right. A scripted model still runs
every layer at its real size; only its answer is fixed:

1. every layer's output projection (attention `o_proj`, DeltaNet `out_proj`, MLP `down_proj`) is
   scaled to 0, so the residual stream leaves the stack as the current token's embedding e_t;
2. the final norm's multiplier is 1, so the head sees h = e_t / rms(e_t);
3. the (untied) head is rewritten as a successor table: head[v] = c * sum of e_t / |e_t| over the
   tokens t with succ(t) = v. The logit of succ(t) is then c * sqrt(H) (up to the small cosine
   between random embeddings), every other logit near 0.

`margin` is the logit gap wanted between the scripted token and the rest (~100 makes greedy output
exact under any batching, backend or dtype). Pair tests on scripted models with parity tests, which
see what every layer computes.

`scripted_checkpoint` does it all for a checkpoint directory: the script's pieces become tokenizer
tokens (`add_tokens`; e.g. "<parameter=city>\n" or a whole sentence), so that each step of the
script is one token, their padded embedding rows get directions (`give_embeddings`), and the
chain is written into the head.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import UserError

# Names (last two path parts) of the projections whose output is added to the residual stream.
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "down_proj")


def silence_layers(model: Any) -> None:
    """Scale every residual-branch output projection of the decoder to 0 (in place)."""
    for layer in model.layers:
        mixer = layer.linear_attn if layer.is_linear else layer.self_attn
        for module in (getattr(mixer, "out_proj", None), getattr(mixer, "o_proj", None)):
            if module is not None:
                _zero_linear(module)
        _zero_linear(layer.mlp.down_proj)


def write_successors(model: Any, successor: Mapping[int, int], *, margin: float = 100.0) -> None:
    """Rewrite the head so that greedy decoding after token t emits successor[t] (in place).

    Tokens without a successor get no preference (all logits ~0 after them). Needs an untied
    head: with tied embeddings the head is the embedding table and cannot be rewritten alone.
    """
    text = model.language_model
    if text.args.tie_word_embeddings:
        raise UserError("a scripted model needs an untied head (tie_word_embeddings false)")
    _dense(text.lm_head)
    embed = np.array(_dense(text.model.embed_tokens), dtype=np.float32)  # [V, H]
    vocab, hidden = embed.shape
    head = np.zeros((vocab, hidden), dtype=np.float32)
    scale = margin / np.sqrt(hidden)
    for token, nxt in successor.items():
        if not (0 <= token < vocab and 0 <= nxt < vocab):
            raise UserError(f"successor {token} -> {nxt} is outside the vocabulary ({vocab})")
        e = embed[token]
        head[nxt] += scale * e / np.linalg.norm(e)
    dtype = text.lm_head.weight.dtype
    text.lm_head.weight = mx.array(head).astype(dtype)
    text.model.norm.weight = mx.ones_like(text.model.norm.weight)


def script_model(model: Any, successor: Mapping[int, int], *, margin: float = 100.0) -> None:
    """`silence_layers` + `write_successors`: the model follows `successor` greedily."""
    silence_layers(model)
    write_successors(model, successor, margin=margin)
    mx.eval(model.parameters())


def chain(tokens: list[int]) -> dict[int, int]:
    """The successor table that makes a model write `tokens` in order after tokens[0]
    (each token may appear only once: a table maps a token to one successor)."""
    table: dict[int, int] = {}
    for a, b in zip(tokens, tokens[1:], strict=False):
        if table.get(a, b) != b:
            raise UserError(f"token {a} would need two successors; a script may use a token once")
        table[a] = b
    return table


def _dense(module: Any) -> mx.array:
    if "scales" in module:
        raise UserError("script the model before quantizing it")
    return module.weight


def _zero_linear(module: Any) -> None:
    if "scales" in module:
        raise UserError("script the model before quantizing it")
    module.weight = mx.zeros_like(module.weight)
    if "bias" in module:
        module.bias = mx.zeros_like(module.bias)


def add_tokens(checkpoint: str | Path, pieces: list[str]) -> None:
    """Append each piece that is not one token yet to the tokenizer of the checkpoint directory
    (in place; a copy, never a cache) as a plain added token, so a script writes it in one step.
    The ids follow the last used id and must fit the model's (padded) vocabulary."""
    from tokenizers import Tokenizer

    path = Path(checkpoint) / "tokenizer.json"
    text = path.read_text()
    spec = json.loads(text)
    tokenizer = Tokenizer.from_str(text)
    have = {p for p in pieces if len(tokenizer.encode(p, add_special_tokens=False).ids) == 1}
    next_id = 1 + max(
        [t["id"] for t in spec["added_tokens"]] + list(spec["model"]["vocab"].values())
    )
    for piece in pieces:
        if piece in have:
            continue
        spec["added_tokens"].append(
            {
                "id": next_id,
                "content": piece,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
        have.add(piece)
        next_id += 1
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec, ensure_ascii=False))
    tmp.replace(path)


def give_embeddings(model: Any, ids: list[int], *, seed: int = 0) -> None:
    """Random embedding rows (at the scale of the others) for `ids`: padded rows of the
    vocabulary are zero, and a zero embedding has no direction for the successor table."""
    embed = model.language_model.model.embed_tokens
    weight = np.array(_dense(embed), dtype=np.float32)
    scale = float(np.std(weight[np.abs(weight).sum(axis=1) > 0]))
    rng = np.random.default_rng(seed)
    for i in ids:
        if not np.abs(weight[i]).sum():
            weight[i] = rng.normal(0.0, scale, weight.shape[1])
    embed.weight = mx.array(weight).astype(embed.weight.dtype)


def scripted_checkpoint(
    base: str | Path, dest: str | Path, script: list[str], *, margin: float = 100.0
) -> tuple[Any, Any, list[int]]:
    """(model, processor, script ids): a copy of the checkpoint `base` at `dest` whose tokenizer
    has every piece of `script` as one token, loaded, and scripted so that greedy decoding after
    script[0] writes script[1:] in order (script[0] is usually the generation prompt's last
    token, e.g. "\\n" after "<think>"). Pieces must be distinct tokens."""
    from .loading import load

    base, dest = Path(base), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        target = dest / item.name
        if item.name == "tokenizer.json":
            shutil.copyfile(item, target)
        elif not target.exists():
            target.symlink_to(item.resolve())
    add_tokens(dest, script)
    model, processor = load(str(dest))
    ids = []
    for piece in script:
        encoded = processor.encode(piece)
        if len(encoded) != 1:
            raise UserError(f"script piece {piece!r} is {len(encoded)} tokens, not one")
        ids.append(encoded[0])
    if max(ids) >= model.language_model.args.vocab_size:
        raise UserError("the script's new tokens do not fit the model's vocabulary")
    give_embeddings(model, ids)
    script_model(model, chain(ids), margin=margin)
    return model, processor, ids
