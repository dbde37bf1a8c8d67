"""The Qwen3.5 network: config, layers, the hybrid decoder and its caches, the vision tower, 3-D
positions, the Gated DeltaNet recurrence (gated_delta/) and the CPU fast paths."""
