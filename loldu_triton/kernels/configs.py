"""Autotuning spaces of every kernel, per device and dtype, in one place.

Each kernel is autotuned over one list that holds tiles for 2-byte activations and tiles of their own for
fp32; early_config_prune keeps, before anything is compiled or timed, the configs for this call's dtype and
M, and only those whose shared memory fits the device the kernel runs on (estimated below; compile-check
proves the estimate against the compiled kernels for sm_90 and sm_80). Under the interpreter each kernel has
exactly one config: benchmarking several needs a GPU.
"""

import contextlib
import functools

import triton

from .common import INTERPRET

# Shared memory per block (opt-in maximum), bytes, by compute capability.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
_target = None  # (arch, smem limit) that compile-check compiles for, instead of the current device's


@contextlib.contextmanager
def target(arch):
    """Prune for compute capability `arch` (e.g. 90) instead of the current CUDA device."""
    global _target
    previous, _target = _target, (arch, SMEM_LIMIT[arch])
    try:
        yield
    finally:
        _target = previous


@functools.lru_cache(maxsize=None)
def _device_smem(index):
    import torch

    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit:
        return int(limit)
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])


@functools.lru_cache(maxsize=None)
def _device_arch(index):
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def arch(device=None):
    """Compute capability as 90, 80, ...: the compile-check target's, else the device's (90 with no GPU)."""
    if _target is not None:
        return _target[0]
    import torch

    if not torch.cuda.is_available():
        return 90
    return _device_arch(device.index if device is not None and device.index is not None else 0)


def smem_limit(device=None):
    if _target is not None:
        return _target[1]
    import torch

    if not torch.cuda.is_available():  # torch.compile tracing on a machine without a GPU: nothing will run here
        return float("inf")
    return _device_smem(device.index if device is not None and device.index is not None else 0)


def m_bucket(M):
    """Autotuning key for M: decode (M <= 16) and the prefill sizes tune separately, without a retune per M."""
    for bucket in (16, 64, 256, 1024, 4096):
        if M <= bucket:
            return bucket
    return 16384


def shrink_block_m(M):
    if INTERPRET:
        return 16  # several M tiles even on small test shapes, so the partial-sum reduction is exercised
    return 16 if M <= 16 else 64


def autotune_bench(fn, quantiles):
    """Time one config for the autotuner: 5 ms of warmup and 20 ms of repeats, not Triton's 25 + 100 ms, which
    would make the GPU check's hundreds of config timings take minutes."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def autotuned(kernel, configs, key, prune):
    """kernel autotuned over configs, pruned by prune before anything is compiled or timed."""
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           do_bench=autotune_bench)(kernel)


def _cfg(warps, stages, **blocks):
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


def _r16(R):
    return max(16, triton.cdiv(R, 16) * 16)


def member(config, group):
    """config is one of group's own objects (Configs compare by value, and the fp32 and 2-byte lists share some)."""
    return any(config is c for c in group)


def _wide(named):
    """True for fp32 activations (tiles of their own: 4-byte operands, 3xTF32 register pressure)."""
    return named["a_ptr"].element_size() == 4


# --------------------------------------------------------------------------------------------------------------
# GEMM with the rank-r epilogue. Tiles by M bucket: decode (M <= 64) streams W with a small M tile and narrow
# N tiles (enough programs to fill the SMs; B tiles of at most 8K elements, which unaligned or quantized
# operands load through registers without spilling); prefill uses the large tiles (Hopper: wgmma 64xN per
# warpgroup).
# --------------------------------------------------------------------------------------------------------------

GEMM_HALF = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
]
GEMM_FP32 = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 3, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
]
# Offered only where no other tile fits the shared memory (per-row adapters over an fp32 weight on an A100).
GEMM_HALF_SMALL = _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
GEMM_INTERPRET = [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)]


def gemm_configs():
    return GEMM_INTERPRET if INTERPRET else GEMM_HALF + GEMM_FP32 + [GEMM_HALF_SMALL]


def gemm_smem(config, a_size, b_size, r_step=16, b2_size=None, per_row=False):
    """Estimated shared memory of one GEMM config: the larger of its main loop's and its rank loop's pipeline
    buffers (Triton reuses the memory between loops); with per-row adapters the rank loop also pipelines an
    fp32 (BLOCK_M, R_STEP) tile of e, not reused (compile-check measured 245,760 B for 256x128x64 bf16)."""
    kw, stages = config.kwargs, config.num_stages
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    r_step = min(r_step, bk)
    main = stages * (bm * bk * a_size + bk * bn * b_size)
    rank = stages * (bm * r_step * a_size + r_step * bn * (b2_size or b_size))
    if per_row:
        return main + rank + stages * bm * r_step * 4
    return max(main, rank)


def prune_gemm(configs, named, **kwargs):
    a, b, b2 = named["a_ptr"], named["b_ptr"], named["b2_ptr"]
    wide = _wide(named)
    pool = [c for c in configs if member(c, GEMM_FP32) == wide and c is not GEMM_HALF_SMALL] or list(configs)
    small = named["M_BUCKET"] <= 64
    by_m = [c for c in pool if (c.kwargs["BLOCK_M"] <= 32) == small] or pool
    per_row = kwargs.get("PER_ROW", False)
    mma_sync = arch(a.device) < 90
    # fp32 t under 16-bit activations (float16: t = x U^T does not fit its range), converted in registers
    a2 = named.get("a2_ptr", a)
    wide_a2 = kwargs.get("LOWRANK", False) and a2.element_size() > a.element_size()
    if (b.element_size() != a.element_size() or b2.element_size() != a.element_size() or per_row or mma_sync
            or wide_a2):
        # B converted in registers (fp32 or quantized weight, fp32 factors), a per-row e tile, an fp32 t, or
        # mma.sync (sm_80: operands and accumulators in registers): the widest accumulators (128 fp32 a
        # thread) do not fit; compile-check saw them spill
        by_m = [c for c in by_m if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps] or by_m
    if (mma_sync or (wide_a2 and per_row)) and small:  # 16-row decode tiles only (the 32-row one spilled)
        by_m = [c for c in by_m if c.kwargs["BLOCK_M"] == 16] or by_m
    if b.element_size() != a.element_size() and small:
        # decode B tiles converted in registers (int8/fp8 dequantized, fp32 cast), which unaligned rows load
        # element by element: the narrowest tile only (compile-check saw the others spill)
        by_m = [c for c in by_m if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 512
                and c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] <= 4096] or by_m
    limit = smem_limit(a.device)
    r_step = kwargs.get("R_STEP", 16) if kwargs.get("LOWRANK", False) else 16
    def need(c):
        return gemm_smem(c, a.element_size(), b.element_size(), r_step, b2.element_size(), per_row)

    fits = [c for c in by_m if need(c) <= limit]
    if not fits and not wide and need(GEMM_HALF_SMALL) <= limit:
        return [GEMM_HALF_SMALL]
    return fits or [min(by_m, key=need)]


# --------------------------------------------------------------------------------------------------------------
# Shrink: BLOCK_M is the launcher's (the partials buffer has one row per M tile); R tiles no wider than R needs.
# --------------------------------------------------------------------------------------------------------------

SHRINK_HALF = [
    _cfg(4, 3, BLOCK_R=16, BLOCK_K=256),
    _cfg(4, 4, BLOCK_R=32, BLOCK_K=128),
    _cfg(4, 3, BLOCK_R=64, BLOCK_K=128),
    _cfg(8, 3, BLOCK_R=128, BLOCK_K=64),
]
SHRINK_FP32 = [
    _cfg(4, 3, BLOCK_R=16, BLOCK_K=128),
    _cfg(4, 3, BLOCK_R=32, BLOCK_K=64),
    _cfg(4, 3, BLOCK_R=64, BLOCK_K=64),
    _cfg(8, 3, BLOCK_R=128, BLOCK_K=32),
]
SHRINK_INTERPRET = [_cfg(4, 1, BLOCK_R=16, BLOCK_K=32)]


def shrink_configs():
    return SHRINK_INTERPRET if INTERPRET else SHRINK_HALF + SHRINK_FP32


def shrink_smem(config, block_m, a_size, b_size):
    kw = config.kwargs
    return config.num_stages * (block_m * kw["BLOCK_K"] * a_size + kw["BLOCK_K"] * kw["BLOCK_R"] * b_size)


def prune_shrink(configs, named, **kwargs):
    a, b = named["a_ptr"], named["b_ptr"]
    wide = _wide(named)
    pool = [c for c in configs if member(c, SHRINK_FP32) == wide] or list(configs)
    r16 = _r16(named["R"])
    narrow = [c for c in pool if c.kwargs["BLOCK_R"] <= r16] or pool[:1]
    if named["p_ptr"].element_size() > a.element_size() and kwargs["BLOCK_M"] <= 16:
        # fp32 t from 16-bit x in a decode tile: at most 1K elements of (K x R) tile a warp (compile-check saw
        # R64 x K128 on 4 warps spill)
        narrow = [c for c in narrow if c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_K"] <= 1024 * c.num_warps] or narrow
    limit = smem_limit(a.device)
    fits = [c for c in narrow if shrink_smem(c, kwargs["BLOCK_M"], a.element_size(), b.element_size()) <= limit]
    return fits or narrow[:1]


# --------------------------------------------------------------------------------------------------------------
# Merge W + L diag(e) U: R tiles no wider than R needs.
# --------------------------------------------------------------------------------------------------------------

MERGE_HALF = [
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=128, BLOCK_R=64),
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=128, BLOCK_R=32),
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=128, BLOCK_R=16),
    _cfg(4, 4, BLOCK_N=64, BLOCK_K=128, BLOCK_R=32),
    _cfg(4, 3, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16),
]
MERGE_FP32 = [
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=128, BLOCK_R=32),
    _cfg(4, 3, BLOCK_N=64, BLOCK_K=128, BLOCK_R=32),
    _cfg(4, 3, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16),
]
MERGE_INTERPRET = [_cfg(4, 1, BLOCK_N=32, BLOCK_K=32, BLOCK_R=16)]


def merge_configs():
    return MERGE_INTERPRET if INTERPRET else MERGE_HALF + MERGE_FP32


def merge_smem(config, l_size, u_size):
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_N"] * kw["BLOCK_R"] * l_size + kw["BLOCK_R"] * kw["BLOCK_K"] * u_size)


def prune_merge(configs, named, **kwargs):
    lt, u = named["l_ptr"], named["u_ptr"]
    wide = lt.element_size() == 4
    pool = [c for c in configs if member(c, MERGE_FP32) == wide] or list(configs)
    r16 = _r16(named["R"])
    narrow = [c for c in pool if c.kwargs["BLOCK_R"] <= r16] or pool[-1:]
    if named["w_ptr"].element_size() == 1:  # int8/fp8 W dequantized in registers: small tiles do not spill
        narrow = [c for c in narrow if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 32 * 32 * c.num_warps] or narrow
    limit = smem_limit(lt.device)
    fits = [c for c in narrow if merge_smem(c, lt.element_size(), u.element_size()) <= limit]
    return fits or narrow[-1:]
