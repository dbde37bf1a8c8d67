"""The Gated DeltaNet recurrence of Qwen3.5's linear-attention layers (see design/gated_delta.md).

Entry points: `gated_delta_core` (conv + gates + recurrence, what the model calls),
`gated_delta_update` (the recurrence on prepared q, k, v, g, beta) and `causal_conv1d`.
Backends and the rule that picks one are described in `dispatch.py`.
"""

from .chunked import chunked_gated_delta
from .conv import causal_conv1d
from .decode import gated_delta_step, gated_delta_steps
from .dispatch import BACKENDS, ENV_VAR, gated_delta_core, gated_delta_update, select_backend
from .reference import gated_delta_reference

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "causal_conv1d",
    "chunked_gated_delta",
    "gated_delta_core",
    "gated_delta_reference",
    "gated_delta_step",
    "gated_delta_steps",
    "gated_delta_update",
    "select_backend",
]
