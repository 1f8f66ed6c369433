"""The two routes of a call, composed from the kernel families, and their torch.library registration.

torch.compile(fullgraph=True) traces the registered ops without a graph break. On GPU they are triton_ops,
which torch.compile decomposes into the kernels themselves. Under the interpreter wrap_triton hands back the
raw kernel, which cannot run on fake tensors, so there they are opaque custom ops.
"""

from typing import Optional

import torch

from ..core.formulas import shrink_dtype
from .common import INTERPRET, triton_op
from .gemm import gemm
from .merge import merged_weight
from .shrink import shrink


def forward_into(x, weight, bias, L, U, e, route, y, scale=None, x_side=None):
    """y in place; returns t. x_side: the shrink's input where it is not x (dropout(x): the side route only)."""
    M, K = x.shape
    t = torch.empty((M, L.shape[1]), device=x.device, dtype=shrink_dtype(x.dtype))
    if M == 0:
        return t
    shrink(x if x_side is None else x_side, U, U.stride(1), U.stride(0), t)
    if route == "side":
        gemm(x, weight, weight.stride(1), weight.stride(0), y, (t, e, L, L.stride(1), L.stride(0)), bias,
             scale=scale)
    else:
        w_eff = merged_weight(weight, L, U, e, scale)
        gemm(x, w_eff, w_eff.stride(1), w_eff.stride(0), y, bias=bias)
    return t


def backward_into(dy, t, weight, L, U, e, route, dx, scale=None):
    """dx in place; returns grad_e (float32, r). The partial sums of the shrink are added up by the GEMM."""
    M, r = dy.shape[0], L.shape[1]
    if M == 0:
        return torch.zeros((r,), device=dy.device, dtype=torch.float32)
    grad_e = torch.empty((r,), device=dy.device, dtype=torch.float32)
    v = torch.empty((M, r), device=dy.device, dtype=dy.dtype)
    part = shrink(dy, L, L.stride(0), L.stride(1), v, t)
    if route == "side":
        gemm(dy, weight, weight.stride(0), weight.stride(1), dx, (v, e, U, U.stride(0), U.stride(1)),
             scale=scale, backward=True, grad_e=(part, grad_e))
    else:
        w_eff = merged_weight(weight, L, U, e, scale)
        gemm(dy, w_eff, w_eff.stride(0), w_eff.stride(1), dx, backward=True, grad_e=(part, grad_e))
    return grad_e


def forward_rows_impl(x, weight, bias, L, U, e, rows, scale=None, x_side=None):
    """forward with a per-row adapter: row m scales by e[rows[m]] of an (A, r) table. Returns (y, t)."""
    M, N, r = x.shape[0], weight.shape[0], L.shape[1]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    t = torch.empty((M, r), device=x.device, dtype=shrink_dtype(x.dtype))
    if M:
        shrink(x if x_side is None else x_side, U, U.stride(1), U.stride(0), t)
        gemm(x, weight, weight.stride(1), weight.stride(0), y, (t, e, L, L.stride(1), L.stride(0)), bias, rows=rows,
             scale=scale)
    return y, t


def backward_rows_impl(dy, t, weight, L, U, e, rows, scale=None):
    """backward with a per-row adapter: (dx, the (A, r) float32 gradient of the table)."""
    M, K, r = dy.shape[0], weight.shape[1], L.shape[1]
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    v = torch.empty((M, r), device=dy.device, dtype=dy.dtype)
    grad_e = torch.zeros_like(e)
    if M:
        shrink(dy, L, L.stride(0), L.stride(1), v)
        gemm(dy, weight, weight.stride(0), weight.stride(1), dx, (v, e, U, U.stride(0), U.stride(1)), rows=rows,
             scale=scale, backward=True)
        grad_e.index_add_(0, rows, t.float() * v.float())
    return dx, grad_e


def backward_base_impl(dy, t, weight, L, U, e, rows=None, scale=None):
    """The backward under dropout: (dX = dY W alone, grad_e, v = dY L). The rank-r term's gradient (v * e) U
    belongs to dropout(x), not x: the caller computes it from v. e is (r,), or an (A, r) table with rows."""
    M, K, r = dy.shape[0], weight.shape[1], L.shape[1]
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    v = torch.empty((M, r), device=dy.device, dtype=dy.dtype)
    if M == 0:
        return dx, torch.zeros_like(e), v
    if rows is not None:
        shrink(dy, L, L.stride(0), L.stride(1), v)
        gemm(dy, weight, weight.stride(0), weight.stride(1), dx, scale=scale, backward=True)
        return dx, torch.zeros_like(e).index_add_(0, rows, t.float() * v.float()), v
    grad_e = torch.empty((r,), device=dy.device, dtype=torch.float32)
    part = shrink(dy, L, L.stride(0), L.stride(1), v, t)
    gemm(dy, weight, weight.stride(0), weight.stride(1), dx, scale=scale, backward=True, grad_e=(part, grad_e))
    return dx, grad_e, v


def _fwd_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], L: torch.Tensor,
              U: torch.Tensor, e: torch.Tensor, route: str, scale: Optional[torch.Tensor] = None,
              x_side: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    t = forward_into(x, weight, bias, L, U, e, route, y, scale, x_side)
    return y, t


def _fwd_fake(x, weight, bias, L, U, e, route, scale=None, x_side=None):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], L.shape[1]), dtype=shrink_dtype(x.dtype))


def _bwd_impl(dy: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor,
              e: torch.Tensor, route: str,
              scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    dx = torch.empty((dy.shape[0], weight.shape[1]), device=dy.device, dtype=dy.dtype)
    grad_e = backward_into(dy, t, weight, L, U, e, route, dx, scale)
    return dx, grad_e


def _bwd_fake(dy, t, weight, L, U, e, route, scale=None):
    return dy.new_empty((dy.shape[0], weight.shape[1])), e.new_empty(e.shape)


def _bwd_base_impl(dy: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor,
                   e: torch.Tensor,
                   scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_base_impl(dy, t, weight, L, U, e, None, scale)


def _bwd_base_fake(dy, t, weight, L, U, e, scale=None):
    return (dy.new_empty((dy.shape[0], weight.shape[1])), e.new_empty(e.shape),
            dy.new_empty((dy.shape[0], L.shape[1])))


def _merge_impl(weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor, e: torch.Tensor,
                scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    return merged_weight(weight, L, U, e, scale)


def _merge_fake(weight, L, U, e, scale=None):
    return torch.empty_like(weight, dtype=L.dtype if scale is not None else weight.dtype)


def _register(name, impl, fake):
    make = triton_op if triton_op is not None and not INTERPRET else torch.library.custom_op
    op = make(name, impl, mutates_args=())
    op.register_fake(fake)
    return op


fwd_op = _register("loldu_triton::fwd", _fwd_impl, _fwd_fake)
bwd_op = _register("loldu_triton::bwd", _bwd_impl, _bwd_fake)
bwd_base_op = _register("loldu_triton::bwd_base", _bwd_base_impl, _bwd_base_fake)
merge_op = _register("loldu_triton::merge", _merge_impl, _merge_fake)

