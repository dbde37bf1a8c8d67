"""The sparse MLP of the Qwen3.5 MoE models (transformers' `Qwen3_5MoeSparseMoeBlock`).

    p = softmax(router(x))                  in fp32, over all experts
    top = the k largest p; w = p[top] / sum(p[top])   (renormalised unless norm_topk_prob is off)
    y = sum_j w_j * expert_{top_j}(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)

Every expert is a SwiGLU MLP. The experts live stacked ([E, out, in] per projection) in mlx-lm's
`SwitchGLU`, which runs only the chosen ones through `mx.gather_mm` (`gather_qmm` once quantized)
and sorts the tokens by expert for long prompts. We use it as a library: its parameter names
(`switch_mlp.{gate,up,down}_proj`) are what mlx-lm and mlx-vlm write, so their MoE checkpoints
load as they are, and theirs load ours. mlx_lm is imported when the first MoE layer is built, not
with this module: its package import pulls in transformers (~2 s) that dense models never need.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig
from .cpu_fast import sigmoid
from .layers import MLP, Linear


def switch_glu(dims: int, hidden_dims: int, num_experts: int) -> nn.Module:
    from mlx_lm.models.switch_layers import SwitchGLU

    return SwitchGLU(dims, hidden_dims, num_experts)


class SparseMoeBlock(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        moe = args.moe
        assert moe is not None, "SparseMoeBlock needs a TextConfig with MoE fields"
        h = args.hidden_size
        self.num_experts = moe.num_experts
        self.top_k = moe.num_experts_per_tok
        self.norm_topk_prob = moe.norm_topk_prob
        self.gate = Linear(h, moe.num_experts, bias=False)
        self.switch_mlp = switch_glu(h, moe.moe_intermediate_size, moe.num_experts)
        self.shared_expert = MLP(h, moe.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(h, 1, bias=False)
        # Set by `shard` (tensor parallel): each rank holds a slice of every expert's and of the
        # shared expert's hidden units, so the block's output is a partial sum across the group.
        self.sharding_group: Any = None

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(expert indices [..., k], their weights [..., k] in x's dtype)."""
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        inds = mx.stop_gradient(mx.argpartition(probs, kth=-k, axis=-1)[..., -k:])
        scores = mx.take_along_axis(probs, inds, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return inds, scores.astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        inds, scores = self.route(x)
        # (astype: off Metal, unquantized experts are held in fp32; see loading._experts_to_fp32)
        y = (self.switch_mlp(x, inds).astype(x.dtype) * scores[..., None]).sum(axis=-2)
        y = y + sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.sharding_group is not None:
            y = mx.distributed.all_sum(y, group=self.sharding_group)
        return y
