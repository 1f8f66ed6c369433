"""Triton kernels of loldu_triton (see loldu_linear.py)."""
