"""The merge W_eff = W + L diag(e) U and its launcher."""

import torch
import triton
import triton.language as tl

from . import configs
from .common import dot, launch, precision, upcast


@triton.jit
def _merge_kernel(
    w_ptr, l_ptr, u_ptr, e_ptr, scale_ptr, out_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ln, stride_lr, stride_ur, stride_uk, stride_on, stride_ok,
    SCALED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """OUT = W + (L * e) @ U, one (BLOCK_N, BLOCK_K) tile per program, the rank-R sum in fp32."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    n_ok = rn < N
    k_ok = rk < K
    l_ptrs = l_ptr + rn[:, None] * stride_ln + rr[None, :] * stride_lr
    u_ptrs = u_ptr + rr[:, None] * stride_ur + rk[None, :] * stride_uk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = rr < R - r0
        lt = tl.load(l_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        ev = tl.load(e_ptr + r0 + rr, mask=r_ok, other=0.0)
        lt = (lt.to(tl.float32) * ev[None, :]).to(l_ptr.dtype.element_ty)
        ut = tl.load(u_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc = dot(lt, ut, acc, PREC, UPCAST)
        l_ptrs += BLOCK_R * stride_lr
        u_ptrs += BLOCK_R * stride_ur
    mask = n_ok[:, None] & k_ok[None, :]
    w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=mask, other=0.0).to(tl.float32)
    if SCALED:  # quantized W: dequantize its row n
        w = w * tl.load(scale_ptr + rn, mask=n_ok, other=0.0)[:, None]
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :] * stride_ok, (w + acc).to(out_ptr.dtype.element_ty),
             mask=mask)


merge_kernel = configs.autotuned(_merge_kernel, configs.merge_configs(), ["N", "K", "R"], configs.prune_merge)


def merge_into(weight, L, U, e, out, scale=None):
    """out = weight [* scale per row] + L diag(e) U; e a float32 (r,) tensor."""
    N, K = weight.shape
    R = L.shape[1]
    launch(merge_kernel, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"])),
           weight, L, U, e, scale if scale is not None else e, out,
           N, K, R,
           weight.stride(0), weight.stride(1), L.stride(0), L.stride(1), U.stride(0), U.stride(1),
           out.stride(0), out.stride(1),
           SCALED=scale is not None, PREC=precision(L.dtype), UPCAST=upcast(L.dtype))
    return out


def merged_weight(weight, L, U, e, scale):
    """W_eff in the compute dtype: the weight's, or the factors' for a quantized weight."""
    out = torch.empty(weight.shape, device=weight.device, dtype=L.dtype if scale is not None else weight.dtype)
    return merge_into(weight, L, U, e, out, scale)
