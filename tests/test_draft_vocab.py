"""--draft-vocab: which ids a cheap draft head scores, and that output does not depend on it."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35.engine.draft_vocab import (
    DRAFT_VOCAB_FILE,
    check_draft_vocab,
    draft_vocab_ids,
    merge_order,
    write_draft_vocab,
)
from mlx_qwen35.engine.drafters import DraftHead
from mlx_qwen35.engine.request import Request
from mlx_qwen35.engine.scheduler import Engine
from mlx_qwen35.errors import UserError
from mlx_qwen35.weights.loading import load, resolve_model_path
from mlx_qwen35.weights.scripted import script_model


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


def test_merge_order_puts_bytes_then_early_merges_first(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    data = json.loads(tok.backend.to_str())["model"]
    vocab, merges = data["vocab"], data["merges"]
    order = merge_order(tok)
    first_merge = vocab["".join(merges[0])] if isinstance(merges[0], list) else None
    made = {vocab["".join(m) if isinstance(m, list) else m.replace(" ", "")] for m in merges}
    base = [t for t in vocab.values() if t not in made]
    assert sorted(order[: len(base)]) == sorted(base)  # the byte alphabet first
    assert order[len(base)] == first_merge
    ids = draft_vocab_ids(tok, 300, 704)
    special = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>", "<think>"])
    assert set(special) <= set(ids.tolist())  # end-of-turn can always be drafted
    assert set(order[:300]) <= set(ids.tolist()) and ids.dtype == np.int32


def test_a_frequency_file_wins_over_merge_order(tiny, tmp_path):
    model, processor = tiny
    tok = processor.tokenizer
    src = resolve_model_path("tiny-random")
    local = tmp_path / "tiny"
    shutil.copytree(src, local)
    from mlx_qwen35.inputs.processor import Processor

    local_tok = Processor.from_pretrained(local, model.config).tokenizer
    texts = ["the cat sat on the mat " * 3, "the end"]
    path = write_draft_vocab(local, local_tok, texts)
    assert path.name == DRAFT_VOCAB_FILE and not list(local.glob("*.tmp"))
    ranked = json.loads(path.read_text())["token_ids"]
    counts = Counter(t for text in texts for t in tok.encode(text, add_special_tokens=False))
    assert ranked[0] == counts.most_common(1)[0][0]
    # then every other id (added tokens are always included anyway)
    added = set(tok.backend.get_added_tokens_decoder())
    assert set(ranked) | added == set(tok.get_vocab().values())
    ids = draft_vocab_ids(local_tok, 4, 704, local)
    assert set(ranked[:4]) <= set(ids.tolist())
    path.write_text("{not json")
    with pytest.raises(UserError, match="unreadable draft vocabulary"):
        draft_vocab_ids(local_tok, 4, 704, local)
    with pytest.raises(UserError, match="no text"):
        write_draft_vocab(local, local_tok, [""])


def test_check_draft_vocab():
    assert check_draft_vocab(None, 100) is None
    assert check_draft_vocab(100, 100) is None  # the whole vocabulary: nothing to cut
    assert check_draft_vocab(10, 100) == 10
    for bad in (0, -3, 2.5, True):
        with pytest.raises(UserError, match="draft_vocab must be a positive number"):
            check_draft_vocab(bad, 100)


def test_subset_head_scores_only_its_rows(tiny):
    model, _ = tiny
    ids = np.array([3, 40, 41, 500], dtype=np.int32)
    head = DraftHead(model.language_model, ids)
    h = mx.random.normal((1, model.args.hidden_size))
    full = model.language_model.logits(h)
    np.testing.assert_allclose(np.array(head(h)), np.array(full)[:, ids], rtol=1e-5, atol=1e-5)
    expanded = np.array(head.full(head(h)))
    assert np.isneginf(np.delete(expanded, ids, axis=1)).all()


def test_draft_vocab_changes_cost_not_output(tiny):
    """A scripted model whose script leaves the draft vocabulary: drafts of those tokens are
    lost, the output is the same."""
    model, processor = tiny
    V = model.args.vocab_size
    perm = np.random.RandomState(0).permutation(V)
    script_model(model, dict(enumerate(perm.tolist())))
    outs, rates = [], []
    engine = Engine(model, processor, prefix_cache_bytes=0)
    for n in (None, V // 2):
        request = Request(
            prompt=[5, 6, 7], max_tokens=40, draft_model="mtp", draft_vocab=n, stop_token_ids=()
        )
        handle = engine.submit(request)
        outs.append([e.token for e in handle])
        rates.append(handle.stats.accepted_tokens / handle.stats.draft_tokens)
    assert outs[0] == outs[1]
    assert rates[0] == 1.0 and 0.1 < rates[1] < 0.9


def test_subset_head_of_a_quantized_head(tiny):
    import mlx.nn as nn

    model, _ = tiny
    lm = model.language_model
    quantized = nn.QuantizedLinear.from_linear(lm.lm_head, group_size=32, bits=8)
    ids = np.array([0, 7, 300, 703], dtype=np.int32)
    saved = lm.lm_head
    lm.lm_head = quantized
    try:
        h = mx.random.normal((2, model.args.hidden_size))
        full = np.array(lm.logits(h))
        np.testing.assert_allclose(
            np.array(DraftHead(lm, ids)(h)), full[:, ids], rtol=1e-4, atol=1e-4
        )
    finally:
        lm.lm_head = saved


def test_the_converter_writes_the_frequency_file(tmp_path):
    from mlx_qwen35.inputs.processor import Processor
    from mlx_qwen35.weights.convert import convert
    from mlx_qwen35.weights.loading import load_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello hello hello world\nthe world\n", encoding="utf-8")
    out = tmp_path / "out"
    convert("tiny-random", out, draft_vocab_corpus=corpus, progress=False)
    ranked = json.loads((out / DRAFT_VOCAB_FILE).read_text())["token_ids"]
    tok = Processor.from_pretrained(out, load_config(out)).tokenizer
    lines = corpus.read_text().splitlines()
    counts = Counter(t for line in lines for t in tok.encode(line, add_special_tokens=False))
    assert ranked[0] == counts.most_common(1)[0][0]
    assert set(ranked[:2]) <= set(draft_vocab_ids(tok, 2, 704, out).tolist())
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="cannot read it as UTF-8"):
        convert("tiny-random", tmp_path / "out2", draft_vocab_corpus=bad, progress=False)
    assert not (tmp_path / "out2").exists()
