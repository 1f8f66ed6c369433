"""One validation of LoLDU's settings, shared by every entry point (layers, add_loldu, adapter files).

Each check returns the value in its canonical type or raises an error that names the argument and the caller
(``where``: a layer, a function or a file). Nothing is coerced silently: 2.7, "3" and True are not ranks.
"""
from __future__ import annotations

import math
import numbers
import operator

INITS = ("lu", "uniform", "normal", "constant")
BACKENDS = ("auto", "torch", "triton")
QUANTIZATION_KINDS = ("int8", "fp8")


def _is_int(value) -> bool:
    # numbers.Integral covers int and numpy integers; bool is an int to Python but never a count here.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_rank(rank, where: str, shape=None, allow_full: bool = False):
    """A positive int (numpy ints too), at most min(shape) for a weight of that (out, in) shape; "full" where
    ``allow_full``."""
    if allow_full and isinstance(rank, str) and rank == "full":
        return rank
    limit = None if shape is None else min(shape)
    if not _is_int(rank) or rank < 1 or (limit is not None and rank > limit):
        wanted = "a positive int" + (" or 'full'" if allow_full else "")
        if shape is not None:
            wanted = f"an int in [1, min(out, in)] = [1, {limit}] for weight {shape[0]}x{shape[1]}"
        raise ValueError(f"{where}: rank must be {wanted}, got {rank!r} ({type(rank).__name__})")
    return operator.index(rank)


def check_alpha(alpha, where: str):
    """None (alpha = rank) or a finite real > 0: e's scale s0 = alpha / rank must be finite and nonzero."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"{where}: alpha must be a positive finite number or None, got {alpha!r} "
                         f"({type(alpha).__name__})")
    value = float(alpha)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: alpha must be a positive finite number or None, got {alpha!r}")
    return value


def check_init(init, where: str) -> str:
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"{where}: init must be one of {INITS}, got {init!r}")
    return init


def check_init_seed(seed, where: str) -> int:
    if not _is_int(seed):
        raise ValueError(f"{where}: init_seed must be an int, got {seed!r} ({type(seed).__name__})")
    return operator.index(seed)


def check_backend(backend, where: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_quantization(kind, where: str):
    if kind is not None and (not isinstance(kind, str) or kind not in QUANTIZATION_KINDS):
        raise ValueError(f"{where}: base_quantization must be None or one of {QUANTIZATION_KINDS}, got {kind!r}")
    return kind


def check_settings(where: str, rank, alpha, init, init_seed, shape=None, allow_full=False):
    """(rank, alpha, init, init_seed), each checked; alpha None stays None."""
    return (check_rank(rank, where, shape, allow_full), check_alpha(alpha, where), check_init(init, where),
            check_init_seed(init_seed, where))


def is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
