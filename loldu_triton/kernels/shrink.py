"""The shrink P = A @ B (M x R): t = x U^T in the forward, v = dY L in the backward, where it also writes the
per-M-tile partial sums of t * v that the backward GEMM adds up into grad_e."""

import torch
import triton
import triton.language as tl

from . import configs
from .common import dot, launch, precision, upcast


@triton.jit
def _shrink_kernel(
    a_ptr, b_ptr, p_ptr, t_ptr, part_ptr,
    M, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_br, stride_pm, stride_pr, stride_tm, stride_tr,
    REDUCE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """P = A @ B. With REDUCE also part[pid_m, :] = sum over this tile's rows of T * P, from the fp32
    accumulator, so the backward gets grad_e without reading v back."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    r_ok = rr < R
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rr[None, :] * stride_br
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = dot(a, b, acc, PREC, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = m_ok[:, None] & r_ok[None, :]
    tl.store(p_ptr + rm[:, None] * stride_pm + rr[None, :] * stride_pr, acc.to(p_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        t = tl.load(t_ptr + rm[:, None] * stride_tm + rr[None, :] * stride_tr, mask=mask, other=0.0)
        tl.store(part_ptr + pid_m * R + rr, tl.sum(t.to(tl.float32) * acc, axis=0), mask=r_ok)


shrink_kernel = configs.autotuned(_shrink_kernel, configs.shrink_configs(), ["M_BUCKET", "K", "R", "REDUCE"],
                                 configs.prune_shrink)


def shrink(a, b, stride_bk, stride_br, p, t=None):
    """p = a @ B with B[k, j] at b + k*stride_bk + j*stride_br. With t, returns the (M tiles, R) float32
    partial sums of t * p, one row per M tile, for gemm(..., grad_e=(part, out)) to add up."""
    M, K = a.shape
    R = p.shape[1]
    block_m = configs.shrink_block_m(M)
    num_m = triton.cdiv(M, block_m)
    reduce = t is not None
    # Every program writes its (M tile, R tile) block of partials, so no zero fill; unused pointers get `a`.
    part = torch.empty((num_m, R), device=a.device, dtype=torch.float32) if reduce else a
    t_arg = t if reduce else a
    launch(shrink_kernel, lambda meta: (num_m, triton.cdiv(R, meta["BLOCK_R"])),
           a, b, p, t_arg, part,
           M, K, R, configs.m_bucket(M),
           a.stride(0), a.stride(1), stride_bk, stride_br, p.stride(0), p.stride(1), t_arg.stride(0),
           t_arg.stride(1),
           REDUCE=reduce, PREC=precision(a.dtype), UPCAST=upcast(a.dtype), BLOCK_M=block_m)
    return part if reduce else None
