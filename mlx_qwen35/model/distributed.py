"""One model over several machines with MLX's own `mx.distributed` (launched by `mlx.launch`:
ring over TCP or Thunderbolt, JACCL over RDMA where macOS has it). Two ways, with mlx-lm's names:

`shard(model, group)`: tensor parallelism. Every rank keeps a slice of every layer: DeltaNet key
and value heads (with their slices of in_proj_qkv/z/a/b, conv1d, A_log, dt_bias), attention query
heads and KV heads (KV heads repeated first when there are fewer than ranks), the hidden units of
the dense MLP, of every expert and of the shared expert. Each block's output projection is then a
partial sum, added up across the ranks (one all_sum per mixer and one per MLP). Embedding, head,
norms, routers and the vision tower stay whole on every rank.

`pipeline(model, group, split)`: pipeline parallelism. Every rank keeps a range of layers; the
highest rank runs the first layers and rank 0 the last (mlx-lm's order), each passing its hidden
states to the next with send/recv; the final hidden states are gathered to every rank, which all
compute the same logits. Memory per rank is its layers' weights and caches.

Either way every rank computes the same logits, so every rank samples the same token given the
same seed; only rank 0 prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx.utils import tree_map

from ..errors import UserError
from .cache import KVCache, QuantizedKVCache
from .moe import SparseMoeBlock

MODES = ("tensor", "pipeline")


def init_group() -> Any:
    """The process group `mlx.launch` set up (a group of 1 when started on its own)."""
    return mx.distributed.init()


def launched_group(mode: str, command: str) -> Any:
    """The group of a `--distributed mode` run of `python -m mlx_qwen35.<command>`; a one-line
    UserError when it was started without mlx.launch (a group of one)."""
    group = init_group()
    if group.size() == 1:
        raise UserError(
            "--distributed needs the processes that mlx.launch starts, e.g. `mlx.launch "
            f"--hosts mac1,mac2 python -m mlx_qwen35.{command} ... --distributed {mode}`; "
            "started alone this is one machine: drop --distributed"
        )
    return group


def _check_divisible(model: Any, n: int) -> None:
    t = model.args
    need = {
        "num_attention_heads": t.num_attention_heads,
        "linear_num_key_heads": t.linear_num_key_heads,
        "linear_num_value_heads": t.linear_num_value_heads,
    }
    if t.moe is not None:
        need["moe_intermediate_size"] = t.moe.moe_intermediate_size
        need["shared_expert_intermediate_size"] = t.moe.shared_expert_intermediate_size
    else:
        need["intermediate_size"] = t.intermediate_size
    bad = [f"{name}={value}" for name, value in need.items() if value % n]
    kv = t.num_key_value_heads
    if kv % n and n % kv:
        bad.append(f"num_key_value_heads={kv}")
    if bad:
        raise UserError(
            f"tensor parallelism over {n} machines needs {', '.join(bad)} to divide evenly by "
            f"{n} (and num_key_value_heads to divide or be divided by it); use "
            "--distributed pipeline or another number of machines"
        )


def shard(model: Any, group: Any = None) -> None:
    """Tensor parallelism in place over `group` (see the module doc)."""
    group = group or init_group()
    n = group.size()
    if n == 1:
        return
    _check_divisible(model, n)
    for layer in model.layers:
        if layer.is_linear:
            _shard_deltanet(layer.linear_attn, group)
        else:
            _shard_attention(layer.self_attn, group)
        if isinstance(layer.mlp, SparseMoeBlock):
            _shard_moe(layer.mlp, group)
        else:
            mlp = layer.mlp
            shard_inplace(mlp.gate_proj, "all-to-sharded", group=group)
            shard_inplace(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)


def _shard_deltanet(attn: Any, group: Any) -> None:
    n, r = group.size(), group.rank()
    kd = attn.num_k_heads * attn.head_k_dim
    # in_proj_qkv rows and conv channels are [q | k | v]: each rank takes its heads of each.
    shard_inplace(attn.in_proj_qkv, "all-to-sharded", segments=[kd, 2 * kd], group=group)
    shard_inplace(attn.conv1d, lambda path, w: (0, [kd, 2 * kd]), group=group)
    for name in ("in_proj_z", "in_proj_a", "in_proj_b"):
        shard_inplace(getattr(attn, name), "all-to-sharded", group=group)
    attn.A_log = mx.contiguous(mx.split(attn.A_log, n)[r])
    attn.dt_bias = mx.contiguous(mx.split(attn.dt_bias, n)[r])
    attn.out_proj = shard_linear(attn.out_proj, "sharded-to-all", group=group)
    attn.num_k_heads //= n
    attn.num_v_heads //= n


def _shard_attention(attn: Any, group: Any) -> None:
    n = group.size()
    kv = attn.n_kv_heads
    if n > kv:
        # Fewer KV heads than ranks: repeat each so that every rank holds the one its query
        # heads read (query head h reads KV head h // (heads per KV head), before and after).
        def repeat(p: mx.array) -> mx.array:
            p = p.reshape(kv, p.shape[0] // kv, *p.shape[1:])
            return mx.repeat(p, n // kv, axis=0).reshape(-1, *p.shape[2:])

        for proj in (attn.k_proj, attn.v_proj):
            proj.update(tree_map(repeat, proj.parameters()))
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        shard_inplace(proj, "all-to-sharded", group=group)
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    attn.n_heads //= n
    attn.n_kv_heads = max(kv // n, 1)


def _shard_moe(block: SparseMoeBlock, group: Any) -> None:
    # Experts and shared expert split their hidden units; the block adds up the partial outputs
    # (routed + shared) with one all_sum. The router and the shared-expert gate stay whole.
    for mlp in (block.switch_mlp, block.shared_expert):
        shard_inplace(mlp.gate_proj, "all-to-sharded", group=group)
        shard_inplace(mlp.up_proj, "all-to-sharded", group=group)
        shard_inplace(mlp.down_proj, "sharded-to-all", group=group)
    block.sharding_group = group


def pipeline(model: Any, group: Any = None, split: list[int] | None = None) -> None:
    """Pipeline parallelism in place over `group`: `split[r]` layers on rank r (default: even,
    the low ranks taking the extra ones); rank r runs the layers after those of ranks r+1..."""
    group = group or init_group()
    n, r = group.size(), group.rank()
    if n == 1:
        return
    text = model.language_model.model
    total = len(text.layers)
    if split is None:
        base, extra = divmod(total, n)
        split = [base + (1 if i < extra else 0) for i in range(n)]
    if len(split) != n or any(s <= 0 for s in split) or sum(split) != total:
        raise UserError(
            f"pipeline split {split} must give each of the {n} machines at least one layer and "
            f"{total} layers in all"
        )
    start = sum(split[r + 1 :])
    end = start + split[r]
    # The other ranks' layers go (with their weights, never read when loaded lazily); the list
    # keeps its length so that layer i still loads `layers.i`.
    text.layers = [layer if start <= i < end else None for i, layer in enumerate(text.layers)]
    text.first_attention = next(
        (i for i in range(start, end) if not text.layers[i].is_linear), None
    )
    text.pipeline_group = group
    text.pipeline_range = (start, end)


def run_pipeline_stage(
    text: Any, h: mx.array, cache: list[Any], mask: Any, position_ids: Any, pad_mask: Any
) -> mx.array:
    """This rank's layers between the receive from rank + 1 and the send to rank - 1; returns
    the last stage's (rank 0's) hidden states, on every rank."""
    group = text.pipeline_group
    n, r = group.size(), group.rank()
    start, end = text.pipeline_range
    if r < n - 1:
        h = mx.distributed.recv_like(h, r + 1, group=group)
    for i in range(start, end):
        h = text.layers[i](h, mask, cache[i], position_ids, pad_mask)
    if r > 0:
        h = mx.distributed.send(h, r - 1, group=group)
        # A prefill step evaluates only the caches: make this rank's last cache depend on the
        # send, or the next rank would wait forever for hidden states nobody asked for.
        last = cache[end - 1]
        if last is not None:
            if isinstance(last, KVCache):
                last.keys = mx.depends(last.keys, h)
            elif isinstance(last, QuantizedKVCache):
                last.keys = (mx.depends(last.keys[0], h), *last.keys[1:])
            else:
                last[0] = mx.depends(last[0], h)
    return mx.distributed.all_gather(h, group=group)[: h.shape[0]]


def distribute(model: Any, mode: str, group: Any = None) -> Any:
    """Shard (`tensor`) or split (`pipeline`) a loaded model over `group` (default: the one
    `mlx.launch` set up), then read the weights this rank keeps; returns the group. Load the
    model with `lazy=True` first so that nothing else is ever read. The server's entry point."""
    if mode not in MODES:
        raise UserError(f"--distributed must be one of {', '.join(MODES)}, got {mode!r}")
    group = group or init_group()
    if mode == "tensor":
        model.shard(group)
    else:
        model.pipeline(group)
    mx.eval(model.parameters())
    return group


def load_distributed(
    path_or_repo: str | Path, mode: str, dtype: str | None = None, group: Any = None
) -> tuple[Any, Any, Any]:
    """`(model, processor, group)`: the checkpoint loaded lazily and distributed by `mode`."""
    from ..inputs.processor import Processor
    from ..weights.loading import load_model, resolve_model_path

    group = group or init_group()
    model_dir = resolve_model_path(path_or_repo)
    model = load_model(model_dir, dtype, lazy=True)
    distribute(model, mode, group)
    return model, Processor.from_pretrained(model_dir, model.config), group


def shared_seed(seed: int | None, group: Any) -> int:
    """The same sampling seed on every rank: `seed`, or rank 0's random pick."""
    if seed is not None or group.size() == 1:
        return seed if seed is not None else int(mx.random.randint(0, 2**31 - 1, ()).item())
    mine = mx.random.randint(0, 2**31 - 1, ()) if group.rank() == 0 else mx.array(0)
    return int(mx.distributed.all_sum(mine.astype(mx.int32), group=group).item())
