"""The GEMM with the rank-r epilogue, and its launcher.

    C = A @ B [+ (A2 * e) @ B2] [+ bias]

The rank-R term runs as extra K-steps on the same fp32 accumulator, padded to a multiple of 16 (not to
BLOCK_K). In the backward the same launch also sums the shrink's per-M-tile partials of grad_e, so that
reduction costs no launch of its own.
"""

import triton
import triton.language as tl

from . import configs
from .common import dot, launch, precision, upcast


@triton.jit
def _rank_tile(a2_ptr, b2_ptr, e_ptr, e_rows, ram, rbn, r0, R,
               stride_a2m, stride_a2r, stride_b2r, stride_b2n,
               PER_ROW: tl.constexpr, R_STEP: tl.constexpr):
    """One K-step of the rank term: (A2 * e) in fp32 for rows ram and ranks r0..r0+R_STEP, and B2's tile."""
    rr = r0 + tl.arange(0, R_STEP)
    r_ok = rr < R
    a2 = tl.load(a2_ptr + ram[:, None] * stride_a2m + rr[None, :] * stride_a2r, mask=r_ok[None, :], other=0.0)
    if PER_ROW:
        ev = tl.load(e_rows + rr[None, :], mask=r_ok[None, :], other=0.0)
    else:
        ev = tl.load(e_ptr + rr[None, :], mask=r_ok[None, :], other=0.0)
    b2 = tl.load(b2_ptr + rr[:, None] * stride_b2r + rbn[None, :] * stride_b2n, mask=r_ok[:, None], other=0.0)
    return a2.to(tl.float32) * ev, b2


@triton.jit
def _sum_partials(part_ptr, ge_ptr, num_parts, R, pid, num_programs, RB: tl.constexpr, PB: tl.constexpr):
    """ge[c] = sum over rows p of part[p, c], columns dealt out over the programs; a fixed order, no atomics."""
    for c0 in range(pid * RB, R, num_programs * RB):
        cols = c0 + tl.arange(0, RB)
        c_ok = cols < R
        acc = tl.zeros((RB,), dtype=tl.float32)
        for p0 in range(0, num_parts, PB):
            rows = p0 + tl.arange(0, PB)
            part = tl.load(part_ptr + rows[:, None] * R + cols[None, :],
                           mask=(rows < num_parts)[:, None] & c_ok[None, :], other=0.0)
            acc += tl.sum(part, axis=0)
        tl.store(ge_ptr + cols, acc, mask=c_ok)


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, e_ptr, rows_ptr, bias_ptr, scale_ptr, c_ptr,
    part_ptr, ge_ptr,
    M, N, K, R, M_BUCKET, stride_e, num_parts,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_a2m, stride_a2r, stride_b2r, stride_b2n,
    stride_cm, stride_cn,
    LOWRANK: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, REDUCE_E: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, R_STEP: tl.constexpr, R_PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A @ B [+ (A2 * e) @ B2] [+ bias]; with REDUCE_E also ge = sum of the rows of part (num_parts x R).

    PER_ROW: row m scales by its own row of the (adapters x R) table e: e[rows[m], :]. A quantized B (int8/fp8
    values of a per-row-scaled W) is dequantized here: SCALE_N multiplies column n of A @ B by scale[n] in the epilogue, SCALE_K row k of each B tile by scale[k].
    R_PREFETCH: the whole rank term is one R_STEP, loaded before the main loop so that its latency hides there."""
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
    # Wrapped row/column indices keep the loads in bounds without masks; the store is masked.
    ram = (rm % M).to(tl.int64)
    rbn = (rn % N).to(tl.int64)
    e_rows = e_ptr
    if PER_ROW:
        e_rows = e_ptr + tl.load(rows_ptr + ram)[:, None] * stride_e
    RS: tl.constexpr = R_STEP if R_STEP < BLOCK_K else BLOCK_K  # rank steps no longer than the main loop's
    if LOWRANK and R_PREFETCH:
        a2f, b2 = _rank_tile(a2_ptr, b2_ptr, e_ptr, e_rows, ram, rbn, 0, R,
                             stride_a2m, stride_a2r, stride_b2r, stride_b2n, PER_ROW, RS)
        a2 = a2f.to(a_ptr.dtype.element_ty)

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
        acc = dot(a, b, acc, PREC, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if SCALE_N:
        acc = acc * tl.load(scale_ptr + rbn)[None, :]

    if LOWRANK:
        if R_PREFETCH:
            acc = dot(a2, b2, acc, PREC, UPCAST)
        else:
            for r0 in range(0, R, RS):
                a2f, b2 = _rank_tile(a2_ptr, b2_ptr, e_ptr, e_rows, ram, rbn, r0, R,
                                     stride_a2m, stride_a2r, stride_b2r, stride_b2n, PER_ROW, RS)
                acc = dot(a2f.to(a_ptr.dtype.element_ty), b2, acc, PREC, UPCAST)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :].to(tl.int64) * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])
    if REDUCE_E:
        _sum_partials(part_ptr, ge_ptr, num_parts, R, pid, tl.num_programs(0), 32, 32)


# The backward's dX GEMM (no bias, W read transposed) is tuned apart from the forward's: two autotuners over
# one kernel, each with its own cache, so a K == N layer never reuses a forward config untuned.
_KEY = ["M_BUCKET", "N", "K", "R", "LOWRANK"]
gemm_fwd = configs.autotuned(_gemm_kernel, configs.gemm_configs(), _KEY, configs.prune_gemm)
gemm_bwd = configs.autotuned(_gemm_kernel, configs.gemm_configs(), _KEY, configs.prune_gemm)


def rank_step(R):
    """(R_STEP, R_PREFETCH): rank K-steps of 16, 32 or 64 that pad R to a multiple of 16 and no further; a rank
    term of one step of at most 32 is prefetched before the main loop."""
    r16 = max(16, triton.cdiv(R, 16) * 16)
    step = min(64, r16 & -r16)  # the largest power of two dividing r16
    return step, r16 <= 32


def gemm(a, b, stride_bk, stride_bn, c, lowrank=None, bias=None, rows=None, scale=None, backward=False,
         grad_e=None):
    """c = a @ B [+ (a2 * e) @ B2] [+ bias], B[k, n] at b + k*stride_bk + n*stride_bn.

    lowrank = (a2, e, b2, stride_b2r, stride_b2n) with a2 (M, R); e a float32 (R,) tensor; with
    rows (M,) int64, e is an (A, R) table and row m uses e[rows[m]]. scale: B holds quantized values,
    dequantized by scale along N in the forward and along K in the backward. grad_e = (part, out): also sums the
    rows of part (P, R) into out (R,). backward: dX = dY W (tuned apart from the forward's GEMM)."""
    M, K = a.shape
    N = c.shape[1]
    if lowrank is None:
        a2, e, b2, stride_b2r, stride_b2n = a, a, b, 0, 0  # never read: LOWRANK is off
        R = grad_e[0].shape[1] if grad_e is not None else 0
    else:
        a2, e, b2, stride_b2r, stride_b2n = lowrank
        R = a2.shape[1]
    part, ge = grad_e if grad_e is not None else (a, a)
    r_step, r_prefetch = rank_step(R if lowrank is not None else 0)
    kernel = gemm_bwd if backward else gemm_fwd
    launch(kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
           a, b, a2, b2, e, rows if rows is not None else a, bias if bias is not None else a,
           scale if scale is not None else a, c, part, ge,
           M, N, K, R, configs.m_bucket(M), e.stride(0) if rows is not None else 0, part.shape[0],
           a.stride(0), a.stride(1), stride_bk, stride_bn,
           a2.stride(0), a2.stride(1), stride_b2r, stride_b2n,
           c.stride(0), c.stride(1),
           LOWRANK=lowrank is not None, PER_ROW=rows is not None, HAS_BIAS=bias is not None,
           SCALE_N=scale is not None and not backward, SCALE_K=scale is not None and backward,
           REDUCE_E=grad_e is not None, PREC=precision(a.dtype), UPCAST=upcast(a.dtype),
           R_STEP=r_step, R_PREFETCH=r_prefetch)

