"""Speculative decoding through every front door: generate / stream_generate (mlx-lm's
`draft_model=` / `num_draft_tokens=`, a checkpoint path checked for its tokenizer), ChatSession
across turns, and the generate and chat command lines with --verbose acceptance."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import mlx_qwen35
from mlx_qwen35.engine.generate import stream_generate
from mlx_qwen35.engine.session import ChatSession
from mlx_qwen35.errors import UserError
from mlx_qwen35.weights.loading import load, resolve_model_path
from mlx_qwen35.weights.scripted import script_mtp, write_successors

PROMPT = "Tell me about the sea and the sky."


def perturb(model, sigma: float, seed: int = 1) -> None:
    """Add noise to every matrix of `model` (in place): a draft that often agrees."""
    from mlx.utils import tree_flatten

    rng = np.random.RandomState(seed)
    updates = [
        (k, v + mx.array(sigma * rng.standard_normal(v.shape).astype(np.float32)))
        for k, v in tree_flatten(model.parameters())
        if v.ndim == 2 and not k.startswith("mtp.")
    ]
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())


def semi_script(model) -> None:
    """Nudge a real model towards a successor table its MTP head drafts: partial acceptance."""
    for layer in model.layers:
        mixer = layer.linear_attn if layer.is_linear else layer.self_attn
        for proj in (getattr(mixer, "out_proj", None), getattr(mixer, "o_proj", None)):
            if proj is not None:
                proj.weight = proj.weight * 3.0
        layer.mlp.down_proj.weight = layer.mlp.down_proj.weight * 3.0
    perm = np.random.RandomState(0).permutation(model.args.vocab_size)
    write_successors(model, dict(enumerate(perm.tolist())), margin=10)
    script_mtp(model)
    mx.eval(model.parameters())


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


@pytest.fixture(scope="module")
def tiny_draft():
    draft, _ = load("tiny-random")
    perturb(draft, 0.004)
    return draft


def tokens_of(responses) -> tuple[list[int], list[bool], object]:
    out = list(responses)
    return [r.token for r in out], [r.from_draft for r in out], out[-1]


def test_stream_generate_with_a_draft_model_gives_the_plain_reply(tiny, tiny_draft):
    model, processor = tiny
    plain, flags, _ = tokens_of(stream_generate(model, processor, PROMPT, 40))
    assert not any(flags)
    spec, flags, last = tokens_of(
        stream_generate(model, processor, PROMPT, 40, draft_model=tiny_draft, num_draft_tokens=4)
    )
    assert spec == plain
    assert sum(flags) == last.accepted_tokens and 0 < last.accepted_tokens < last.draft_tokens
    text = mlx_qwen35.generate(model, processor, PROMPT, 40, draft_model="mtp")
    assert text == mlx_qwen35.generate(model, processor, PROMPT, 40)


def test_a_draft_checkpoint_path_is_loaded_and_its_tokenizer_checked(tiny, tmp_path):
    model, processor = tiny
    same = resolve_model_path("tiny-random")
    spec, _, last = tokens_of(
        stream_generate(model, processor, PROMPT, 24, draft_model=str(same), num_draft_tokens=3)
    )
    plain, _, _ = tokens_of(stream_generate(model, processor, PROMPT, 24))
    assert spec == plain
    assert last.accepted_tokens == last.draft_tokens > 0  # the same weights accept everything
    other = tmp_path / "other"
    shutil.copytree(same, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match="different tokenizer"):
        list(stream_generate(model, processor, PROMPT, 4, draft_model=str(other)))


def test_chat_session_turns_are_the_same_with_speculation(tiny, tiny_draft):
    model, processor = tiny
    questions = ["Hello there, who are you?", "And what about the moon?", "Thanks."]

    def conversation(**draft):
        chat = ChatSession(model, processor, temp=0.0, max_tokens=24, **draft)
        results = [chat.ask(q) for q in questions]
        return [r.tokens for r in results], results

    plain, _ = conversation()
    spec, results = conversation(draft_model=tiny_draft, num_draft_tokens=3)
    assert spec == plain
    assert all(r.draft_tokens > 0 for r in results)
    assert sum(r.accepted_tokens for r in results) > 0
    assert results[1].reused_tokens > 0  # later turns resume from the prefix cache


def test_chat_session_with_the_mtp_head_across_turns(tmp_path):
    model, processor = load("tiny-random")
    semi_script(model)
    questions = ["One.", "Two, please.", "And three."]

    def conversation(**draft):
        chat = ChatSession(model, processor, temp=0.0, max_tokens=30, **draft)
        return [chat.ask(q) for q in questions]

    plain = conversation()
    spec = conversation(draft_model="mtp", num_draft_tokens=3)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    accepted = sum(r.accepted_tokens for r in spec)
    drafted = sum(r.draft_tokens for r in spec)
    assert 0 < accepted < drafted


def test_generate_cli_draft_flags_and_verbose_acceptance():
    from mlx_qwen35.cli.generate import main

    def run(*args):
        return CliRunner().invoke(main, ["--model", "tiny-random", "-m", "12", "-p", "hi", *args])

    plain = run()
    spec = run("--draft-model", "mtp", "--num-draft-tokens", "2", "--verbose")
    assert plain.exit_code == spec.exit_code == 0, spec.output
    assert plain.output.strip() in spec.output
    assert "Draft acceptance: " in spec.output and "drafted tokens" in spec.output
    bad = run("--draft-vocab", "10")
    assert bad.exit_code == 1 and "--draft-vocab needs --draft-model" in bad.output
    bad = run("--draft-model", "mtp", "--num-draft-tokens", "0")
    assert bad.exit_code == 1 and "num_draft_tokens must be an integer from 1 to 7" in bad.output


def test_chat_cli_takes_the_draft_flags():
    from mlx_qwen35.cli.chat import main

    result = CliRunner().invoke(
        main,
        ["--model", "tiny-random", "-m", "6", "--temp", "0", "--draft-model", "mtp", "--verbose"],
        input="hello\n",
    )
    assert result.exit_code == 0, result.output
    assert "accepted]" in result.output


def test_mtp_with_an_image_in_the_prompt():
    """Media prompts: the MTP head takes the merged embeddings and the 3-D positions (with
    their negative rope delta afterwards), and the reply is the plain one."""
    from PIL import Image

    model, processor = load("tiny-random")
    semi_script(model)
    image = Image.fromarray(
        (np.random.RandomState(0).rand(64, 96, 3) * 255).astype(np.uint8), "RGB"
    )
    kwargs = dict(images=[image], max_tokens=30)
    plain, _, _ = tokens_of(stream_generate(model, processor, "What is this?", **kwargs))
    spec, _, last = tokens_of(
        stream_generate(model, processor, "What is this?", draft_model="mtp", **kwargs)
    )
    assert spec == plain
    assert 0 < last.accepted_tokens < last.draft_tokens
