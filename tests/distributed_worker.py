"""Run under `mlx.launch`: load a checkpoint, distribute it (`tensor` or `pipeline`), and write
rank 0's logits of a fixed batch, full forward and prefill + decode, to an .npz file.

    mlx.launch --backend ring -n 2 python tests/distributed_worker.py CKPT MODE OUT.npz
"""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np

from mlx_qwen35.model.distributed import distribute
from mlx_qwen35.weights.loading import load_model

IDS = np.random.RandomState(11).randint(0, 300, size=(2, 23))
PREFILL = 15


def logits(model) -> dict[str, np.ndarray]:
    full = np.array(model(mx.array(IDS)))
    cache = model.make_cache()
    pieces = [np.array(model(mx.array(IDS[:, :PREFILL]), cache=cache))]
    for t in range(PREFILL, IDS.shape[1]):
        pieces.append(np.array(model(mx.array(IDS[:, t : t + 1]), cache=cache)))
    return {"full": full, "incremental": np.concatenate(pieces, axis=1)}


def main() -> None:
    path, mode, out = sys.argv[1:4]
    model = load_model(path, "float32", lazy=True)  # read only what this rank keeps
    group = distribute(model, mode)
    result = logits(model)
    if group.rank() == 0:
        np.savez(out, size=group.size(), **result)


if __name__ == "__main__":
    main()
