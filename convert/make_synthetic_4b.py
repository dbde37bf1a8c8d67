"""Write a synthetic Qwen3.5 checkpoint with the real 4B text dimensions (random bf16 weights).

It is laid out like the original on the Hub (HF names, zero-centred norms, conv1d [C, 1, K],
A_log and the DeltaNet norm in fp32, an MTP layer, shards of at most 5 GB with an index) plus a
small tokenizer so that mlx-lm's converter also accepts it. About 8.6 GB on disk: used by
measure_peak_rss.py, not by the test suite.

    python convert/make_synthetic_4b.py /tmp/qwen35-4b-synthetic
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx

# Qwen/Qwen3.5-4B's text_config (tied embeddings; 3 DeltaNet layers per full-attention layer).
TEXT = {
    "model_type": "qwen3_5_text",
    "hidden_size": 2560,
    "intermediate_size": 9216,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "vocab_size": 248320,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "full_attention_interval": 4,
    "tie_word_embeddings": True,
    "mtp_num_hidden_layers": 1,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
    "dtype": "bfloat16",
}
SHARD_BYTES = 5 * 10**9


def shapes(t: dict) -> list[tuple[str, tuple[int, ...], mx.Dtype]]:
    """(HF name, shape, dtype) of every tensor, in the order the original checkpoint lists them."""
    h, inter = t["hidden_size"], t["intermediate_size"]
    nh, nkv, hd = t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    hk, hv = t["linear_num_key_heads"], t["linear_num_value_heads"]
    dk, dv, k = t["linear_key_head_dim"], t["linear_value_head_dim"], t["linear_conv_kernel_dim"]
    conv = 2 * hk * dk + hv * dv
    bf, f32 = mx.bfloat16, mx.float32

    def layer(p: str, full: bool) -> list:
        out = [(f"{p}.input_layernorm.weight", (h,), bf)]
        if full:
            a = f"{p}.self_attn"
            out += [
                (f"{a}.q_proj.weight", (2 * nh * hd, h), bf),
                (f"{a}.k_proj.weight", (nkv * hd, h), bf),
                (f"{a}.v_proj.weight", (nkv * hd, h), bf),
                (f"{a}.o_proj.weight", (h, nh * hd), bf),
                (f"{a}.q_norm.weight", (hd,), bf),
                (f"{a}.k_norm.weight", (hd,), bf),
            ]
        else:
            a = f"{p}.linear_attn"
            out += [
                (f"{a}.in_proj_qkv.weight", (conv, h), bf),
                (f"{a}.in_proj_z.weight", (hv * dv, h), bf),
                (f"{a}.in_proj_b.weight", (hv, h), bf),
                (f"{a}.in_proj_a.weight", (hv, h), bf),
                (f"{a}.conv1d.weight", (conv, 1, k), bf),
                (f"{a}.dt_bias", (hv,), bf),
                (f"{a}.A_log", (hv,), f32),
                (f"{a}.norm.weight", (dv,), f32),
                (f"{a}.out_proj.weight", (h, hv * dv), bf),
            ]
        out += [
            (f"{p}.post_attention_layernorm.weight", (h,), bf),
            (f"{p}.mlp.gate_proj.weight", (inter, h), bf),
            (f"{p}.mlp.up_proj.weight", (inter, h), bf),
            (f"{p}.mlp.down_proj.weight", (h, inter), bf),
        ]
        return out

    lm = "model.language_model"
    out = [(f"{lm}.embed_tokens.weight", (t["vocab_size"], h), bf)]
    for i in range(t["num_hidden_layers"]):
        out += layer(f"{lm}.layers.{i}", (i + 1) % t["full_attention_interval"] == 0)
    out.append((f"{lm}.norm.weight", (h,), bf))
    out += [
        ("mtp.fc.weight", (h, 2 * h), bf),
        ("mtp.pre_fc_norm_embedding.weight", (h,), bf),
        ("mtp.pre_fc_norm_hidden.weight", (h,), bf),
        ("mtp.norm.weight", (h,), bf),
    ]
    out += layer("mtp.layers.0", True)
    return out


def random_tensor(name: str, shape: tuple[int, ...], dtype: mx.Dtype, key: mx.array) -> mx.array:
    if name.endswith("A_log"):
        return mx.log(mx.random.uniform(1.0, 16.0, shape, key=key)).astype(dtype)
    if len(shape) == 1:
        return (0.1 * mx.random.normal(shape, key=key)).astype(dtype)
    fan_in = shape[-1] if len(shape) == 2 else shape[-1] * shape[-2]
    return (mx.random.normal(shape, key=key) * fan_in**-0.5).astype(dtype)


def write(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=False)
    specs = shapes(TEXT)
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        n = spec[2].size
        for d in spec[1]:
            n *= d
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    weight_map = {}
    key = mx.random.key(0)
    for i, shard in enumerate(shards):
        name = f"model.safetensors-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for tensor_name, shape, dtype in shard:
            key, sub = mx.random.split(key)
            tensors[tensor_name] = random_tensor(tensor_name, shape, dtype, sub)
            mx.eval(tensors[tensor_name])  # one fp32 temporary at a time
            weight_map[tensor_name] = name
        mx.save_safetensors(str(path / name), tensors, metadata={"format": "pt"})
        del tensors
        mx.clear_cache()
        print(f"wrote {name}")
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "text_config": TEXT,
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(path)


def _write_tokenizer(path: Path) -> None:
    """A small real tokenizer (mlx-lm's converter loads one; its vocabulary size is irrelevant)."""
    from mlx_qwen35.weights.tiny_random import build_tokenizer

    (path / "tokenizer.json").write_text(build_tokenizer().to_str())
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "bos_token": None}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="new directory to write the checkpoint into")
    write(parser.parse_args().path)
