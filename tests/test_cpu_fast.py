"""cpu_fast.linear: the small-call path gives the plain matmul for 1 to 8 rows (decode, batched
decode, speculative verification) and leaves other shapes to the matmul."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35.model.cpu_fast import linear


@pytest.mark.parametrize("n,k", [(3584, 1024), (1024, 3584), (1 << 15, 1024), (96, 64)])
def test_linear_equals_matmul_for_few_rows(n, k):
    w = mx.random.normal((n, k), key=mx.random.key(0))
    for shape in ((1, k), (1, 1, k), (4, k), (1, 4, k), (2, 3, k), (1, 8, k), (9, k)):
        x = mx.random.normal(shape, key=mx.random.key(1))
        ours, ref = np.array(linear(x, w)), np.array(x @ w.T)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)
