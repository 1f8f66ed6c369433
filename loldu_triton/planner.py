"""Route planner: the rank-r side path, or merge W_eff = W + L diag(e) U once and run one plain GEMM.

Both routes compute the shrink (t = x U^T forward, v = dY L backward): autograd keeps t, and grad_e needs v.
What differs, in flop-equivalents with F = BYTE_FLOPS[device] * itemsize per element moved:

    side:    the epilogue adds (t*e) L^T           2*M*r*N  + F*((M + N)*r + P*M*N)
    merged:  W_eff = W + L diag(e) U, plain GEMM   2*r*K*N  + F*(2*K*N + r*(K + N)) + LAUNCH

P = 0 where the epilogue is fused into the GEMM (the Triton kernels), P = 2 where it is a separate pass that
reads and writes y (the PyTorch path). So for the kernels in bf16 "merged" wins from M ~ 2.4k rows at
K = N = r = 768 (the paper's full-rank ViT-B) and ~5.5k at K = N = 4096, r = 1024, but only from ~93k at
r = 16; for the PyTorch path on CPU, where the extra pass over y dominates, it wins roughly once M exceeds K.
"""
from __future__ import annotations

# DRAM bytes one flop costs, as flops: GPU tensor cores (A100 312 TFLOP/s / 2.0 TB/s, H200 990 / 4.8),
# a few CPU cores (~100 GFLOP/s fp32 / ~20 GB/s).
BYTE_FLOPS = {"cuda": 150.0, "cpu": 5.0}
# One more kernel launch costs a few microseconds of GPU time, however small its work.
LAUNCH_FLOPS = {"cuda": 2e9, "cpu": 0.0}
ROUTES = ("side", "merged")


def plan(M: int, K: int, N: int, r: int, itemsize: int = 2, device_type: str = "cuda",
         fused_epilogue: bool = True) -> str:
    """The cheaper route of one GEMM from K to N features over M rows with a rank-r term.

    The backward GEMM dX = dY W runs from N to K features: call plan(M, N, K, r) for it.
    """
    f = BYTE_FLOPS.get(device_type, BYTE_FLOPS["cuda"]) * itemsize
    epilogue_passes = 0.0 if fused_epilogue else 2.0
    side = 2.0 * M * r * N + f * ((M + N) * r + epilogue_passes * M * N)
    merged = 2.0 * r * K * N + f * (2.0 * K * N + r * (K + N)) + LAUNCH_FLOPS.get(device_type, 0.0)
    return "merged" if merged < side else "side"
