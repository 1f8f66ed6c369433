"""LoLDU's formulas, each written once; the torch path, the layers, merging, export and the kernels' launchers
call these (the Triton kernels compute the same products tile by tile).

    e      = s * d - s0 * d0                    the change of the diagonal since init
    W_eff  = W0 + L diag(e) U                   the merged weight
    side   = out + (a * e) B^T                  the rank-r term: (t * e) L^T forward, (v * e) U backward
             (under dropout t = dropout(x) U^T, and (v * e) U is dropout(x)'s gradient, not added to dX)
"""
from __future__ import annotations

import torch


def shrink_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of t = x U^T (and of dY^T x). float16's range is too small for it: U grows as 1/pivot (up to
    2^14), so a small pivot makes x U^T overflow even where x W^T does not, and at init inf * (e == 0) would be
    NaN."""
    return torch.float32 if dtype == torch.float16 else dtype


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums of products are taken: float32 for 16-bit types, float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def delta_diagonal(d: torch.Tensor, s: torch.Tensor, d0: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """e = s * d - s0 * d0, written as (s - s0) * d + s0 * (d - d0): exactly 0 at init (s == s0, d == d0) even
    where a compiler fuses it into an FMA, so an adapter at init leaves the base output bit for bit."""
    return (s - s0) * d + s0 * (d - d0)


def merged_weight(weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """W_eff = W + L diag(e) U for a 2-D weight, accumulated in accumulation_dtype, returned in weight's dtype."""
    acc = accumulation_dtype(weight.dtype)
    return torch.addmm(weight.to(acc), L.to(acc) * e.to(acc), U.to(acc)).to(weight.dtype)


def add_side_term(out: torch.Tensor, a: torch.Tensor, e: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """out += (a * e) b_t in place, in out's dtype: y += (t * e) L^T forward (b_t = L^T), dX += (v * e) U
    backward (b_t = U). a: (M, r), e: (r,) or one row per row of a."""
    return out.addmm_((a * e).to(out.dtype), b_t.to(out.dtype))


def side_term(a: torch.Tensor, e: torch.Tensor, b_t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(a * e) b_t as a new tensor of ``dtype``, out of place (with autograd): the rank-r term alone, where it
    is not added to another output (a quantized base's own forward: b_t = L^T; dropout(x)'s gradient
    (v * e) U: b_t = U). a: (M, r), e: (r,) or one row per row of a."""
    return (a * e).to(dtype) @ b_t.to(dtype)
