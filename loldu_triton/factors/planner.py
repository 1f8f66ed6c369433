"""Route planner: how one call of the layer runs, chosen by a cost model in flop-equivalents.

Per GEMM (``plan``): the rank-r side path, or merge W_eff = W + L diag(e) U once and run one plain GEMM.
Both routes compute the shrink (t = x U^T forward, v = dY L backward) where grad_e needs it. What differs, with
F = BYTE_FLOPS[device] * itemsize per element moved:

    side:    the epilogue adds (t*e) L^T           2*M*r*N  + F*((M + N)*r + P*M*N)
    merged:  W_eff = W + L diag(e) U, plain GEMM   2*r*K*N  + F*(2*K*N + r*(K + N)) + LAUNCH

P = 0 where the epilogue is fused into the GEMM (the Triton kernels), P = 2 where it is a separate pass that
reads and writes y (the PyTorch path). So for the kernels in bf16 "merged" wins from M ~ 2.4k rows at
K = N = r = 768 (the paper's full-rank ViT-B) and ~5.5k at K = N = 4096, r = 1024, but only from ~93k at
r = 16; for the PyTorch path on CPU, where the extra pass over y dominates, it wins roughly once M exceeds K.

Per training step (``plan_step``), three more choices:

- grad_e: "shrink" keeps t = x U^T (M x r) and forms sum_rows(t * dY L): two M x r GEMMs, one in each pass.
  "outer" keeps x instead and forms diag(L^T (dY^T x) U^T): one N x K GEMM over the M rows plus an r x N x K
  product, cheaper once r is a large fraction of K and N (M = 2048, K = N = 1024: from r ~ 680).
- keep W_eff: where forward and backward both merge, backward reuses forward's W_eff instead of building it
  again (saves 2*r*K*N flops and a pass over W). It costs an out x in tensor per layer held until backward, so
  it is kept only where that is no larger than x (N <= M), which LoRA keeps for backward as well, and where the
  merge it saves is at least 1/32 of the two GEMMs (r >= M/16 for square layers): below that the time saved is
  under this CPU's noise and the memory is not.

On the CPU these picks were measured (benchmarks/planner_cpu.py, benchmarks/results/2026-11-29-cpu-planner.md):
BYTE_FLOPS["cpu"] from 0.5 to 50 changes no GEMM route (both make one pass over a matrix, y or W) and no grad_e
route (set by flops), only whether W_eff is kept at low rank, within the noise; the planner's StepPlan was the
fastest at r = 256 to full and within 7% of it at r = 16 and 64.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

# DRAM bytes one flop costs, as flops: GPU tensor cores (A100 312 TFLOP/s / 2.0 TB/s, H200 990 / 4.8),
# a few CPU cores (~100 GFLOP/s fp32 / ~20 GB/s).
BYTE_FLOPS = {"cuda": 150.0, "cpu": 5.0}
# One more kernel launch costs a few microseconds of GPU time, however small its work. On the CPU both routes
# run the same number of ops, so their per-op costs cancel.
LAUNCH_FLOPS = {"cuda": 2e9, "cpu": 0.0}
ROUTES = ("side", "merged")
GRAD_E_ROUTES = ("shrink", "outer")


class StepPlan(NamedTuple):
    forward: str  # "side" or "merged": the GEMM y = x W_eff^T + b
    backward: Optional[str]  # the same for dX = dY W_eff ("base" under dropout); None where no dX is wanted
    grad_e: Optional[str]  # "shrink" or "outer"; None where no grad_e is wanted
    keep_merged: bool  # forward's W_eff is kept for backward


# Many adapters in one batch (a per-row e): the side path, the only one that gathers e per row.
SIDE_STEP = StepPlan("side", "side", "shrink", False)
# Dropout on the adapter's input: the rank-r path reads dropout(x), the base GEMM x, so no merged route
# (W_eff would apply the delta to x itself) and no outer grad_e (it needs dropout(x) kept). "base": dX = dY W
# alone; the rank-r term's gradient (v * e) U goes to dropout(x), whose backward applies the mask.
DROPOUT_STEP = StepPlan("side", "base", "shrink", False)


def _constants(itemsize: int, device_type: str, fused_epilogue: bool):
    f = BYTE_FLOPS.get(device_type, BYTE_FLOPS["cuda"]) * itemsize
    return f, (0.0 if fused_epilogue else 2.0), LAUNCH_FLOPS.get(device_type, LAUNCH_FLOPS["cuda"])


def plan(M: int, K: int, N: int, r: int, itemsize: int = 2, device_type: str = "cuda",
         fused_epilogue: bool = True) -> str:
    """The cheaper route of one GEMM from K to N features over M rows with a rank-r term.

    The backward GEMM dX = dY W runs from N to K features: call plan(M, N, K, r) for it.
    """
    # Called on every training call with few distinct shapes: cached, but not under torch.compile, which would
    # trace through the cache wrapper (dynamo warns about lru_cache).
    return (_plan if torch.compiler.is_compiling() else _plan_cached)(M, K, N, r, itemsize, device_type,
                                                                      fused_epilogue)


def _plan(M: int, K: int, N: int, r: int, itemsize: int = 2, device_type: str = "cuda",
          fused_epilogue: bool = True) -> str:
    f, passes, launch = _constants(itemsize, device_type, fused_epilogue)
    side = 2.0 * M * r * N + f * ((M + N) * r + passes * M * N)
    merged = 2.0 * r * K * N + f * (2.0 * K * N + r * (K + N)) + launch
    return "merged" if merged < side else "side"


def side_rows(K: int, N: int, r: int, itemsize: int = 2, device_type: str = "cuda",
              fused_epilogue: bool = True) -> int:
    """The most rows for which plan() picks the side route (its costs are linear in M: one crossover)."""
    lo, hi = 0, 1
    while hi < 2**62 and _plan(hi, K, N, r, itemsize, device_type, fused_epilogue) == "side":
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _plan(mid, K, N, r, itemsize, device_type, fused_epilogue) == "side" else (lo, mid)
    return lo


def plan_step(M: int, K: int, N: int, r: int, itemsize: int = 2, device_type: str = "cuda",
              fused_epilogue: bool = True, need_dx: bool = True, need_grad_e: bool = True) -> StepPlan:
    """The cheapest StepPlan of a forward and backward over M rows (x: M x K, W: N x K, rank r)."""
    return (_plan_step if torch.compiler.is_compiling() else _plan_step_cached)(
        M, K, N, r, itemsize, device_type, fused_epilogue, need_dx, need_grad_e)


def _plan_step(M, K, N, r, itemsize, device_type, fused_epilogue, need_dx, need_grad_e) -> StepPlan:
    f, passes, launch = _constants(itemsize, device_type, fused_epilogue)

    def gemm(m, k, n):
        return 2.0 * m * k * n + f * (m * k + k * n + m * n)

    def shrink(m, k):  # m x k times k x r: t = x U^T or v = dY L
        return 2.0 * m * k * r + f * (m * k + r * k + m * r)

    def epilogue(m, n):  # the rank-r term added to an m x n output
        return 2.0 * m * r * n + f * ((m + n) * r + passes * m * n)

    merge = 2.0 * r * K * N + f * (2.0 * K * N + r * (K + N)) + launch
    outer = 2.0 * M * N * K + 2.0 * r * N * K + f * (M * N + M * K + 2.0 * N * K + 2.0 * r * K)

    best, best_cost = None, float("inf")
    for fwd in ROUTES:
        for bwd in (ROUTES if need_dx else (None,)):
            for grad_e in (GRAD_E_ROUTES if need_grad_e else (None,)):
                keep = fwd == bwd == "merged" and N <= M and 32.0 * merge >= gemm(M, K, N) + gemm(M, N, K)
                cost = gemm(M, K, N) + (shrink(M, K) + epilogue(M, N) if fwd == "side" else merge)
                if fwd == "merged" and grad_e == "shrink":
                    cost += shrink(M, K)  # t, which the side route computes anyway
                if bwd == "side" or grad_e == "shrink":
                    cost += shrink(M, N)  # v = dY L
                if bwd is not None:
                    cost += gemm(M, N, K) + (epilogue(M, K) if bwd == "side" else 0.0 if keep else merge)
                if grad_e == "outer":
                    cost += outer
                if cost < best_cost:  # ties keep the earlier plan: side and shrink keep less memory
                    best, best_cost = StepPlan(fwd, bwd, grad_e, keep), cost
    return best


_plan_cached = functools.lru_cache(maxsize=4096)(_plan)
_plan_step_cached = functools.lru_cache(maxsize=4096)(_plan_step)
