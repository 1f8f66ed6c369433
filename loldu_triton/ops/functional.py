"""The functional API: ``loldu_linear`` (x (W + L diag(e) U)^T + b without building the delta) and
``loldu_merged_weight`` (W + L diag(e) U), on the backend each call resolves to."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from ..core.formulas import merged_weight
from ..core.operands import check_operands, check_rows
from ..core.settings import check_backend, check_dropout
from ..factors.quant import dense_weight
from .function import LoLDULinearFunction, forward_2d, kernels


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a call on ``device`` runs: "auto" takes the Triton kernels on CUDA devices when triton
    imports, else PyTorch; "triton" never falls back."""
    check_backend(backend, "loldu_linear")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return "torch"
    try:
        kernels()
    except ImportError as err:
        if backend == "triton":
            raise RuntimeError(f"loldu_linear: backend='triton' needs the triton package ({err})") from err
        return "torch"
    return "triton"


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


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
    dropout: float = 0.0,
) -> torch.Tensor:
    """``x (W + L diag(e) U)^T + b`` without building the out x in delta.

    x: (..., in); weight: (out, in); bias: (out,) or None; L: (out, r); U: (r, in); e: (r,) float32.
    backend: "auto" (Triton kernels for CUDA tensors, else PyTorch), "torch", or "triton" (never falls back).
    rows: many adapters in one batch. Then e is an (adapters, r) float32 table and rows an int64 tensor with
        one entry per row of x flattened to (M, in): row m uses e[rows[m]]. Always the side path.
    weight_scale: weight is quantized (int8 or float8_e4m3fn values of W / weight_scale[:, None], see
        loldu_triton.quant); the compute dtype is then L's.
    name: how errors refer to the caller (a layer's name).
    dropout: the probability of dropping an input of the rank-r path (PEFT's lora_dropout): that path reads
        F.dropout(x, dropout), the base GEMM x itself. Applied whenever > 0 (a layer passes 0 in eval mode);
        0 runs exactly as without it.
    Under torch.autocast the operands are cast to the autocast dtype, as F.linear's are; e stays float32.
    """
    if (rows is None) != (e.dim() == 1):
        raise ValueError(f"{name}: pass e of shape (r,), or an (adapters, r) table together with rows")
    if rows is not None and x.dim() > 0:
        check_rows(rows, e, x.shape[:-1].numel(), x.device, name)
    dropout = check_dropout(dropout, name)
    return loldu_linear_rows_checked(x, weight, bias, L, U, e, backend, rows, weight_scale, name, dropout)


def loldu_linear_rows_checked(x, weight, bias, L, U, e, backend, rows, weight_scale, name, dropout=0.0):
    """loldu_linear with rows known to be valid (a layer builds them) and dropout checked: skips check_rows'
    host sync."""
    device_type = x.device.type
    autocast_off = contextlib.nullcontext()
    dtype = _autocast_dtype(device_type)
    if dtype is not None:
        x, L, U = (t.to(dtype) for t in (x, L, U))
        weight = weight if weight_scale is not None else weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        autocast_off = torch.autocast(device_type, enabled=False)
    check_operands(x, weight, bias, L, U, e, name, weight_scale)
    # Reshapes stay outside the Function: an output that is a view made inside it could not be modified in
    # place (ReLU(inplace=True), y += residual). A 2-D input gets its output itself, not a view, as from
    # nn.Linear: FSDP2 misses an in-place op on a view and frees the weight before backward.
    operands = (x.reshape(-1, x.shape[-1]), weight, bias, L, U, e, rows, weight_scale, resolve_backend(backend, x.device))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, L, U, e))
    # dropout(x) for the rank-r path only (autograd keeps its mask for backward); none at 0: today's call
    side = (F.dropout(operands[0], dropout),) if dropout else ()
    with autocast_off:
        # Without autograd (inference, decode) the custom Function's own overhead is skipped.
        y2 = (LoLDULinearFunction.apply(*operands, *side)[0] if needs_grad
              else forward_2d(*operands, x_side=side[0] if side else None)[0])
    return y2 if x.dim() == 2 else y2.reshape(*x.shape[:-1], y2.shape[-1])


def loldu_merged_weight(weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor, e: torch.Tensor,
                        backend: str = "auto", weight_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``W + L diag(e) U`` for a 2-D weight, in weight's dtype (L's for a quantized weight), accumulated in
    float32 (float64 kept)."""
    if resolve_backend(backend, weight.device) == "triton":
        return kernels().merge(weight, L, U, e, weight_scale=weight_scale)
    return merged_weight(dense_weight(weight, weight_scale, L.dtype), L, U, e)
