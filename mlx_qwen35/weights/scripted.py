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
"""

from __future__ import annotations

from collections.abc import Mapping
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
