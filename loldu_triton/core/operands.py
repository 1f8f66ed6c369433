"""The checks of the tensors one LoLDU call takes, run once per public call (functional API, kernels' entry
points): shapes, devices and dtypes that fit one another, named in the caller's words."""
from __future__ import annotations

import torch

from .settings import QUANTIZED_DTYPES


def check_operands(x, weight, bias, L, U, e, name: str = "loldu_linear", weight_scale=None,
                   same_dtype: bool = True) -> None:
    """x (..., in) against weight (out, in), bias (out,), L (out, r), U (r, in), e (r,) or an (adapters, r)
    table, and a quantized weight's per-row scale. ``same_dtype``: x's dtype must be the weight's (L's for a
    quantized weight), as in the layers; the kernels' own entry points take fp32 weights and factors under
    16-bit activations too, and check their dtypes themselves."""
    out_f, in_f = weight.shape
    if x.dim() == 0:
        raise ValueError(f"{name}: input is a 0-d tensor; a linear layer needs at least one dim of {in_f} features")
    if x.device != weight.device:
        raise ValueError(f"{name}: input is on {x.device}, the layer's weight on {weight.device}")
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
        if same_dtype and x.dtype != L.dtype:
            raise ValueError(f"{name}: input dtype {x.dtype} differs from the layer's compute dtype {L.dtype}")
    elif same_dtype and x.dtype != weight.dtype:
        raise ValueError(f"{name}: input dtype {x.dtype} differs from weight dtype {weight.dtype}")


def check_rows(rows, e: torch.Tensor, m: int, device: torch.device, name: str) -> None:
    """rows must pick a row of the (adapters, r) table e for each of the m input rows; out-of-range indices
    would read other memory in a kernel. (Costs a host sync on GPU: layers build their rows themselves.)"""
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.shape != (m,):
        got = f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"{name}: rows must be an int64 tensor of shape ({m},), one per input row; got {got}")
    if rows.device != device:
        raise ValueError(f"{name}: rows is on {rows.device}, the input on {device}")
    if m and (int(rows.min()) < 0 or int(rows.max()) >= e.shape[0]):
        raise ValueError(f"{name}: rows must be in [0, {e.shape[0]}) (the table has {e.shape[0]} adapters); "
                         f"got values in [{int(rows.min())}, {int(rows.max())}]")
