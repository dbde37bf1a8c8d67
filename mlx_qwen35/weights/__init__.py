"""Checkpoints: loading (local, Hub, tiny-random), the converter with its recipes and quality
report, quantization, and upload."""
