"""Triton kernels of loldu_triton: the entry points are in loldu_linear.py (see its docstring for the layout)."""
