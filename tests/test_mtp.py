"""The MTP head: draft logits against the spec's formulas (fp32, transformers' own decoder layer
for the attention block), loading from original HF checkpoints and from our converted (and
quantized) ones, and the one-line reasons when a checkpoint has no usable head."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from mtp_fixture import with_mtp
from safetensors.numpy import load_file

from mlx_qwen35.engine.drafters import MTPDrafter
from mlx_qwen35.engine.speculative import check_draft_model
from mlx_qwen35.errors import UserError
from mlx_qwen35.weights.convert import convert
from mlx_qwen35.weights.loading import load_model

IDS = np.random.RandomState(5).randint(0, 300, size=(1, 14))


@pytest.fixture(scope="module")
def mtp_checkpoint(hf_checkpoint, tmp_path_factory):
    hf, path = hf_checkpoint("base")
    return hf, with_mtp(path, tmp_path_factory.mktemp("mtp") / "base-mtp")


def rms1p(x: torch.Tensor, w: np.ndarray, eps: float = 1e-6) -> torch.Tensor:
    """Qwen3.5's RMSNorm: x / rms(x) * (1 + w), w stored zero-centred."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + torch.from_numpy(w))


def reference_mtp_logits(hf, path, ids: np.ndarray) -> np.ndarray:
    """Draft logits for x_{p+2}, p = 0 .. T-2, from spec §9 in fp32: target hidden (post final
    norm) from transformers, [norm(embedding), norm(hidden)] -> fc -> full-attention decoder
    layer (transformers' class, loaded with the mtp.layers.0 tensors) at position p -> norm ->
    the shared head."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer

    t = load_file(path / "model-mtp.safetensors")
    text = hf.model.language_model
    cfg = hf.config.text_config
    ids_t = torch.from_numpy(ids)
    with torch.no_grad():
        hidden = text(input_ids=ids_t).last_hidden_state  # post final norm
        T = ids.shape[1] - 1
        e = text.embed_tokens(ids_t[:, 1:])
        u = torch.cat(
            [
                rms1p(e, t["mtp.pre_fc_norm_embedding.weight"]),
                rms1p(hidden[:, :T], t["mtp.pre_fc_norm_hidden.weight"]),
            ],
            dim=-1,
        )
        u = u @ torch.from_numpy(t["mtp.fc.weight"]).T
        layer_cfg = type(cfg).from_dict(cfg.to_dict())
        layer_cfg.layer_types = ["full_attention"]
        layer_cfg._attn_implementation = "eager"
        layer = Qwen3_5DecoderLayer(layer_cfg, 0).float().eval()
        prefix = "mtp.layers.0."
        layer.load_state_dict(
            {k[len(prefix) :]: torch.from_numpy(v) for k, v in t.items() if k.startswith(prefix)}
        )
        pos = torch.arange(T)[None, None].expand(3, 1, T)
        rotary = text.rotary_emb(u, pos)
        causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
        u = layer(u, position_embeddings=rotary, attention_mask=causal)
        o = rms1p(u, t["mtp.norm.weight"])
        return hf.lm_head(o).numpy()


def test_mtp_draft_logits_match_the_spec_formulas(mtp_checkpoint):
    hf, path = mtp_checkpoint
    ref = reference_mtp_logits(hf, path, IDS)
    model = load_model(path)
    ids = mx.array(IDS)
    hidden = model.hidden_states(ids)
    o = model.mtp(model.embed(ids[:, 1:]), hidden[:, :-1], model.mtp.make_cache())
    ours = np.array(model.language_model.logits(o))
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
    # The swapped concatenation order (a trap the spec names) would not pass.
    swapped = model.mtp(hidden[:, :-1], model.embed(ids[:, 1:]))
    assert np.abs(np.array(model.language_model.logits(swapped)) - ref).max() > 1e-2


def test_drafter_prefill_then_draft_gives_the_reference_draft(mtp_checkpoint):
    """Prefill in chunks, then the first draft: the drafter's logits for the token after the
    sampled one equal the reference at the last pair; chained drafts match a direct chain."""
    hf, path = mtp_checkpoint
    model = load_model(path)
    ids = mx.array(IDS[0], dtype=mx.uint32)
    prompt, sampled = ids[:-1], ids[-1:]
    drafter = MTPDrafter(model)
    cache = model.make_cache()
    for s, e in ((0, 5), (5, 11), (11, prompt.size)):
        positions = mx.broadcast_to(mx.arange(s, e)[None, None], (3, 1, e - s))
        hidden = model.hidden_states(prompt[None, s:e], cache)
        drafter.prefill(prompt[s:e], None, hidden, positions)
    seen = []

    def pick(head, hidden):
        seen.append(np.array(head(hidden)))
        return mx.argmax(head(hidden), axis=-1).astype(mx.uint32)

    n = prompt.size
    drafts = drafter.draft(sampled, 3, pick, mx.broadcast_to(mx.arange(n, n + 4), (3, 1, 4)))
    ref = reference_mtp_logits(hf, path, IDS)
    np.testing.assert_allclose(seen[0][0], ref[0, -1], rtol=0, atol=1e-4 * np.abs(ref).max())
    # A chain computed directly: pair p = (x_{p+1}, h_p) for the whole prompt, then own outputs.
    hidden = model.hidden_states(ids[None, :-1])
    o = model.mtp(model.embed(ids[None, 1:]), hidden, cache := model.mtp.make_cache())
    for i in range(1, 3):
        o = model.mtp(model.embed(drafts[i - 1][None]), o[:, -1:], cache)
        expect = np.array(model.language_model.logits(o[:, -1]))
        np.testing.assert_allclose(seen[i], expect, rtol=0, atol=1e-4 * np.abs(expect).max())


def test_mtp_loads_from_our_converted_and_quantized_checkpoints(mtp_checkpoint, tmp_path):
    hf, path = mtp_checkpoint
    model = load_model(path)
    plain = tmp_path / "plain"
    convert(path, plain, progress=False)
    assert (plain / "mtp.safetensors").is_file()
    again = load_model(plain)
    ids = mx.array(IDS)
    hidden = model.hidden_states(ids)
    args = (model.embed(ids[:, 1:]), hidden[:, :-1])
    np.testing.assert_allclose(np.array(again.mtp(*args)), np.array(model.mtp(*args)), atol=1e-5)
    quant = tmp_path / "q8"
    convert(path, quant, quantize=True, q_bits=8, q_group_size=32, progress=False)
    q = load_model(quant)
    assert "scales" in q.mtp.fc and "scales" in q.mtp.layers[0].self_attn.q_proj
    close = np.array(q.mtp(*args))
    assert np.abs(close - np.array(model.mtp(*args))).max() < 0.05 * np.abs(close).max()


def test_checkpoints_without_a_usable_head_say_why(mtp_checkpoint, hf_checkpoint, tmp_path):
    _, plain = hf_checkpoint("base")
    with pytest.raises(UserError, match="no MTP head.*mlx_qwen35.convert"):
        check_draft_model("mtp", load_model(plain))
    _, path = mtp_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    tensors = load_file(broken / "model-mtp.safetensors")
    del tensors["mtp.layers.0.mlp.up_proj.weight"]
    from safetensors.numpy import save_file

    save_file(tensors, broken / "model-mtp.safetensors")
    model = load_model(broken)  # plain decoding still works
    assert model(mx.array(IDS)).shape == (1, IDS.shape[1], 320)
    with pytest.raises(UserError, match="incomplete.*mtp.layers.0.mlp.up_proj.weight"):
        check_draft_model("mtp", model)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 2
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="mtp_num_hidden_layers 2"):
        check_draft_model("mtp", load_model(broken))


def test_mtp_pairs_of_a_media_prompt_take_its_3d_positions():
    """The drafter fills the MTP cache over an image prompt in chunks with the merged embeddings
    and the 3-D positions; its keys equal one direct MTP call with them (wrong positions, e.g.
    the cache index, would rotate the keys differently)."""
    from PIL import Image

    from mlx_qwen35.engine.speculative import _positions
    from mlx_qwen35.inputs.prompt import prepare_prompt
    from mlx_qwen35.weights.loading import load

    model, processor = load("tiny-random")
    image = Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype(np.uint8))
    ids, emb, pos = prepare_prompt(model, processor, "What is this?", images=[image])
    ids = mx.array(ids, mx.uint32)
    assert pos is not None and int(pos[0, 0, -1]) < ids.size - 1  # positions lag the indices
    cache = model.make_cache()
    drafter = MTPDrafter(model)
    cut = ids.size // 2
    for a, b in ((0, cut), (cut, ids.size)):
        hidden = model.hidden_states(
            None, cache, input_embeddings=emb[:, a:b], position_ids=pos[..., a:b]
        )
        drafter.prefill(ids[a:b], emb[:, a:b], hidden, pos[..., a:b])
    hidden = model.hidden_states(None, model.make_cache(), input_embeddings=emb, position_ids=pos)
    direct = model.mtp.make_cache()
    model.mtp(emb[:, 1:], hidden[:, :-1], direct, position_ids=pos[..., :-1])
    n = ids.size - 1
    assert drafter.cache[0].offset == direct[0].offset == n
    np.testing.assert_allclose(
        np.array(drafter.cache[0].keys[..., :n, :]),
        np.array(direct[0].keys[..., :n, :]),
        atol=1e-4,
    )
    # After the prompt, decode positions continue from the target's rotary delta.
    assert int(_positions(cache, 1)[0, 0, 0]) == int(pos[0, 0, -1]) + 1
