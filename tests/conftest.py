"""Shared fixtures: tiny perturbed HF checkpoints, written once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hf_reference  # noqa: E402


class CheckpointFactory:
    """Builds (and caches) `(hf_model, checkpoint_dir)` pairs keyed by their construction args."""

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[tuple, tuple] = {}

    def __call__(
        self,
        variant: str = "base",
        *,
        vision: bool = False,
        sharded: bool = False,
        with_mtp: bool = False,
    ):
        key = (variant, vision, sharded, with_mtp)
        if key not in self._made:
            model = hf_reference.build_hf_model(variant, vision=vision)
            path = self.root / "-".join(str(k) for k in key)
            hf_reference.save_hf_checkpoint(
                model,
                path,
                max_shard_size="100KB" if sharded else None,
                with_mtp=with_mtp,
                keep_vision=vision,
            )
            self._made[key] = (model, path)
        return self._made[key]


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("hf"))


class MoeCheckpointFactory:
    """`(hf_model, checkpoint_dir)` for a tiny MoE variant, saved per expert (as transformers writes
    it) or `fused` (as the original Hub checkpoints store the experts); cached like the above."""

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[tuple, tuple] = {}

    def __call__(self, variant: str = "moe", *, vision: bool = False, fused: bool = False):
        key = (variant, vision, fused)
        if key not in self._made:
            model = hf_reference.build_hf_moe_model(variant, vision=vision)
            path = self.root / "-".join(str(k) for k in key)
            hf_reference.save_hf_checkpoint(model, path, keep_vision=vision)
            if fused:
                hf_reference.fuse_experts(path)
            self._made[key] = (model, path)
        return self._made[key]


@pytest.fixture(scope="session")
def hf_moe_checkpoint(tmp_path_factory) -> MoeCheckpointFactory:
    return MoeCheckpointFactory(tmp_path_factory.mktemp("hf_moe"))
