"""`python -m mlx_qwen35.bench`: speed and memory of our model beside mlx-lm's, on the same weights.

cli.py holds the command line, the size table and the timed runs.
"""
