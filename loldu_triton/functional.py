"""``loldu_linear``: y = x W^T + b + ((x U^T) * e) L^T, with a backward that saves only t = x U^T.

Two backends share one autograd.Function: "torch" (any device, the reference) and "triton" (the fused kernels
in ``loldu_triton.kernels``). Per call the planner (``loldu_triton.planner``) picks the side path, which never
builds the out x in delta, or, where that is cheaper (many rows, large rank), merging W_eff once for one GEMM.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .planner import plan
from .quant import QUANTIZED_DTYPES, dequantize

BACKENDS = ("auto", "torch", "triton")


def _kernels():
    from .kernels import loldu_linear as kernels  # imported lazily: triton is optional

    return kernels


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """"auto" takes the Triton kernels for CUDA tensors when triton imports; "triton" never falls back."""
    if backend not in BACKENDS:
        raise ValueError(f"loldu_linear: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return "torch"
    try:
        _kernels()
    except ImportError as err:
        if backend == "triton":
            raise RuntimeError(f"loldu_linear: backend='triton' needs the triton package ({err})") from err
        return "torch"
    return "triton"


def _torch_forward(x2, weight, bias, L, U, e, rows, need_t=True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(y, t); the merged route computes t = x U^T only when backward needs it (at full rank it costs a GEMM)."""
    (N, K), r = weight.shape, e.shape[-1]
    if rows is None and plan(x2.shape[0], K, N, r, x2.element_size(), x2.device.type,
                             fused_epilogue=False) == "merged":
        return F.linear(x2, _torch_merge(weight, L, U, e), bias), F.linear(x2, U) if need_t else None
    t = F.linear(x2, U)
    y = F.linear(x2, weight, bias)
    y.addmm_((t * (e if rows is None else e[rows])).to(y.dtype), L.T)
    return y, t


def _torch_backward(dy2, t, weight, L, U, e, rows, need_dx: bool, need_grad_e: bool):
    v = dy2 @ L
    grad_e = None
    if need_grad_e:
        tv = t.float() * v.float()
        grad_e = tv.sum(0) if rows is None else torch.zeros_like(e).index_add_(0, rows, tv)
    dx2 = None
    if need_dx:
        (N, K), r = weight.shape, e.shape[-1]
        if rows is None and plan(dy2.shape[0], N, K, r, dy2.element_size(), dy2.device.type,
                                 fused_epilogue=False) == "merged":
            dx2 = dy2 @ _torch_merge(weight, L, U, e)
        else:
            dx2 = dy2 @ weight
            dx2.addmm_((v * (e if rows is None else e[rows])).to(dx2.dtype), U)
    return dx2, grad_e


def _dense(weight, scale, dtype):
    """The weight the PyTorch path multiplies by: itself, or a quantized one dequantized to ``dtype``."""
    return weight if scale is None else dequantize(weight, scale, dtype)


def _torch_merge(weight, L, U, e):
    acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 accumulation, float64 kept
    return torch.addmm(weight.to(acc), L.to(acc) * e.to(acc), U.to(acc)).to(weight.dtype)


def _forward(x2, weight, bias, L, U, e, rows, scale, backend, need_t=True):
    """(y, t) for a 2-D input on either backend (t may be None when need_t is False)."""
    if backend == "triton":
        kernels = _kernels()
        return (kernels.forward(x2, weight, bias, L, U, e, weight_scale=scale) if rows is None
                else kernels.forward_rows(x2, weight, bias, L, U, e, rows, scale))
    return _torch_forward(x2, _dense(weight, scale, x2.dtype), bias, L, U, e, rows, need_t)


class LoLDULinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, L, U, e, rows, scale, backend):
        y2, t = _forward(x2, weight, bias, L, U, e, rows, scale, backend)
        # x itself is kept only when a gradient of the frozen weight or U is asked for.
        needs_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[4]
        ctx.save_for_backward(t, weight, L, U, e, rows, scale, x2 if needs_x else None)
        ctx.backend = backend
        return y2

    @staticmethod
    def backward(ctx, dy):
        t, weight, L, U, e, rows, scale, x2 = ctx.saved_tensors
        need_x, need_w, need_b, need_l, need_u, need_e = ctx.needs_input_grad[:6]
        dy2 = dy  # the Function's output is 2-D
        if ctx.backend == "triton" and need_x:
            kernels = _kernels()
            dx2, grad_e = (kernels.backward(dy2, t, weight, L, U, e, weight_scale=scale) if rows is None
                           else kernels.backward_rows(dy2, t, weight, L, U, e, rows, scale))
        else:  # no dX wanted (a first layer): grad_e alone is two small GEMMs, not worth a kernel's dX GEMM
            dense = _dense(weight, scale, dy2.dtype) if need_x else weight
            dx2, grad_e = _torch_backward(dy2, t, dense, L, U, e, rows, need_x, need_e)
        e_rows = e if rows is None else e[rows]
        dx = dx2 if need_x else None
        grad_w = (dy2.T @ x2).to(weight.dtype) if need_w else None
        grad_b = dy2.sum(0) if need_b else None
        grad_l = (dy2.T @ (t * e_rows).to(dy2.dtype)).to(L.dtype) if need_l else None
        grad_u = None
        if need_u:
            v = dy2 @ L
            grad_u = ((v * e_rows).to(dy2.dtype).T @ x2).to(U.dtype)
        return dx, grad_w, grad_b, grad_l, grad_u, grad_e if need_e else None, None, None, None


def check_operands(x, weight, bias, L, U, e, name: str = "loldu_linear", weight_scale=None) -> None:
    out_f, in_f = weight.shape
    rank = e.shape[-1] if e.dim() in (1, 2) else -1
    if x.shape[-1] != in_f:
        raise ValueError(f"{name}: input of shape {tuple(x.shape)} has last dim {x.shape[-1]}, expected {in_f}")
    if e.dim() not in (1, 2) or L.shape != (out_f, rank) or U.shape != (rank, in_f):
        raise ValueError(
            f"{name}: factor shapes L {tuple(L.shape)}, U {tuple(U.shape)}, e {tuple(e.shape)} do not fit "
            f"weight {tuple(weight.shape)} (want L (out, r), U (r, in), e (r,))"
        )
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"{name}: bias of shape {tuple(bias.shape)} does not fit weight {tuple(weight.shape)}")
    if weight_scale is not None:
        if weight.dtype not in QUANTIZED_DTYPES or weight_scale.shape != (out_f,):
            raise ValueError(f"{name}: a quantized weight is int8 or float8_e4m3fn with one scale per output "
                             f"row; got {weight.dtype} and scale of shape {tuple(weight_scale.shape)}")
        if x.dtype != L.dtype:
            raise ValueError(f"{name}: input dtype {x.dtype} differs from the layer's compute dtype {L.dtype}")
    elif x.dtype != weight.dtype:
        raise ValueError(f"{name}: input dtype {x.dtype} differs from weight dtype {weight.dtype}")


def loldu_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    L: torch.Tensor,
    U: torch.Tensor,
    e: torch.Tensor,
    backend: str = "auto",
    *,
    rows: Optional[torch.Tensor] = None,
    weight_scale: Optional[torch.Tensor] = None,
    name: str = "loldu_linear",
) -> torch.Tensor:
    """``x (W + L diag(e) U)^T + b`` without building the out x in delta.

    x: (..., in); weight: (out, in); bias: (out,) or None; L: (out, r); U: (r, in); e: (r,) float32.
    backend: "auto" (Triton kernels for CUDA tensors, else PyTorch), "torch", or "triton" (never falls back).
    rows: many adapters in one batch. Then e is an (adapters, r) float32 table and rows an int64 tensor with
        one entry per row of x flattened to (M, in): row m uses e[rows[m]]. Always the side path.
    weight_scale: weight is quantized (int8 or float8_e4m3fn values of W / weight_scale[:, None], see
        loldu_triton.quant); the compute dtype is then L's.
    name: how errors refer to the caller (a layer's name).
    Under torch.autocast the operands are cast to the autocast dtype, as F.linear's are; e stays float32.
    """
    if (rows is None) != (e.dim() == 1):
        raise ValueError(f"{name}: pass e of shape (r,), or an (adapters, r) table together with rows")
    device_type = x.device.type
    autocast_off = contextlib.nullcontext()
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, L, U = (t.to(dtype) for t in (x, L, U))
        weight = weight if weight_scale is not None else weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        autocast_off = torch.autocast(device_type, enabled=False)
    check_operands(x, weight, bias, L, U, e, name, weight_scale)
    # Reshapes stay outside the Function: an output that is a view made inside it could not be modified in
    # place (ReLU(inplace=True), y += residual). A 2-D input gets its output itself, not a view, as from
    # nn.Linear: FSDP2 misses an in-place op on a view and frees the weight before backward.
    operands = (x.reshape(-1, x.shape[-1]), weight, bias, L, U, e, rows, weight_scale, resolve_backend(backend, x))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, L, U, e))
    with autocast_off:
        # Without autograd (inference, decode) the custom Function's own overhead is skipped.
        y2 = LoLDULinearFunction.apply(*operands) if needs_grad else _forward(*operands, need_t=False)[0]
    return y2 if x.dim() == 2 else y2.reshape(*x.shape[:-1], y2.shape[-1])


def loldu_merge(weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor, e: torch.Tensor, backend: str = "auto",
                weight_scale: Optional[torch.Tensor] = None):
    """``W + L diag(e) U`` in weight's dtype (L's for a quantized weight), accumulated in float32."""
    if resolve_backend(backend, weight) == "triton":
        return _kernels().merge(weight, L, U, e, weight_scale=weight_scale)
    return _torch_merge(_dense(weight, weight_scale, L.dtype), L, U, e)
