"""`tiny-random`: a built-in, deterministic, offline Qwen3.5 checkpoint.

The checkpoint is written in the ORIGINAL Hugging Face layout (config.json with text and vision
configs; sharded safetensors with `model.language_model.*`, `model.visual.*` and `mtp.*` keys;
zero-centred norm weights; conv1d as [C, 1, K]; A_log in fp32), so every run goes through the real
loading path. It carries a small but real byte-level BPE tokenizer (trained here from a fixed \
corpus)
with Qwen's special tokens at the end of the vocabulary, our Qwen3.5-style chat template and
preprocessor configs with a small pixel budget. The weights are random (fixed seed): the model
writes gibberish, but every CLI path runs end to end without a network.

The files are identical byte for byte on every build. Bump `VERSION` whenever a change here (or in
chat_template.jinja) changes them, so caches built by older versions are not reused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

NAME = "tiny-random"
VERSION = 1
SEED = 1234
CACHE_ENV = "MLX_QWEN35_CACHE"

# Qwen's added tokens in Qwen's order (ids 248044.. in the real vocabulary; here they follow the
# trained BPE vocabulary). The flag says whether the token is "special" (skipped by
# decode(skip_special_tokens=True)); as in Qwen's tokenizer, tool/think/FIM markers are not.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# Qwen3.5's pre-tokenizer split: contractions, letter runs (with marks), single digits,
# punctuation runs, newlines, spaces.
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_VOCAB_SIZE = 768  # 256 byte symbols + merges

CORPUS = """\
The river town woke slowly. Fog lay on the water until the sun climbed over the hills, and the \
first boats pushed away from the wooden pier with their nets folded in the bow. A baker opened \
her shutters, a dog barked twice at nothing, and the church clock struck seven.
Maria had lived there for thirty-two years. She knew which houses had blue doors, which bridges \
creaked in the rain, and where the best apples grew in late September. When visitors asked her \
for directions, she drew little maps on the back of receipts and told them to follow the smell \
of fresh bread.
Learning a new skill takes patience. You try, you fail, you notice what went wrong, and you try \
again with a small change. Most progress is invisible from one day to the next, but over a month \
or a year the difference is clear. Good teachers explain why, not only how.
A language model reads text as a sequence of tokens. It predicts the next token from the ones \
before it, one step at a time, and a sampler decides which token to keep. With a temperature of \
zero the model always picks the most likely token; higher temperatures make the output more \
varied and sometimes more surprising.
Question: What is 12 + 30? Answer: 42. Question: How many days are in a week? Answer: 7.
The meeting starts at 09:45 on 2024-03-18 in room 101, and the report is due on Friday.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, 1))
Please summarise the article in three sentences. Think step by step before you answer.
User: Can you describe this picture? Assistant: The image shows a red bicycle leaning against a \
stone wall, with flowers in a basket and a small video camera on the handlebars.
Weather report: cloudy in the morning, sunny in the afternoon, and a light wind from the west. \
Temperatures between 14 and 21 degrees. Tomorrow will be warmer, with a chance of rain at night.
"Where are you going?" asked the child. "To the market," said her father, "and then home for \
dinner." They walked together past the station, the library and the old cinema.
Café, naïve, résumé and jalapeño are words with accents; emoji such as 🙂 use four bytes.
To make a simple soup, chop two onions, three carrots and a stick of celery. Warm a spoon of oil \
in a large pot, add the vegetables and cook them gently for ten minutes. Pour in a litre of \
stock, add a handful of lentils, and let everything simmer until the lentils are soft. Season \
with salt, pepper and a little lemon juice, then serve the soup hot with bread.
The train left the city just after noon. Through the window we watched the houses give way to \
fields, then forests, then mountains covered with snow. A conductor checked our tickets and \
recommended the small restaurant near the station at the end of the line, where the owner cooks \
whatever the farmers bring that morning.
Plants turn light into sugar. Inside each leaf, tiny structures capture energy from the sun and \
use it to combine water with carbon dioxide from the air. Oxygen is released as a result, which \
is why forests and oceans full of algae matter so much for the air we breathe.
When you write a program, start with the smallest version that works. Run it, read the error \
messages carefully, and add one feature at a time. Write tests for the parts that are easy to \
get wrong, and keep functions short so that each one does a single job. Clear names are better \
than clever comments.
Assistant: Sure! Here is a short plan for your week. On Monday, review the notes from the last \
meeting. On Tuesday and Wednesday, work on the first draft. On Thursday, ask two colleagues for \
feedback, and on Friday, make the final changes and send the document.
User: Thank you, that helps a lot. Could you also suggest a good book about the history of \
science? Assistant: A popular choice is a book that tells the story of how people learned to \
measure time, distance and temperature, from early sundials to atomic clocks.
The library opens at nine and closes at six. Children can borrow up to five books at once, and \
adults can borrow ten. Newspapers, maps and old photographs of the town are kept on the second \
floor, where there is also a quiet room for reading and studying.
In the evening the wind dropped and the lake became as smooth as glass. We sat on the steps of \
the cabin, listening to the birds and watching the last light fade behind the trees. Somebody \
started a fire, somebody else found a guitar, and we stayed outside until the stars came out.
"""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where built-in models live: `cache_dir`, else $MLX_QWEN35_CACHE, else ~/.cache/mlx_qwen35."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "mlx_qwen35"


def ensure_tiny_random(cache_dir: str | os.PathLike | None = None) -> Path:
    """The tiny-random checkpoint directory, built on first use.

    The files are written into a temporary directory beside the target, which is then renamed into
    place, so a reader never sees a half-written checkpoint (and two processes racing to build it
    both end up with the same complete directory).
    """
    root = cache_root(cache_dir)
    target = root / f"{NAME}-v{VERSION}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        write_tiny_random(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        # Another process finished first: its copy is identical.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_tiny_random(path: str | os.PathLike) -> None:
    """Write every file of the checkpoint into the existing directory `path`."""
    path = Path(path)
    tokenizer = build_tokenizer()
    ids = {token: tokenizer.token_to_id(token) for token, _ in ADDED_TOKENS}
    vocab_size = _round_up(tokenizer.get_vocab_size(), 64)
    config = model_config(ids, vocab_size)

    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", _generation_config(ids))
    _write_json(path / "preprocessor_config.json", _image_preprocessor_config())
    _write_json(path / "video_preprocessor_config.json", _video_preprocessor_config())
    _write_json(path / "tokenizer_config.json", _tokenizer_config(config))
    _write_json(path / "tokenizer.json", json.loads(tokenizer.to_str()))
    (path / "chat_template.jinja").write_text(chat_template(), encoding="utf-8")
    _write_shards(path, make_weights(config, tokenizer.get_vocab_size()))


def chat_template() -> str:
    """Our Qwen3.5-style chat template (package data)."""
    return resources.files("mlx_qwen35.inputs").joinpath("chat_template.jinja").read_text("utf-8")


def build_tokenizer():
    """Train the byte-level BPE on the built-in corpus and append Qwen's added tokens.

    Normalizer, pre-tokenizer and decoder are Qwen3.5's (NFC, the split regex above, byte-level).
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    # One at a time so the ids follow ADDED_TOKENS exactly.
    for content, special in ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    return tokenizer


def text_config(ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    """9B-like proportions at toy size: 3:1 linear/full layers, nh/nkv = 4, Hv/Hk = 2,
    partial rotary 0.25 with an interleaved M-RoPE section, untied head, one MTP layer."""
    layers = 8
    return {
        "model_type": "qwen3_5_text",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "layer_types": [
            "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)
        ],
        "full_attention_interval": 4,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],  # sums to rotary_dim / 2 = 32 * 0.25 / 2
            "mrope_interleaved": True,
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "initializer_range": 0.02,
        "mamba_ssm_dtype": "float32",
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "tie_word_embeddings": False,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|endoftext|>"],
        "dtype": "float32",
    }


def vision_config(out_hidden_size: int) -> dict[str, Any]:
    return {
        "model_type": "qwen3_5_vision",
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 16,
        "out_hidden_size": out_hidden_size,
        "hidden_act": "gelu_pytorch_tanh",
        "deepstack_visual_indexes": [],
        "initializer_range": 0.02,
    }


def model_config(ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    text = text_config(ids, vocab_size)
    return {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "text_config": text,
        "vision_config": vision_config(text["hidden_size"]),
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


def make_weights(config: dict[str, Any], used_vocab: int) -> dict[str, np.ndarray]:
    """Random fp32 weights under their HF names, drawn in a fixed order from a fixed seed.

    Scales keep every layer alive: unit-variance projections, logits with a spread of a few units,
    zero-centred norm weights perturbed away from zero (a missing or doubled +1 would show),
    A_log/dt_bias in the ranges of Qwen's initialisation so the recurrent decay is in (0, 1).
    Rows of the padded vocabulary beyond the tokenizer's `used_vocab` ids are zero, so their logit
    (0) stays far below the top candidates and greedy decoding never picks an id with no text.
    """
    rng = np.random.default_rng(SEED)
    tc, vc = config["text_config"], config["vision_config"]
    w: dict[str, np.ndarray] = {}

    def normal(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> None:
        w[name] = (mean + std * rng.standard_normal(shape)).astype(np.float32)

    def linear(name: str, out: int, inp: int, bias: bool = False, gain: float = 1.0) -> None:
        normal(f"{name}.weight", (out, inp), gain / math.sqrt(inp))
        if bias:
            normal(f"{name}.bias", (out,), 0.02)

    h, inter = tc["hidden_size"], tc["intermediate_size"]
    nh, nkv, hd = tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
    hk, hv = tc["linear_num_key_heads"], tc["linear_num_value_heads"]
    dk, dv, k = tc["linear_key_head_dim"], tc["linear_value_head_dim"], tc["linear_conv_kernel_dim"]
    conv_dim = 2 * hk * dk + hv * dv

    def full_attention(p: str) -> None:
        linear(f"{p}.q_proj", 2 * nh * hd, h)  # per head [query | gate]
        linear(f"{p}.k_proj", nkv * hd, h)
        linear(f"{p}.v_proj", nkv * hd, h)
        linear(f"{p}.o_proj", h, nh * hd)
        normal(f"{p}.q_norm.weight", (hd,), 0.1)
        normal(f"{p}.k_norm.weight", (hd,), 0.1)

    def mlp(p: str) -> None:
        linear(f"{p}.gate_proj", inter, h)
        linear(f"{p}.up_proj", inter, h)
        linear(f"{p}.down_proj", h, inter)

    def decoder_layer(p: str, kind: str) -> None:
        normal(f"{p}.input_layernorm.weight", (h,), 0.1)
        if kind == "linear_attention":
            a = f"{p}.linear_attn"
            linear(f"{a}.in_proj_qkv", conv_dim, h)
            linear(f"{a}.in_proj_z", hv * dv, h)
            linear(f"{a}.in_proj_b", hv, h)
            linear(f"{a}.in_proj_a", hv, h)
            normal(f"{a}.conv1d.weight", (conv_dim, 1, k), 1 / math.sqrt(k))
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), hv))
            w[f"{a}.dt_bias"] = (dt + np.log(-np.expm1(-dt))).astype(np.float32)
            w[f"{a}.A_log"] = np.log(rng.uniform(1.0, 16.0, hv)).astype(np.float32)
            normal(f"{a}.norm.weight", (dv,), 0.1, mean=1.0)  # gated norm: plain w
            linear(f"{a}.out_proj", h, hv * dv)
        else:
            full_attention(f"{p}.self_attn")
        normal(f"{p}.post_attention_layernorm.weight", (h,), 0.1)
        mlp(f"{p}.mlp")

    lm = "model.language_model"
    vocab = tc["vocab_size"]
    normal(f"{lm}.embed_tokens.weight", (vocab, h), 1.0)
    for i, kind in enumerate(tc["layer_types"]):
        decoder_layer(f"{lm}.layers.{i}", kind)
    normal(f"{lm}.norm.weight", (h,), 0.1)
    normal("lm_head.weight", (vocab, h), 3.0 / math.sqrt(h))
    for name in (f"{lm}.embed_tokens.weight", "lm_head.weight"):
        w[name][used_vocab:] = 0.0

    # Vision tower (standard LayerNorms: weight around 1, not zero-centred).
    d, vi = vc["hidden_size"], vc["intermediate_size"]
    patch = vc["in_channels"] * vc["temporal_patch_size"] * vc["patch_size"] ** 2
    vis = "model.visual"
    normal(
        f"{vis}.patch_embed.proj.weight",
        (d, vc["in_channels"], vc["temporal_patch_size"], vc["patch_size"], vc["patch_size"]),
        1 / math.sqrt(patch),
    )
    normal(f"{vis}.patch_embed.proj.bias", (d,), 0.02)
    normal(f"{vis}.pos_embed.weight", (vc["num_position_embeddings"], d), 0.5)

    def layer_norm(p: str, n: int) -> None:
        normal(f"{p}.weight", (n,), 0.1, mean=1.0)
        normal(f"{p}.bias", (n,), 0.1)

    for j in range(vc["depth"]):
        b = f"{vis}.blocks.{j}"
        layer_norm(f"{b}.norm1", d)
        layer_norm(f"{b}.norm2", d)
        linear(f"{b}.attn.qkv", 3 * d, d, bias=True)
        linear(f"{b}.attn.proj", d, d, bias=True)
        linear(f"{b}.mlp.linear_fc1", vi, d, bias=True)
        linear(f"{b}.mlp.linear_fc2", d, vi, bias=True)
    merged = d * vc["spatial_merge_size"] ** 2
    layer_norm(f"{vis}.merger.norm", d)
    linear(f"{vis}.merger.linear_fc1", merged, merged, bias=True)
    linear(f"{vis}.merger.linear_fc2", vc["out_hidden_size"], merged, bias=True)

    # MTP head: one full-attention layer plus the fusion projection and its norms.
    linear("mtp.fc", h, 2 * h)
    normal("mtp.pre_fc_norm_embedding.weight", (h,), 0.1)
    normal("mtp.pre_fc_norm_hidden.weight", (h,), 0.1)
    for i in range(tc["mtp_num_hidden_layers"]):
        decoder_layer(f"mtp.layers.{i}", "full_attention")
    normal("mtp.norm.weight", (h,), 0.1)
    return w


def _write_shards(path: Path, weights: dict[str, np.ndarray]) -> None:
    """Two shards plus an index, as sharded HF checkpoints come: the language model in the
    first, vision tower and MTP head in the second."""
    from safetensors.numpy import save_file

    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards: list[dict[str, np.ndarray]] = [{}, {}]
    for key, value in weights.items():
        shards[0 if key.startswith(("model.language_model.", "lm_head.")) else 1][key] = value
    weight_map = {}
    for name, tensors in zip(names, shards, strict=True):
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
    total = sum(v.nbytes for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(path / "model.safetensors.index.json", index)


def _generation_config(ids: dict[str, int]) -> dict[str, Any]:
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }


def _tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": config["text_config"]["max_position_embeddings"],
    }


# Qwen3.5's preprocessing values (spec §6/§7) with a small pixel budget: at most 64 merged image
# tokens, at least 4.
_PATCH = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2}
_NORMALIZE = {
    "do_convert_rgb": True,
    "do_resize": True,
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def _image_preprocessor_config() -> dict[str, Any]:
    return {
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
        "size": {"shortest_edge": 4 * 32 * 32, "longest_edge": 64 * 32 * 32},
        **_PATCH,
        **_NORMALIZE,
    }


def _video_preprocessor_config() -> dict[str, Any]:
    return {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "processor_class": "Qwen3VLProcessor",
        "size": {"shortest_edge": 4 * 32 * 32, "longest_edge": 16 * 64 * 32 * 32},
        "do_sample_frames": True,
        "fps": 2,
        "min_frames": 4,
        "max_frames": 16,
        **_PATCH,
        **_NORMALIZE,
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
