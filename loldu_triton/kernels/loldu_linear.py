"""Triton kernels of the LoLDU linear layer.

    forward:   t = x U^T,   y = x W^T + b + (t * e) L^T
    backward:  v = dY L,    grad_e = sum_rows(t * v),   dX = dY W + (v * e) U
    merge:     W_eff = W + L diag(e) U

Shapes: x (M, K), W (N, K), L (N, r), U (r, K), e (r,) float32, b (N,) or None. Every product accumulates in
fp32. The rank-r term runs as extra K-steps of the same GEMM accumulator, so L diag(e) U is never formed except
by `merge`. The planner (loldu_triton.planner.plan) picks per call between that "side" route and the "merged"
route (build W_eff, then one plain GEMM).

Each tl.dot runs in the dtype of its left operand (the activations; L for the merge); the right operand is
cast to it per tile, like autocast does, so fp16/bf16 inputs use tensor cores even with fp32 factors. fp32
dots follow torch.get_float32_matmul_precision(): "highest" gives exact IEEE fp32, anything else tf32.

Set TRITON_INTERPRET=1 before importing this module to run the kernels on CPU tensors with the Triton
interpreter; otherwise CPU tensors raise a RuntimeError.
"""

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..planner import ROUTES, plan
from ..quant import QUANTIZED_DTYPES

try:  # torch >= 2.6: ops that torch.compile traces into, kernels included
    from torch.library import triton_op, wrap_triton
except ImportError:
    triton_op = None

    def wrap_triton(kernel):
        return kernel

try:  # what triton_op itself uses in eager mode to skip the slow HOP dispatch of wrap_triton
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:

    def set_wrap_triton_enabled(enabled):
        return contextlib.nullcontext()


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"



# --------------------------------------------------------------------------------------------------------------
# Autotuning configs. Under the interpreter exactly one config: benchmarking several needs a GPU.
# --------------------------------------------------------------------------------------------------------------


def _gemm_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]

    def cfg(bm, bn, bk, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                             num_warps=warps, num_stages=stages)

    # Configs that do not fit a GPU's shared memory fail to compile and the autotuner drops them.
    return [
        # prefill: large tiles for Hopper (228 KB smem) ...
        cfg(128, 256, 64, 8, 3),
        cfg(256, 128, 64, 8, 3),
        cfg(128, 128, 64, 8, 4),
        # ... and for Ampere (164 KB)
        cfg(128, 128, 32, 4, 4),
        cfg(128, 64, 32, 4, 4),
        cfg(64, 128, 32, 4, 4),
        # decode / small M: the smallest M tile tl.dot allows, long K tiles to stream W, narrow N tiles for
        # enough programs to fill the SMs
        cfg(16, 32, 256, 4, 3),
        cfg(16, 64, 256, 4, 3),
        cfg(16, 128, 128, 4, 4),
        cfg(32, 64, 128, 4, 4),
    ]


def _shrink_configs():
    # BLOCK_M is chosen by the launcher, not tuned: the grad_e partials buffer has one row per M tile.
    if _INTERPRET:
        return [triton.Config({"BLOCK_R": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_R": br, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
        for br, bk, warps, stages in [
            (16, 256, 4, 3),
            (32, 128, 4, 4),
            (64, 128, 4, 3),
            (64, 64, 4, 4),
            (128, 64, 8, 3),
        ]
    ]


def _merge_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": br}, num_warps=warps, num_stages=stages)
        for bn, bk, br, warps, stages in [
            (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 3),
            (64, 128, 32, 4, 4),
            (128, 64, 64, 4, 3),
            (64, 64, 32, 4, 4),
        ]
    ]


def _m_bucket(M):
    """Autotuning key for M: decode (M <= 16) and the prefill sizes tune separately, without a retune per M."""
    for bucket in (16, 64, 256, 1024, 4096):
        if M <= bucket:
            return bucket
    return 16384


def _shrink_block_m(M):
    if _INTERPRET:
        return 16  # several M tiles even on small test shapes, so the partial-sum reduction is exercised
    return 16 if M <= 16 else 64


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in the dtype of a. UPCAST (bf16 under the interpreter, whose bf16 dot is wrong) uses fp32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    else:
        b = b.to(a.dtype)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.autotune(configs=_shrink_configs(), key=["M_BUCKET", "K", "R"])
@triton.jit
def _shrink_kernel(
    a_ptr, b_ptr, p_ptr, t_ptr, part_ptr,
    M, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_br, stride_pm, stride_pr, stride_tm, stride_tr,
    REDUCE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """P = A @ B (M x R). With REDUCE also part[pid_m, :] = sum over this tile's rows of T * P, from the fp32
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
        acc = _dot(a, b, acc, PREC, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = m_ok[:, None] & r_ok[None, :]
    tl.store(p_ptr + rm[:, None] * stride_pm + rr[None, :] * stride_pr, acc.to(p_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        t = tl.load(t_ptr + rm[:, None] * stride_tm + rr[None, :] * stride_tr, mask=mask, other=0.0)
        tl.store(part_ptr + pid_m * R + rr, tl.sum(t.to(tl.float32) * acc, axis=0), mask=r_ok)


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "R"])
@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, e_ptr, rows_ptr, bias_ptr, scale_ptr, c_ptr,
    M, N, K, R, M_BUCKET, stride_e,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_a2m, stride_a2r, stride_b2r, stride_b2n,
    stride_cm, stride_cn,
    LOWRANK: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_N: tl.constexpr,
    SCALE_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A @ B [+ (A2 * e) @ B2] [+ bias]. The rank-R term is R more K-steps on the same fp32 accumulator.
    With PER_ROW, row m scales by its own row of the (adapters x R) table e: e[rows[m], :].
    A quantized B (int8/fp8 values of a per-row-scaled W) is dequantized in the kernel: SCALE_N multiplies
    column n of A @ B by scale[n] in the epilogue, SCALE_K row k of each B tile by scale[k] in the K loop."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M consecutive programs share B column tiles while they are in L2.
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Wrapped row/column indices keep the main loop's loads in bounds without masks; the store is masked.
    ram = (rm % M).to(tl.int64)
    rbn = (rn % N).to(tl.int64)
    a_ptrs = a_ptr + ram[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rbn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if SCALE_K:
            sk = tl.load(scale_ptr + k0 + rk, mask=k_ok, other=0.0)
            b = (b.to(tl.float32) * sk[:, None]).to(a_ptr.dtype.element_ty)
        acc = _dot(a, b, acc, PREC, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if SCALE_N:
        acc = acc * tl.load(scale_ptr + rbn)[None, :]

    if LOWRANK:
        a2_ptrs = a2_ptr + ram[:, None] * stride_a2m + rk[None, :] * stride_a2r
        b2_ptrs = b2_ptr + rk[:, None] * stride_b2r + rbn[None, :] * stride_b2n
        if PER_ROW:
            e_rows = e_ptr + tl.load(rows_ptr + ram)[:, None] * stride_e
        for r0 in range(0, R, BLOCK_K):
            r_ok = rk < R - r0
            a2 = tl.load(a2_ptrs, mask=r_ok[None, :], other=0.0)
            if PER_ROW:
                ev = tl.load(e_rows + (r0 + rk)[None, :], mask=r_ok[None, :], other=0.0)
                a2 = (a2.to(tl.float32) * ev).to(a_ptr.dtype.element_ty)
            else:
                ev = tl.load(e_ptr + r0 + rk, mask=r_ok, other=0.0)
                a2 = (a2.to(tl.float32) * ev[None, :]).to(a_ptr.dtype.element_ty)
            b2 = tl.load(b2_ptrs, mask=r_ok[:, None], other=0.0)
            acc = _dot(a2, b2, acc, PREC, UPCAST)
            a2_ptrs += BLOCK_K * stride_a2r
            b2_ptrs += BLOCK_K * stride_b2r

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :].to(tl.int64) * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.autotune(configs=_merge_configs(), key=["N", "K", "R"])
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
        acc = _dot(lt, ut, acc, PREC, UPCAST)
        l_ptrs += BLOCK_R * stride_lr
        u_ptrs += BLOCK_R * stride_ur
    mask = n_ok[:, None] & k_ok[None, :]
    w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=mask, other=0.0).to(tl.float32)
    if SCALED:  # quantized W: dequantize its row n
        w = w * tl.load(scale_ptr + rn, mask=n_ok, other=0.0)[:, None]
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :] * stride_ok, (w + acc).to(out_ptr.dtype.element_ty),
             mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Launchers. Kernels go through wrap_triton so that torch.compile sees them inside the registered ops.
# --------------------------------------------------------------------------------------------------------------


def _precision(dtype):
    # Same rule as torch.matmul: fp32 is exact unless the user allowed tf32; half types ignore it.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _upcast(dtype):
    return _INTERPRET and dtype == torch.bfloat16


def _shrink(a, b, stride_bk, stride_br, p, t=None):
    """p = a @ B with B[k, j] at b + k*stride_bk + j*stride_br. With t, returns grad sum_rows(t * p) in fp32."""
    M, K = a.shape
    R = p.shape[1]
    block_m = _shrink_block_m(M)
    num_m = triton.cdiv(M, block_m)
    reduce = t is not None
    # Every program writes its (M tile, R tile) block of partials, so no zero fill; unused pointers get `a`.
    part = torch.empty((num_m, R), device=a.device, dtype=torch.float32) if reduce else a
    t_arg = t if reduce else a
    wrap_triton(_shrink_kernel)[lambda meta: (num_m, triton.cdiv(R, meta["BLOCK_R"]))](
        a, b, p, t_arg, part,
        M, K, R, _m_bucket(M),
        a.stride(0), a.stride(1), stride_bk, stride_br, p.stride(0), p.stride(1), t_arg.stride(0), t_arg.stride(1),
        REDUCE=reduce, PREC=_precision(a.dtype), UPCAST=_upcast(a.dtype), BLOCK_M=block_m,
    )
    # One fp32 row per M tile, summed by torch: deterministic, no atomics.
    return part.sum(0) if reduce else None


def _gemm(a, b, stride_bk, stride_bn, c, lowrank=None, bias=None, rows=None, scale=None, scale_axis="n"):
    """c = a @ B [+ (a2 * e) @ B2] [+ bias], B[k, n] at b + k*stride_bk + n*stride_bn.

    lowrank = (a2, e, b2, stride_b2r, stride_b2n) with a2 (M, R); with rows (M,) int64, e is an (A, R) table
    and row m uses e[rows[m]]. scale: B holds quantized values, dequantized by scale along scale_axis."""
    M, K = a.shape
    N = c.shape[1]
    if lowrank is None:
        a2, e, b2, stride_b2r, stride_b2n = a, a, b, 0, 0  # never read: LOWRANK is off
        R = 0
    else:
        a2, e, b2, stride_b2r, stride_b2n = lowrank
        R = a2.shape[1]
    wrap_triton(_gemm_kernel)[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](
        a, b, a2, b2, e, rows if rows is not None else a, bias if bias is not None else a,
        scale if scale is not None else a, c,
        M, N, K, R, _m_bucket(M), e.stride(0) if rows is not None else 0,
        a.stride(0), a.stride(1), stride_bk, stride_bn,
        a2.stride(0), a2.stride(1), stride_b2r, stride_b2n,
        c.stride(0), c.stride(1),
        LOWRANK=lowrank is not None, PER_ROW=rows is not None, HAS_BIAS=bias is not None,
        SCALE_N=scale is not None and scale_axis == "n", SCALE_K=scale is not None and scale_axis == "k",
        PREC=_precision(a.dtype), UPCAST=_upcast(a.dtype),
    )


def _merge_into(weight, L, U, e, out, scale=None):
    N, K = weight.shape
    R = L.shape[1]
    wrap_triton(_merge_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]))](
        weight, L, U, e, scale if scale is not None else e, out,
        N, K, R,
        weight.stride(0), weight.stride(1), L.stride(0), L.stride(1), U.stride(0), U.stride(1),
        out.stride(0), out.stride(1),
        SCALED=scale is not None, PREC=_precision(L.dtype), UPCAST=_upcast(L.dtype),
    )
    return out


def _merged_weight(weight, L, U, e, scale):
    """W_eff in the compute dtype: the weight's, or the factors' for a quantized weight."""
    out = torch.empty(weight.shape, device=weight.device, dtype=L.dtype if scale is not None else weight.dtype)
    return _merge_into(weight, L, U, e, out, scale)


def _forward_into(x, weight, bias, L, U, e, route, y, scale=None):
    M, K = x.shape
    t = torch.empty((M, L.shape[1]), device=x.device, dtype=x.dtype)
    if M == 0:
        return t
    _shrink(x, U, U.stride(1), U.stride(0), t)
    if route == "side":
        _gemm(x, weight, weight.stride(1), weight.stride(0), y, (t, e, L, L.stride(1), L.stride(0)), bias,
              scale=scale, scale_axis="n")
    else:
        w_eff = _merged_weight(weight, L, U, e, scale)
        _gemm(x, w_eff, w_eff.stride(1), w_eff.stride(0), y, bias=bias)
    return t


def _backward_into(dy, t, weight, L, U, e, route, dx, scale=None):
    M = dy.shape[0]
    if M == 0:
        return torch.zeros_like(e)
    v = torch.empty((M, L.shape[1]), device=dy.device, dtype=dy.dtype)
    grad_e = _shrink(dy, L, L.stride(0), L.stride(1), v, t)
    if route == "side":
        _gemm(dy, weight, weight.stride(0), weight.stride(1), dx, (v, e, U, U.stride(0), U.stride(1)),
              scale=scale, scale_axis="k")
    else:
        w_eff = _merged_weight(weight, L, U, e, scale)
        _gemm(dy, w_eff, w_eff.stride(0), w_eff.stride(1), dx)
    return grad_e


# --------------------------------------------------------------------------------------------------------------
# Registered ops: torch.compile(fullgraph=True) traces them without a graph break. On GPU they are triton_ops,
# which torch.compile decomposes into the kernels themselves. Under the interpreter wrap_triton hands back the
# raw kernel, which cannot run on fake tensors, so there they are opaque custom ops.
# --------------------------------------------------------------------------------------------------------------


def _fwd_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], L: torch.Tensor,
              U: torch.Tensor, e: torch.Tensor, route: str,
              scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    t = _forward_into(x, weight, bias, L, U, e, route, y, scale)
    return y, t


def _fwd_fake(x, weight, bias, L, U, e, route, scale=None):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], L.shape[1]))


def _bwd_impl(dy: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor,
              e: torch.Tensor, route: str, scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    dx = torch.empty((dy.shape[0], weight.shape[1]), device=dy.device, dtype=dy.dtype)
    grad_e = _backward_into(dy, t, weight, L, U, e, route, dx, scale)
    return dx, grad_e


def _bwd_fake(dy, t, weight, L, U, e, route, scale=None):
    return dy.new_empty((dy.shape[0], weight.shape[1])), e.new_empty(e.shape)


def _merge_impl(weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor, e: torch.Tensor,
                scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _merged_weight(weight, L, U, e, scale)


def _merge_fake(weight, L, U, e, scale=None):
    return torch.empty_like(weight, dtype=L.dtype if scale is not None else weight.dtype)


def _register(name, impl, fake):
    make = triton_op if triton_op is not None and not _INTERPRET else torch.library.custom_op
    op = make(name, impl, mutates_args=())
    op.register_fake(fake)
    return op


_fwd_op = _register("loldu_triton::fwd", _fwd_impl, _fwd_fake)
_bwd_op = _register("loldu_triton::bwd", _bwd_impl, _bwd_fake)
_merge_op = _register("loldu_triton::merge", _merge_impl, _merge_fake)


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------


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


def _check_operands(x, weight, bias, L, U, e, scale=None):
    """Validate the shared operands of forward/backward; returns (K, N, r) of the layer."""
    _check_device(x, weight, L, U, e, *([] if bias is None else [bias]), *([] if scale is None else [scale]))
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"activations must be float32, float16 or bfloat16, got {x.dtype}")
    for name, p in (("weight", None if scale is not None else weight), ("L", L), ("U", U), ("bias", bias)):
        if p is not None and p.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must be {x.dtype} or float32, got {p.dtype}")
    if scale is not None and (weight.dtype not in QUANTIZED_DTYPES or scale.dtype != torch.float32
                              or scale.shape != weight.shape[:1]):
        raise TypeError(f"a quantized weight is int8 or float8_e4m3fn with a float32 scale per row; got "
                        f"{weight.dtype} {tuple(weight.shape)} and scale {scale.dtype} {tuple(scale.shape)}")
    if e.dtype != torch.float32:
        raise TypeError(f"e must be float32, got {e.dtype}")
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
            U: torch.Tensor, e: torch.Tensor, *, route: Optional[str] = None,
            y_out: Optional[torch.Tensor] = None,
            weight_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T + b + ((x U^T) * e) L^T and t = x U^T, both in x.dtype. x (M, K) may have any strides.

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
        return _fwd_op(x, weight, bias, L, U, e, route, scale)
    _check_out(y_out, (M, N), x.dtype, "y_out")
    _check_device(x, y_out)
    with set_wrap_triton_enabled(False):
        t = _forward_into(x, weight, bias, L, U, e, route, y_out, scale)
    return y_out, t


def backward(dy: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor,
             e: torch.Tensor, *, route: Optional[str] = None,
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
        return _bwd_op(dy, t, weight, L, U, e, route, scale)
    _check_out(dx_out, (M, K), dy.dtype, "dx_out")
    _check_device(dy, dx_out)
    with set_wrap_triton_enabled(False):
        grad_e = _backward_into(dy, t, weight, L, U, e, route, dx_out, scale)
    return dx_out, grad_e


def merge(weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor, e: torch.Tensor, *,
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
        return _merge_op(weight, L, U, e, scale)
    _check_out(out, tuple(weight.shape), dtype, "out")
    _check_device(weight, out)
    with set_wrap_triton_enabled(False):
        return _merge_into(weight, L, U, e, out, scale)


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
    K, N, r = _check_operands(x, weight, bias, L, U, e[0], weight_scale)
    _check_rows(x, e, rows)
    y = torch.empty((x.shape[0], N), device=x.device, dtype=x.dtype)
    t = torch.empty((x.shape[0], r), device=x.device, dtype=x.dtype)
    if x.shape[0]:
        with set_wrap_triton_enabled(False):
            _shrink(x, U, U.stride(1), U.stride(0), t)
            _gemm(x, weight, weight.stride(1), weight.stride(0), y, (t, e.contiguous(), L, L.stride(1), L.stride(0)),
                  _vec(bias), rows=rows.contiguous(), scale=_vec(weight_scale), scale_axis="n")
    return y, t


def backward_rows(dy, t, weight, L, U, e, rows, weight_scale=None):
    """backward() with a per-row adapter: dx = dY W + ((dY L) * e[rows]) U, and the (A, r) float32 gradient of
    the table (row a sums t * v over the rows that use adapter a)."""
    K, N, r = _check_operands(dy, weight, None, L, U, e[0], weight_scale)
    _check_rows(dy, e, rows)
    dx = torch.empty((dy.shape[0], K), device=dy.device, dtype=dy.dtype)
    v = torch.empty((dy.shape[0], r), device=dy.device, dtype=dy.dtype)
    grad_e = torch.zeros_like(e)
    if dy.shape[0]:
        with set_wrap_triton_enabled(False):
            _shrink(dy, L, L.stride(0), L.stride(1), v)
            _gemm(dy, weight, weight.stride(0), weight.stride(1), dx, (v, e.contiguous(), U, U.stride(0),
                  U.stride(1)), rows=rows.contiguous(), scale=_vec(weight_scale), scale_axis="k")
        grad_e.index_add_(0, rows, t.float() * v.float())
    return dx, grad_e
