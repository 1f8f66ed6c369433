"""Triton kernels of the LoLDU linear layer: their entry points.

    forward:   t = x U^T,   y = x W^T + b + (t * e) L^T
    backward:  v = dY L,    grad_e = sum_rows(t * v),   dX = dY W + (v * e) U
    merge:     W_eff = W + L diag(e) U

Shapes: x (M, K), W (N, K), L (N, r), U (r, K), e (r,) float32, b (N,) or None. Every product accumulates in
fp32. The planner (factors.planner.plan) picks per call between the "side" route (the rank-r term as extra
K-steps of the GEMM) and the "merged" route (build W_eff, then one plain GEMM).

Layout: one module per kernel family with its launcher (gemm.py: the GEMM with the rank-r epilogue and the
grad_e sum; shrink.py; merge.py), the autotuning spaces in configs.py, shared pieces in common.py, the routes
and the torch.library registration in ops.py; tools/compile_check.py compiles every variant for a GPU target.

Two kinds of entry point: ``forward``, ``backward``, ``merge``, ``forward_rows`` and ``backward_rows`` check
their operands (core.operands) and then run; the ``run_*`` functions run operands that the caller checked
already (ops.functional checks once per public call).

Each tl.dot runs in the dtype of its left operand (the activations; L for the merge); the right operand is
cast to it per tile, like autocast does, so fp16/bf16 inputs use tensor cores even with fp32 factors. fp32
dots follow torch.get_float32_matmul_precision(): "highest" runs as 3xTF32 on tensor cores (fp32-accurate),
anything else as tf32.

Set TRITON_INTERPRET=1 before importing this module to run the kernels on CPU tensors with the Triton
interpreter; otherwise CPU tensors raise a RuntimeError.
"""

from typing import Optional

import torch

from ..core.operands import check_operands, check_rows
from ..factors.planner import ROUTES, plan
from .common import INTERPRET, set_wrap_triton_enabled
from .merge import merge_into
from .ops import (backward_base_impl, backward_into, backward_rows_impl, bwd_base_op, bwd_op, forward_into,
                  forward_rows_impl, fwd_op, merge_op)

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    """True when the kernels can run: a CUDA device, or the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return INTERPRET or torch.cuda.is_available()


def _check_device(*tensors):
    device = tensors[0].device
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"Triton kernels need CUDA tensors; got tensors on {device}. To run them on the CPU, set "
            "TRITON_INTERPRET=1 before loldu_triton is imported (Triton interpreter, slow, for testing).")
    for t in tensors:
        if t is not None and t.device != device:
            raise RuntimeError(f"all tensors must be on one device; got {device} and {t.device}")


def _check_kernel_dtypes(x, weight, bias, L, U, e, scale):
    """What the kernels support beyond check_operands: float activations, factors in x's dtype or float32,
    e (and a quantized weight's scale) in float32."""
    _check_device(x, weight, L, U, e, bias, scale)
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"activations must be float32, float16 or bfloat16, got {x.dtype}")
    if e.dtype != torch.float32:
        raise TypeError(f"e must be float32, got {e.dtype}")
    for name, p in (("weight", None if scale is not None else weight), ("L", L), ("U", U), ("bias", bias)):
        if p is not None and p.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must be {x.dtype} or float32, got {p.dtype}")
    if scale is not None and scale.dtype != torch.float32:
        raise TypeError(f"a quantized weight's scale must be float32, got {scale.dtype}")


def _vec(v):
    # e and bias are indexed with unit stride; copying a strided vector costs nothing next to the GEMM.
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


def _check_2d(name, *tensors, table=False):
    """Kernels take (M, features) operands; e is (r,), or (adapters, r) with ``table``."""
    e = tensors[-1]
    if e.dim() != (2 if table else 1):
        raise ValueError(f"{name}: e must be {'an (adapters, r) table' if table else 'of shape (r,)'}, got shape "
                         f"{tuple(e.shape)}")
    for t in tensors[:-1]:
        if t.dim() != 2:
            raise ValueError(f"{name}: expects 2-D (M, features) tensors, got shape {tuple(t.shape)}")


def _check_backward_operands(name, dy, t, weight, L, U, e, weight_scale):
    """The layer's operands as forward checks them, and dY (M, N) with forward's t (M, r)."""
    _check_2d(name, dy, t, e, table=name.endswith("_rows"))
    check_operands(dy.new_empty((0, weight.shape[1])), weight, None, L, U, e, name, weight_scale, same_dtype=False)
    M, N, r = dy.shape[0], weight.shape[0], e.shape[-1]
    if dy.shape[1] != N or t.shape != (M, r):
        raise ValueError(f"{name}: need dy ({M}, {N}) and t ({M}, {r}); got {tuple(dy.shape)} and {tuple(t.shape)}")


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], L: torch.Tensor,
            U: torch.Tensor, e: torch.Tensor, *, route: Optional[str] = None, y_out: Optional[torch.Tensor] = None,
            weight_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T + b + ((x U^T) * e) L^T and t = x U^T, both in x.dtype (t float32 for float16 x). x (M, K) may
    have any strides; e is float32 (r,).

    route: None lets `plan` choose; "side" or "merged" forces one. y_out: an (M, N) tensor of x.dtype (any
    strides) to write y into instead of allocating it; an eager-mode hook (tests poison it), whereas the default
    path is a registered op that torch.compile traces without a graph break. weight_scale: weight holds int8 or
    fp8 values of W / weight_scale[:, None], dequantized inside the kernels."""
    _check_2d("kernels.forward", x, e)
    check_operands(x, weight, bias, L, U, e, "kernels.forward", weight_scale, same_dtype=False)
    return run_forward(x, weight, bias, L, U, e, route=route, y_out=y_out, weight_scale=weight_scale)


def run_forward(x, weight, bias, L, U, e, *, route=None, y_out=None, weight_scale=None, x_side=None):
    """forward() on operands that check_operands passed. x_side: dropout(x), of x's shape and dtype, read by
    the shrink instead of x (route "side" only: t = x_side U^T); None for x itself."""
    _check_kernel_dtypes(x, weight, bias, L, U, e, weight_scale)
    (M, K), N, r = x.shape, weight.shape[0], e.shape[0]
    route = _route(route, M, K, N, r, x.element_size())
    _check_side(x, x_side, route)
    bias, e, scale = _vec(bias), _vec(e), _vec(weight_scale)
    extra = () if x_side is None else (x_side,)  # (without dropout the op is called as it always was)
    if y_out is None:
        return fwd_op(x, weight, bias, L, U, e, route, scale, *extra)
    _check_out(y_out, (M, N), x.dtype, "y_out")
    _check_device(x, y_out)
    with set_wrap_triton_enabled(False):
        t = forward_into(x, weight, bias, L, U, e, route, y_out, scale, x_side)
    return y_out, t


def _check_side(x, x_side, route="side"):
    if x_side is None:
        return
    if x_side.shape != x.shape or x_side.dtype != x.dtype or x_side.device != x.device:
        raise ValueError(f"x_side must be {x.dtype} of shape {tuple(x.shape)} on {x.device}, like x; got "
                         f"{x_side.dtype} {tuple(x_side.shape)} on {x_side.device}")
    if route != "side":
        raise ValueError(f"x_side (dropout(x)) needs the 'side' route, not {route!r}: the merged one applies the "
                         f"delta to x")


def backward(dy: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor,
             e: torch.Tensor, *, route: Optional[str] = None, dx_out: Optional[torch.Tensor] = None,
             weight_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = dY W + ((dY L) * e) U in dy.dtype, and grad_e = sum over rows of t * (dY L) in float32.

    t is the (M, r) tensor `forward` returned. route, dx_out (M, K) and weight_scale as in `forward`."""
    _check_backward_operands("kernels.backward", dy, t, weight, L, U, e, weight_scale)
    return run_backward(dy, t, weight, L, U, e, route=route, dx_out=dx_out, weight_scale=weight_scale)


def run_backward(dy, t, weight, L, U, e, *, route=None, dx_out=None, weight_scale=None):
    """backward() on operands that check_operands passed (in forward)."""
    _check_kernel_dtypes(dy, weight, None, L, U, e, weight_scale)
    _check_device(dy, t)
    (M, N), K, r = dy.shape, weight.shape[1], e.shape[0]
    route = _route(route, M, N, K, r, dy.element_size())
    e, scale = _vec(e), _vec(weight_scale)
    if dx_out is None:
        return bwd_op(dy, t, weight, L, U, e, route, scale)
    _check_out(dx_out, (M, K), dy.dtype, "dx_out")
    _check_device(dy, dx_out)
    with set_wrap_triton_enabled(False):
        grad_e = backward_into(dy, t, weight, L, U, e, route, dx_out, scale)
    return dx_out, grad_e


def merge(weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor, e: torch.Tensor, *,
          out: Optional[torch.Tensor] = None, weight_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W_eff = W + L diag(e) U, one kernel with fp32 accumulation, in weight.dtype (L.dtype for a quantized
    weight, see `forward`). out: an (N, K) tensor of that dtype to write into."""
    dtype = L.dtype if weight_scale is not None else weight.dtype
    _check_2d("kernels.merge", weight, e)
    check_operands(weight.new_empty((0, weight.shape[1]), dtype=dtype), weight, None, L, U, e, "kernels.merge",
                   weight_scale, same_dtype=False)
    return run_merge(weight, L, U, e, out=out, weight_scale=weight_scale)


def run_merge(weight, L, U, e, *, out=None, weight_scale=None):
    """merge() on operands that check_operands passed."""
    dtype = L.dtype if weight_scale is not None else weight.dtype
    if dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    _check_kernel_dtypes(weight.new_empty((0, weight.shape[1]), dtype=dtype), weight, None, L, U, e, weight_scale)
    e, scale = _vec(e), _vec(weight_scale)
    if out is None:
        return merge_op(weight, L, U, e, scale)
    _check_out(out, tuple(weight.shape), dtype, "out")
    _check_device(weight, out)
    with set_wrap_triton_enabled(False):
        return merge_into(weight, L, U, e, out, scale)


# --------------------------------------------------------------------------------------------------------------
# Many adapters in one batch (eager entry points): every row m uses its own row e[rows[m]] of an (A, r) table.
# --------------------------------------------------------------------------------------------------------------


def forward_rows(x, weight, bias, L, U, e, rows, weight_scale=None):
    """forward() with a per-row adapter: y = x W^T + b + ((x U^T) * e[rows]) L^T. Returns (y, t)."""
    _check_2d("kernels.forward_rows", x, e, table=True)
    check_operands(x, weight, bias, L, U, e, "kernels.forward_rows", weight_scale,
                   same_dtype=False)
    check_rows(rows, e, x.shape[0], x.device, "kernels.forward_rows")
    return run_forward_rows(x, weight, bias, L, U, e, rows, weight_scale)


def run_forward_rows(x, weight, bias, L, U, e, rows, weight_scale=None, x_side=None):
    """forward_rows() on operands that check_operands and check_rows passed; x_side as in run_forward."""
    _check_kernel_dtypes(x, weight, bias, L, U, e, weight_scale)
    _check_side(x, x_side)
    with set_wrap_triton_enabled(False):
        return forward_rows_impl(x, weight, _vec(bias), L, U, e.contiguous(), rows.contiguous(), _vec(weight_scale),
                                 x_side)


def backward_rows(dy, t, weight, L, U, e, rows, weight_scale=None):
    """backward() with a per-row adapter: dx = dY W + ((dY L) * e[rows]) U, and the (A, r) float32 gradient of
    the table (row a sums t * v over the rows that use adapter a)."""
    _check_backward_operands("kernels.backward_rows", dy, t, weight, L, U, e, weight_scale)
    check_rows(rows, e, dy.shape[0], dy.device, "kernels.backward_rows")
    return run_backward_rows(dy, t, weight, L, U, e, rows, weight_scale)


def run_backward_rows(dy, t, weight, L, U, e, rows, weight_scale=None):
    """backward_rows() on operands that check_operands and check_rows passed."""
    _check_kernel_dtypes(dy, weight, None, L, U, e, weight_scale)
    with set_wrap_triton_enabled(False):
        return backward_rows_impl(dy, t, weight, L, U, e.contiguous(), rows.contiguous(), _vec(weight_scale))


def run_backward_base(dy, t, weight, L, U, e, rows=None, weight_scale=None):
    """The backward under dropout, on operands that check_operands passed (in forward): (dX = dY W alone,
    grad_e = sum_rows(t * v), v = dY L), e (r,) or with rows an (A, r) table. The rank-r term's gradient
    (v * e) U is dropout(x)'s, not dX's: the caller forms it from v."""
    _check_kernel_dtypes(dy, weight, None, L, U, e, weight_scale)
    _check_device(dy, t)
    scale = _vec(weight_scale)
    if rows is None:
        return bwd_base_op(dy, t, weight, L, U, _vec(e), scale)
    with set_wrap_triton_enabled(False):
        return backward_base_impl(dy, t, weight, L, U, e.contiguous(), rows.contiguous(), scale)
