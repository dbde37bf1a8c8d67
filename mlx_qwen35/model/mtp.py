"""The multi-token-prediction (MTP) head that every Qwen3.5 checkpoint ships (spec §9).

For the target's hidden state h_p at position p (the post-final-norm output that feeds lm_head)
and the embedding of the next token x_{p+1}:

    u = fc([RMSNorm1p(E[x_{p+1}]; pre_fc_norm_embedding), RMSNorm1p(h_p; pre_fc_norm_hidden)])
    u = DecoderLayer_full(u)            # own KV cache, rotary position p (as the target's)
    o = RMSNorm1p(u; norm)              # draft logits for x_{p+2} = lm_head(o), the shared head

Embedding first, hidden second; every norm is a (1 + w) RMSNorm (the loader folds the 1 in). A
chained draft feeds o back as the hidden of the next step, with the drafted token.

The decoder layer is built by the main model's own `DecoderLayer` class from the main config with
every layer marked full attention, so whatever block the family uses (dense MLP or MoE) the MTP
layer gets the same one, under the checkpoint's names (`mtp.layers.0.self_attn.q_proj`, ...).
The head is attached to the model as `model.mtp` by the loader when the checkpoint has one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .config import TextConfig
from .layers import Linear, RMSNorm
from .model import DecoderLayer, _masks_and_positions

# Shipped checkpoints have one MTP layer; stacks of several are chained step by step in other
# runtimes (layer = step mod n), a convention no checkpoint we can test defines.
SUPPORTED_MTP_LAYERS = 1


class MTPHead(nn.Module):
    def __init__(self, args: TextConfig, num_layers: int = SUPPORTED_MTP_LAYERS):
        super().__init__()
        h, eps = args.hidden_size, args.rms_norm_eps
        layer_args = replace(
            args, num_hidden_layers=num_layers, layer_types=["full_attention"] * num_layers
        )
        self.fc = Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(h, eps=eps)
        self.pre_fc_norm_hidden = RMSNorm(h, eps=eps)
        self.layers = [DecoderLayer(layer_args, i) for i in range(num_layers)]
        self.norm = RMSNorm(h, eps=eps)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def __call__(
        self,
        embeddings: mx.array,
        hidden: mx.array,
        cache: list[Any] | None = None,
        *,
        position_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
    ) -> mx.array:
        """o [B, T, H] for embeddings [B, T, H] of the tokens x_{p+1} and the target's hidden
        states h_p [B, T, H] (post final norm). Positions follow the cache as in the main model
        (index n has position n + rope_delta) unless `position_ids` [3, B, T] are given."""
        B, T, _ = embeddings.shape
        if cache is None:
            cache = [None] * len(self.layers)
        mask, pad_mask, position_ids, _ = _masks_and_positions(
            B, T, cache[0], attention_mask, position_ids
        )
        x = mx.concatenate(
            [self.pre_fc_norm_embedding(embeddings), self.pre_fc_norm_hidden(hidden)], axis=-1
        )
        u = self.fc(x)
        for layer, c in zip(self.layers, cache, strict=True):
            u = layer(u, mask, c, position_ids, pad_mask)
        return self.norm(u)


def mtp_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Remove the `mtp.*` tensors (our layout) from `weights` and return them, prefix kept."""
    return {k: weights.pop(k) for k in [k for k in weights if k.startswith("mtp.")]}


def build_mtp_head(
    args: TextConfig, weights: dict[str, mx.array]
) -> tuple[MTPHead | None, str | None]:
    """(an MTP head whose parameters `weights` can fill, None) or (None, why there is none).

    `weights`: the `mtp.*` tensors in our layout. A missing or incomplete head is not an error
    for plain decoding; the reason is kept for the error a user gets on asking for the head.
    """
    from mlx.utils import tree_flatten

    if not weights:
        return None, (
            "the checkpoint has no MTP head (mlx-lm and mlx-vlm conversions drop it, as does "
            "`convert --no-mtp`); convert the original checkpoint with `python -m "
            "mlx_qwen35.convert`, or pass a draft model"
        )
    n = args.mtp_num_hidden_layers
    if n != SUPPORTED_MTP_LAYERS:
        return None, (
            f"config.json says mtp_num_hidden_layers {n}; only {SUPPORTED_MTP_LAYERS}-layer MTP "
            "heads are supported (as shipped); pass a draft model instead"
        )
    head = MTPHead(args, n)
    expected = {f"mtp.{k}" for k, _ in tree_flatten(head.parameters())}
    present = {k for k in weights if not k.endswith((".scales", ".biases"))}
    missing = sorted(expected - present)
    if missing:
        return None, (
            f"the checkpoint's MTP head is incomplete ({missing[0]} and {len(missing) - 1} more "
            "missing); re-download or re-convert it, or pass a draft model"
        )
    return head, None
