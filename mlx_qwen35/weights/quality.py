"""How much a quantized conversion differs from the unquantized model.

Two views: per tensor, the relative Frobenius error of the dequantized weight (||W' - W|| / ||W||,
measured while converting); per model, the next-token distributions on a fixed set of token
sequences: mean KL(unquantized || quantized) in nats and how often the top-1 token agrees.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

# Fixed inputs: prose, code, Chinese, and a chat turn in Qwen's format. Each is cut to SEQ_LEN
# tokens; checkpoints without a usable tokenizer get fixed-seed random ids instead.
TEXTS = (
    "The river town woke slowly. Fog lay on the water until the sun climbed over the hills, and "
    "the first boats pushed away from the wooden pier with their nets folded in the bow. A baker "
    "opened her shutters, a dog barked twice at nothing, and the church clock struck seven. "
    "Maria had lived there for thirty-two years and knew which bridges creaked in the rain.",
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n    out, i, j = [], 0, 0\n"
    "    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i])\n"
    "            i += 1\n        else:\n            out.append(b[j])\n            j += 1\n"
    "    return out + a[i:] + b[j:]\n",
    "人工智能正在改变我们的生活方式。从语音助手到自动驾驶汽车，机器学习技术已经深入到日常生活的各个方面。"
    "研究人员认为，未来十年内，这些技术将在医疗、教育和交通领域带来更大的变革。",
    "<|im_start|>user\nExplain in two sentences why the sky is blue, then give one example of "
    "Rayleigh scattering you can see at sunset.<|im_end|>\n<|im_start|>assistant\n",
)
SEQ_LEN = 64


def token_sequences(model_dir: Path, vocab_size: int, length: int = SEQ_LEN) -> list[list[int]]:
    tokenizer_file = Path(model_dir) / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        seqs = [tokenizer.encode(t, add_special_tokens=False).ids[:length] for t in TEXTS]
        if all(seqs) and max(max(s) for s in seqs) < vocab_size:
            return seqs
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, length).tolist() for _ in TEXTS]


def log_probs(model: Any, seqs: list[list[int]]) -> list[mx.array]:
    """Per sequence, the next-token log-probabilities [T, V] in fp32."""
    out = []
    for seq in seqs:
        logits = model(mx.array([seq]))[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(lp)
        out.append(lp)
    return out


def compare(reference: list[mx.array], candidate: list[mx.array]) -> dict[str, float]:
    """Mean KL(reference || candidate) over all positions, and top-1 agreement."""
    kl, agree, n = 0.0, 0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        kl += float(mx.sum(mx.exp(ref) * (ref - cand)))
        agree += int(mx.sum(mx.argmax(ref, axis=-1) == mx.argmax(cand, axis=-1)))
        n += ref.shape[0]
    return {"mean_kl": kl / n, "top1": agree / n, "positions": n}


def compare_dirs(
    reference_dir: Path, candidate_dir: Path, dtype: str | None = None
) -> dict[str, float]:
    """Load the reference (optionally cast to `dtype`), score it, free it, then the candidate:
    only one model is in memory at a time."""
    from .loading import load_model

    reference = load_model(reference_dir, dtype)
    seqs = token_sequences(candidate_dir, reference.args.vocab_size)
    ref = log_probs(reference, seqs)
    del reference
    cand = log_probs(load_model(candidate_dir), seqs)
    return compare(ref, cand)


def relative_error(original: mx.array, restored: mx.array) -> float:
    d2, a2 = squared_error(original, restored)
    return (d2 / max(a2, 1e-30)) ** 0.5


def squared_error(original: mx.array, restored: mx.array) -> tuple[float, float]:
    """(||W' - W||^2, ||W||^2): summed over the slices of a stacked tensor, they give its
    relative error."""
    a = original.astype(mx.float32)
    diff = restored.astype(mx.float32) - a
    return float(mx.sum(diff * diff)), float(mx.sum(a * a))


def kind_of(key: str) -> str:
    """A tensor's role, without layer numbers: `language_model.model.layers.7.mlp.down_proj.weight`
    -> `mlp.down_proj`, `mtp.layers.0.self_attn.v_proj.weight` -> `mtp.self_attn.v_proj`."""
    key = key.removesuffix(".weight")
    key = re.sub(r"^language_model\.(model\.)?", "", key)
    key = re.sub(r"^vision_tower\.", "vision.", key)
    return re.sub(r"(^|\.)(layers|blocks)\.\d+\.", r"\1", key)


def tensor_summary(errors: dict[str, tuple[int, float]]) -> dict[str, Any]:
    """errors: tensor key -> (bits, relative error). Grouped by role, plus the worst five."""
    groups: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for key, value in errors.items():
        groups[kind_of(key)].append(value)
    by_kind = [
        {
            "kind": kind,
            "bits": sorted({b for b, _ in vals}),
            "count": len(vals),
            "mean_rel_error": float(np.mean([e for _, e in vals])),
            "max_rel_error": float(max(e for _, e in vals)),
        }
        for kind, vals in sorted(groups.items())
    ]
    worst = sorted(errors.items(), key=lambda kv: -kv[1][1])[:5]
    return {
        "count": len(errors),
        "mean_rel_error": float(np.mean([e for _, e in errors.values()])) if errors else 0.0,
        "by_kind": by_kind,
        "worst": [{"tensor": k, "bits": b, "rel_error": e} for k, (b, e) in worst],
    }


def format_report(report: dict[str, Any]) -> list[str]:
    lines = [
        f"Quality vs unquantized ({report['positions']} positions): mean KL "
        f"{report['mean_kl']:.4g} nats, top-1 agreement {100 * report['top1']:.1f}%"
    ]
    tensors = report.get("tensors")
    if tensors and tensors["count"]:
        lines.append(
            f"Per-tensor relative error ({tensors['count']} quantized tensors, mean "
            f"{tensors['mean_rel_error']:.4f}):"
        )
        width = max(len(g["kind"]) for g in tensors["by_kind"])
        for g in tensors["by_kind"]:
            bits = "/".join(str(b) for b in g["bits"])
            lines.append(
                f"  {g['kind']:<{width}}  {bits:>5} bits  x{g['count']:<3}  mean "
                f"{g['mean_rel_error']:.4f}  max {g['max_rel_error']:.4f}"
            )
    return lines
