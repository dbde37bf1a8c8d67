"""M-RoPE with unequal sections: image and video logits against transformers.

The base test configs split the rotary frequencies equally between the t, h and w axes, where
swapping the h and w section sizes changes nothing; the real checkpoints use (11, 11, 10). These
configs make every section size matter: (8, 3, 1) over a 24-dim rotary slice (all three differ)
and (2, 1, 3) over 12 dims (w wider than h). Swapping h and w only moves the frequencies between
3*min(h, w) and 3*max(h, w); with the usual theta those are so slow that a few positions of
difference turn them by < 1e-3 rad and the logits move by less than the tolerance, so theta is
100 here. Each test also shows that a model built with the h and w sizes swapped misses the
reference by far more than the tolerance, so the parity check really sees the sections.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hf_reference import build_hf_model, save_hf_checkpoint
from test_multimodal import TOL, Prompt, reference, rel_err, run
from test_vision import sharpen

from mlx_qwen35.weights.loading import load_model

SECTIONS = {
    "8-3-1": dict(partial_rotary_factor=0.5, mrope_section=[8, 3, 1]),
    "2-1-3": dict(partial_rotary_factor=0.25, mrope_section=[2, 1, 3]),
}


@pytest.fixture(scope="module", params=list(SECTIONS))
def models(request, tmp_path_factory):
    """(HF reference, ours, ours with the h and w section sizes swapped)."""
    rope = {
        "rope_type": "default",
        "rope_theta": 100.0,
        "mrope_interleaved": True,
        **SECTIONS[request.param],
    }
    hf = build_hf_model(vision=True, rope_parameters=rope)
    sharpen(hf.model.visual)
    root = tmp_path_factory.mktemp(f"mrope-{request.param}")
    path = save_hf_checkpoint(hf, root / "ckpt", keep_vision=True)
    swapped = shutil.copytree(path, root / "swapped")
    config = json.loads((swapped / "config.json").read_text())
    t, h, w = config["text_config"]["rope_parameters"]["mrope_section"]
    assert h != w
    config["text_config"]["rope_parameters"]["mrope_section"] = [t, w, h]
    (swapped / "config.json").write_text(json.dumps(config))
    return hf, load_model(path), load_model(swapped)


def check(models, p: Prompt) -> None:
    hf, ours, swapped = models
    ref = reference(hf, p.array(), **p.media)
    assert rel_err(run(ours, p.array(), **p.media), ref) < TOL
    assert rel_err(run(swapped, p.array(), **p.media), ref) > 10 * TOL


def test_image_with_unequal_sections_matches_reference(models):
    # 6 x 8 patches -> 3 x 4 merged tokens: h and w positions differ along the image.
    check(models, Prompt(seed=11).text(4).image(6, 8).text(5))


def test_video_with_unequal_sections_matches_reference(models):
    # Three temporal groups of 4 x 6 patches, with timestamps between them.
    check(models, Prompt(seed=12).text(3).video(3, 4, 6).text(4))


def test_decoding_after_an_image_continues_the_walk(models):
    """Prefill up to a few tokens after the image, then decode one token at a time: the text
    positions after an image come from the cache's rope delta, with every section in play."""
    hf, ours, _ = models
    p = Prompt(seed=13).text(2).image(8, 4).text(6)
    ref = reference(hf, p.array(), **p.media)
    ids = p.array()
    cut = ids.shape[1] - 4
    cache = ours.make_cache()
    pieces = [run(ours, ids[:, :cut], cache, **p.media)]
    for t in range(cut, ids.shape[1]):
        pieces.append(run(ours, ids[:, t : t + 1], cache))
    assert rel_err(np.concatenate(pieces, axis=1), ref) < TOL
