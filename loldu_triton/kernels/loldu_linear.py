"""Triton kernels of the LoLDU linear layer: the public entry points (what loldu_triton.functional calls).

    forward:   t = x U^T,   y = x W^T + b + (t * e) L^T
    backward:  v = dY L,    grad_e = sum_rows(t * v),   dX = dY W + (v * e) U
    merge:     W_eff = W + L diag(e) U

Shapes: x (M, K), W (N, K), L (N, r), U (r, K), e (r,) float32, b (N,) or None. Every product accumulates in
fp32. The planner (loldu_triton.planner.plan) picks per call between the "side" route (the rank-r term as extra
K-steps of the GEMM) and the "merged" route (build W_eff, then one plain GEMM).

Layout: one module per kernel family with its launcher (gemm.py: the GEMM with the rank-r epilogue and the
grad_e sum; shrink.py; merge.py), the autotuning spaces in configs.py, shared pieces in common.py, the routes
and the torch.library registration in ops.py; compile_check.py compiles every variant for a GPU target.

Each tl.dot runs in the dtype of its left operand (the activations; L for the merge); the right operand is
cast to it per tile, like autocast does, so fp16/bf16 inputs use tensor cores even with fp32 factors. fp32
dots follow torch.get_float32_matmul_precision(): "highest" runs as 3xTF32 on tensor cores (fp32-accurate),
anything else as tf32.

e may be passed as EParts(s, d, s0, d0) instead of a tensor: the kernels then form e = s*d - s0*d0 themselves.

Set TRITON_INTERPRET=1 before importing this module to run the kernels on CPU tensors with the Triton
interpreter; otherwise CPU tensors raise a RuntimeError.
"""

from typing import Optional, Union

import torch

from ..planner import ROUTES, plan
from ..quant import QUANTIZED_DTYPES
from .common import INTERPRET, EParts, set_wrap_triton_enabled, triton_op
from .merge import merge_into
from .ops import (backward_into, backward_rows_impl, bwd_op, e_operands, forward_into, forward_rows_impl, fwd_op,
                  merge_op)

_INTERPRET = INTERPRET  # the name tests and callers used before the split into modules
ETensor = Union[torch.Tensor, EParts]
__all__ = ["available", "forward", "backward", "merge", "forward_rows", "backward_rows", "EParts", "plan",
           "triton_op"]


def available() -> bool:
    """True when the kernels can run: a CUDA device, or the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET or torch.cuda.is_available()


def _check_device(*tensors):
    device = tensors[0].device
    if device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"Triton kernels need CUDA tensors; got tensors on {device}. To run them on the CPU, set "
            "TRITON_INTERPRET=1 before loldu_triton is imported (Triton interpreter, slow, for testing).")
    for t in tensors:
        if t.device != device:
            raise RuntimeError(f"all tensors must be on one device; got {device} and {t.device}")


def _check_e(e):
    """e: a float32 (r,) tensor, or EParts with s, s0 of shape (1,) and d, d0 (r,), all float32. Returns d or e."""
    if isinstance(e, EParts):
        for name in ("s", "d", "s0", "d0"):
            part = getattr(e, name)
            if not isinstance(part, torch.Tensor) or part.dtype != torch.float32:
                raise TypeError(f"EParts.{name} must be a float32 tensor")
        if e.s.shape != (1,) or e.s0.shape != (1,) or e.d.dim() != 1 or e.d0.shape != e.d.shape:
            raise ValueError(f"EParts needs s, s0 of shape (1,) and d, d0 of one shape (r,); got s "
                             f"{tuple(e.s.shape)}, d {tuple(e.d.shape)}, s0 {tuple(e.s0.shape)}, d0 {tuple(e.d0.shape)}")
        return e.d
    if e.dtype != torch.float32:
        raise TypeError(f"e must be float32, got {e.dtype}")
    return e


def _check_operands(x, weight, bias, L, U, e, scale=None):
    """Validate the shared operands of forward/backward; returns (K, N, r) of the layer."""
    parts = list(e) if isinstance(e, EParts) else [e]
    e = _check_e(e)
    _check_device(x, weight, L, U, *parts, *([] if bias is None else [bias]), *([] if scale is None else [scale]))
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"activations must be float32, float16 or bfloat16, got {x.dtype}")
    for name, p in (("weight", None if scale is not None else weight), ("L", L), ("U", U), ("bias", bias)):
        if p is not None and p.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must be {x.dtype} or float32, got {p.dtype}")
    if scale is not None and (weight.dtype not in QUANTIZED_DTYPES or scale.dtype != torch.float32
                              or scale.shape != weight.shape[:1]):
        raise TypeError(f"a quantized weight is int8 or float8_e4m3fn with a float32 scale per row; got "
                        f"{weight.dtype} {tuple(weight.shape)} and scale {scale.dtype} {tuple(scale.shape)}")
    if weight.dim() != 2 or L.dim() != 2 or U.dim() != 2 or e.dim() != 1:
        raise ValueError("weight, L, U must be 2-D and e 1-D")
    N, K = weight.shape
    r = e.shape[0]
    if r < 1 or L.shape != (N, r) or U.shape != (r, K):
        raise ValueError(f"need L ({N}, r), U (r, {K}), e (r,) with r >= 1; got L {tuple(L.shape)}, "
                         f"U {tuple(U.shape)}, e {tuple(e.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    return K, N, r


def _vec(v):
    # e and bias are indexed with unit stride; copying a strided vector costs nothing next to the GEMM.
    if isinstance(v, EParts):
        return EParts(*(p.contiguous() for p in v))
    return None if v is None else v.contiguous()


def _check_out(out, shape, dtype, name):
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} of shape {shape}, got {out.dtype} {tuple(out.shape)}")


def _route(route, M, K, N, r, itemsize):
    if route is None:
        return plan(M, K, N, r, itemsize, "cuda")
    if route not in ROUTES:
        raise ValueError(f"route must be None, 'side' or 'merged', got {route!r}")
    return route


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], L: torch.Tensor,
            U: torch.Tensor, e: ETensor, *, route: Optional[str] = None,
            y_out: Optional[torch.Tensor] = None,
            weight_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T + b + ((x U^T) * e) L^T and t = x U^T, both in x.dtype. x (M, K) may have any strides.

    e: float32 (r,), or EParts(s, d, s0, d0) for the kernels to form e = s*d - s0*d0 themselves.
    route: None lets `plan` choose; "side" or "merged" forces one. y_out: an (M, N) tensor of x.dtype (any
    strides) to write y into instead of allocating it; an eager-mode hook (tests poison it), whereas the default
    path is a registered op that torch.compile traces without a graph break. weight_scale: weight holds int8 or
    fp8 values of W / weight_scale[:, None], dequantized inside the kernels."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    K, N, r = _check_operands(x, weight, bias, L, U, e, weight_scale)
    M = x.shape[0]
    if x.shape[1] != K:
        raise ValueError(f"x has {x.shape[1]} features, weight expects {K}")
    route = _route(route, M, K, N, r, x.element_size())
    bias, e, scale = _vec(bias), _vec(e), _vec(weight_scale)
    if y_out is None:
        ed, es, es0, ed0 = e_operands(e)
        return fwd_op(x, weight, bias, L, U, ed, route, scale, es, es0, ed0)
    _check_out(y_out, (M, N), x.dtype, "y_out")
    _check_device(x, y_out)
    with set_wrap_triton_enabled(False):
        t = forward_into(x, weight, bias, L, U, e, route, y_out, scale)
    return y_out, t


def backward(dy: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor,
             e: ETensor, *, route: Optional[str] = None,
             dx_out: Optional[torch.Tensor] = None,
             weight_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = dY W + ((dY L) * e) U in dy.dtype, and grad_e = sum over rows of t * (dY L) in float32.

    t is the (M, r) tensor `forward` returned. route, dx_out (M, K) and weight_scale as in `forward`."""
    if dy.dim() != 2 or t.dim() != 2:
        raise ValueError(f"dy and t must be 2-D, got shapes {tuple(dy.shape)} and {tuple(t.shape)}")
    K, N, r = _check_operands(dy, weight, None, L, U, e, weight_scale)
    M = dy.shape[0]
    if dy.shape[1] != N or t.shape != (M, r):
        raise ValueError(f"need dy ({M}, {N}) and t ({M}, {r}); got {tuple(dy.shape)} and {tuple(t.shape)}")
    _check_device(dy, t)
    route = _route(route, M, N, K, r, dy.element_size())
    e, scale = _vec(e), _vec(weight_scale)
    if dx_out is None:
        ed, es, es0, ed0 = e_operands(e)
        return bwd_op(dy, t, weight, L, U, ed, route, scale, es, es0, ed0)
    _check_out(dx_out, (M, K), dy.dtype, "dx_out")
    _check_device(dy, dx_out)
    with set_wrap_triton_enabled(False):
        grad_e = backward_into(dy, t, weight, L, U, e, route, dx_out, scale)
    return dx_out, grad_e


def merge(weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor, e: ETensor, *,
          out: Optional[torch.Tensor] = None, weight_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W_eff = W + L diag(e) U, one kernel with fp32 accumulation, in weight.dtype (L.dtype for a quantized
    weight, see `forward`). out: an (N, K) tensor of that dtype to write into."""
    if weight_scale is None and weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    dtype = L.dtype if weight_scale is not None else weight.dtype
    _check_operands(torch.empty((0, weight.shape[1]), device=weight.device, dtype=dtype), weight, None, L, U, e,
                    weight_scale)
    e, scale = _vec(e), _vec(weight_scale)
    if out is None:
        ed, es, es0, ed0 = e_operands(e)
        return merge_op(weight, L, U, ed, scale, es, es0, ed0)
    _check_out(out, tuple(weight.shape), dtype, "out")
    _check_device(weight, out)
    with set_wrap_triton_enabled(False):
        return merge_into(weight, L, U, e, out, scale)


# --------------------------------------------------------------------------------------------------------------
# Many adapters in one batch (eager entry points): every row m uses its own row e[rows[m]] of an (A, r) table.
# --------------------------------------------------------------------------------------------------------------


def _check_rows(x, e, rows):
    _check_device(x, e, rows)
    if e.dim() != 2 or e.dtype != torch.float32:
        raise ValueError(f"the adapter table must be float32 (adapters, r), got {e.dtype} {tuple(e.shape)}")
    if rows.shape != (x.shape[0],) or rows.dtype != torch.int64:
        raise ValueError(f"rows must be int64 of shape ({x.shape[0]},), got {rows.dtype} {tuple(rows.shape)}")


def forward_rows(x, weight, bias, L, U, e, rows, weight_scale=None):
    """forward() with a per-row adapter: y = x W^T + b + ((x U^T) * e[rows]) L^T. Returns (y, t)."""
    _check_operands(x, weight, bias, L, U, e[0], weight_scale)
    _check_rows(x, e, rows)
    with set_wrap_triton_enabled(False):
        return forward_rows_impl(x, weight, _vec(bias), L, U, e.contiguous(), rows.contiguous(), _vec(weight_scale))


def backward_rows(dy, t, weight, L, U, e, rows, weight_scale=None):
    """backward() with a per-row adapter: dx = dY W + ((dY L) * e[rows]) U, and the (A, r) float32 gradient of
    the table (row a sums t * v over the rows that use adapter a)."""
    _check_operands(dy, weight, None, L, U, e[0], weight_scale)
    _check_rows(dy, e, rows)
    with set_wrap_triton_enabled(False):
        return backward_rows_impl(dy, t, weight, L, U, e.contiguous(), rows.contiguous(), _vec(weight_scale))
