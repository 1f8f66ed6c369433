"""Compile every kernel variant the launchers can produce for a GPU target, without a GPU.

The launchers run on meta tensors (shapes, strides and dtypes, no data) inside common.recording, which hands
each launch over instead of running it. Every recorded launch is then compiled once per config that its
autotuner offers on the target (after the same early_config_prune the GPU run applies), through the kernel's own
JIT entry point with warmup=True and a stand-in driver that names the target: the signature, specialization
and options are exactly those of a GPU run, and ptxas (shipped in the triton wheel) reports registers and
spills. One record per distinct compiled kernel.
"""

import contextlib
import io
import itertools
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from ..core.formulas import shrink_dtype
from ..kernels import common, configs

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANT = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# (M, K, N, ranks): prefill and decode at LLaMA-7B width (every size a multiple of 16), and an odd shape.
# r = 16 takes the prefetched one-step rank term, r = 4096 the rank loop and every config R admits (r = 64 would
# compile the same kernels as 4096: every size is one of 1, a multiple of 16, or other, for the JIT).
SHAPES = {"prefill": (8192, 4096, 4096, (16, 4096)), "decode": (1, 4096, 4096, (16, 4096)),
          "odd": (37, 45, 29, (1, 5))}


@dataclass
class Record:
    kernel: str
    config: str
    block_m: int  # the M tile (GEMM, shrink), the N tile of the merge
    dtype: str  # the compute dtype: the activations', L's for the merge
    operands: str  # the dtypes of every tensor the kernel reads, in argument order
    route: str  # which call made it, and the constexpr flags that are on
    shape: str
    arch: int
    ok: bool = False
    regs: int = -1
    spills: int = -1  # bytes of spill stores
    smem_bytes: int = -1
    smem_limit: int = 0
    mma: str = "none"  # wgmma, mma or none
    compile_s: float = 0.0
    error: str = ""
    hash: str = field(default="", repr=False)


# --------------------------------------------------------------------------------------------------------------
# What the launchers produce: every call of the routes on meta tensors.
# --------------------------------------------------------------------------------------------------------------


def _operands(M, K, N, r, dtype, factor_dtype, quant):
    meta = dict(device="meta")
    w_dtype = QUANT[quant] if quant else factor_dtype
    return dict(
        x=torch.empty((M, K), dtype=dtype, **meta), dy=torch.empty((M, N), dtype=dtype, **meta),
        weight=torch.empty((N, K), dtype=w_dtype, **meta), bias=torch.empty((N,), dtype=factor_dtype, **meta),
        L=torch.empty((N, r), dtype=factor_dtype, **meta), U=torch.empty((r, K), dtype=factor_dtype, **meta),
        e=torch.empty((r,), dtype=torch.float32, **meta),
        scale=torch.empty((N,), dtype=torch.float32, **meta) if quant else None,
        table=torch.empty((3, r), dtype=torch.float32, **meta), rows=torch.empty((M,), dtype=torch.int64, **meta))


LAYER_ROUTES = ("side", "side-nobias", "side-bwd", "merged", "merged-bwd")  # what LoLDULinear calls
ROWS_ROUTES = ("rows", "rows-bwd")  # many adapters in one batch
# Dropout on the adapter's input (training only): the shrink reads dropout(x); backward's GEMM is dY W alone
# ("base"), which with a quantized base is a variant of its own.
DROPOUT_ROUTES = ("dropout", "dropout-bwd", "dropout-rows-bwd")
SCOPES = ("full", "quick", "gpu-check")
# (activation dtype, factor dtype) of the quick scope: bf16 with fp32 factors (B converted in registers),
# float16 with its own factors (t = x U^T is float32 there), fp32
QUICK_OPERANDS = [("bfloat16", "float32"), ("float16", "float16"), ("float32", "float32")]


def _calls(o):
    """Every way the routes call the kernels on these operands, by name."""
    from ..kernels import ops

    x, dy, W, b, L, U, e, sc = (o[k] for k in ("x", "dy", "weight", "bias", "L", "U", "e", "scale"))
    M, N = x.shape[0], W.shape[0]
    t = torch.empty((M, L.shape[1]), dtype=shrink_dtype(x.dtype), device="meta")
    y, dx = torch.empty((M, N), dtype=x.dtype, device="meta"), torch.empty_like(x)
    return {
        "side": lambda: ops.forward_into(x, W, b, L, U, e, "side", y, sc),
        "side-nobias": lambda: ops.forward_into(x, W, None, L, U, e, "side", y, sc),
        "side-bwd": lambda: ops.backward_into(dy, t, W, L, U, e, "side", dx, sc),
        "merged": lambda: ops.forward_into(x, W, b, L, U, e, "merged", y, sc),
        "merged-bwd": lambda: ops.backward_into(dy, t, W, L, U, e, "merged", dx, sc),
        "rows": lambda: ops.forward_rows_impl(x, W, b, L, U, o["table"], o["rows"], sc),
        "rows-bwd": lambda: ops.backward_rows_impl(dy, t, W, L, U, o["table"], o["rows"], sc),
        "dropout": lambda: ops.forward_into(x, W, b, L, U, e, "side", y, sc, torch.empty_like(x)),
        "dropout-bwd": lambda: ops.backward_base_impl(dy, t, W, L, U, e, None, sc),
        "dropout-rows-bwd": lambda: ops.backward_base_impl(dy, t, W, L, U, o["table"], o["rows"], sc),
    }


def _scenarios(arch, scope):
    """(dtype, factor dtype, quantization, shape, r, fp32 matmul precision, routes) to drive the launchers with.

    full: every dtype, with its own or fp32 factors, every quantized base, every route, both fp32 precisions.
    quick (CI): every operand dtype class the launchers produce, at its widest (QUICK_OPERANDS: bf16 with fp32
      factors, float16 with its fp32 t, fp32; an int8 base; per-row adapters), side and merged routes, and the
      merge in bf16: every autotune config the target offers for 2-byte and fp32 operands appears.
    gpu-check: what benchmarks/gpu_check.sh runs: the layer's routes in every dtype, bf16 also over int8/fp8
      bases."""
    if scope == "quick":
        for (dname, fname), shape in itertools.product(QUICK_OPERANDS, ("prefill", "decode")):
            for r in SHAPES[shape][3]:
                per_row = ("rows",) if dname != "float32" else ()
                yield dname, fname, None, shape, r, "highest", ("side", "side-bwd", "merged") + per_row + DROPOUT_ROUTES
            yield "bfloat16", "bfloat16", "int8", shape, 16, "highest", ("side", "side-bwd") + DROPOUT_ROUTES
        yield "bfloat16", "bfloat16", None, "prefill", 4096, "highest", ("merged",)  # the merge in bf16
        return
    quants = [q for q in QUANT if not (q == "fp8" and arch < 89)]  # fp8 e4m3 needs compute capability 8.9+
    for dname, shape in itertools.product(DTYPES, SHAPES):
        for r in SHAPES[shape][3]:
            if scope == "gpu-check":
                yield dname, dname, None, shape, r, "highest", LAYER_ROUTES
                if dname == "bfloat16":
                    for quant in quants:
                        yield dname, dname, quant, shape, r, "highest", LAYER_ROUTES
                continue
            everything = LAYER_ROUTES + ROWS_ROUTES + DROPOUT_ROUTES
            for fname in sorted({dname, "float32"}):
                yield dname, fname, None, shape, r, "highest", everything
            for quant in quants:
                yield dname, dname, quant, shape, r, "highest", everything
            if dname == "float32":  # tf32 allowed: plain tf32 dots instead of 3xTF32
                yield dname, dname, None, shape, r, "high", everything


def launches(arch, scope="full"):
    """Every (autotuner, args, kwargs, labels) the launchers produce for the scenarios of scope."""
    out = []
    default = torch.get_float32_matmul_precision()
    for dname, fname, quant, shape, r, fp32_precision, routes in _scenarios(arch, scope):
        M, K, N, _ = SHAPES[shape]
        calls = _calls(_operands(M, K, N, r, DTYPES[dname], DTYPES[fname], quant))
        for route in routes:
            recorded = []
            torch.set_float32_matmul_precision(fp32_precision)
            try:
                with common.recording(lambda k, a, kw: recorded.append((k, a, kw))):
                    calls[route]()
            finally:
                torch.set_float32_matmul_precision(default)
            for kernel, args, kwargs in recorded:
                out.append((kernel, args, kwargs, dict(dtype=dname, route=route, shape=shape)))
    return out


def _kernel_name(kernel):
    from ..kernels import gemm, merge, shrink

    return {id(gemm.gemm_fwd): "gemm_fwd", id(gemm.gemm_bwd): "gemm_bwd", id(shrink.shrink_kernel): "shrink",
            id(merge.merge_kernel): "merge"}[id(kernel)]


def _flags(kwargs):
    on = [k for k, v in kwargs.items() if v is True]
    if kwargs.get("LOWRANK"):
        on.append(f"R_STEP={kwargs['R_STEP']}")
    return " ".join(on + [f"PREC={kwargs['PREC']}"])


def _config_label(config):
    blocks = " ".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in config.kwargs.items() if k != "GROUP_M")
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


# --------------------------------------------------------------------------------------------------------------
# Compiling for a target without a GPU.
# --------------------------------------------------------------------------------------------------------------


class _TargetDriver:
    """Stands in for the CUDA driver where the JIT asks which device and target it compiles for."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 1000 + self.arch  # a device id of its own per target keeps the JIT's caches apart

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        raise RuntimeError(f"compile-check: no GPU here (the JIT asked the driver for {name})")


@contextlib.contextmanager
def compiling_for(arch):
    from triton import knobs
    from triton.runtime import driver

    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    active = driver._active  # reset_active() would look for a real GPU driver
    driver.set_active(_TargetDriver(arch))
    # Compile every variant afresh, with ptxas's report (registers, spills) printed for us to read.
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with configs.target(arch):
            yield
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
        driver._active = active


def _mma(ptx):
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


def offered(kernel, args, kwargs):
    """The configs the autotuner would benchmark for this launch (on the target set by compiling_for)."""
    named = dict(zip(kernel.arg_names, args))
    return kernel.early_config_prune(kernel.configs, named, **kwargs) if kernel.early_config_prune else kernel.configs


def compile_one(kernel, args, kwargs, config, labels, arch, seen):
    operands = ",".join(str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor))
    blocks = {**kwargs, **config.kwargs}
    name = _kernel_name(kernel)
    # the merge computes in L's dtype whatever the activations are
    dtype = str(args[1].dtype).replace("torch.", "") if name == "merge" else labels["dtype"]
    rec = Record(kernel=name, config=_config_label(config),
                 block_m=blocks.get("BLOCK_M", blocks.get("BLOCK_N", 0)), dtype=dtype,
                 operands=operands, route=f"{labels['route']}: {_flags(kwargs)}", shape=labels["shape"], arch=arch,
                 smem_limit=configs.SMEM_LIMIT[arch])
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = kernel.fn.run(*args, grid=None, warmup=True, **kwargs, **config.all_kwargs())
    except Exception as err:  # a variant that does not compile is a finding, not a crash of the check
        rec.error = f"{type(err).__name__}: {str(err)[:2000]}"
        rec.compile_s = time.perf_counter() - start
        return rec
    rec.compile_s = time.perf_counter() - start
    rec.hash = compiled.hash
    if rec.hash in seen:
        return None
    seen.add(rec.hash)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    rec.regs = int(regs.group(1)) if regs else -1
    rec.spills = int(spills.group(1)) if spills else -1
    rec.smem_bytes = int(compiled.metadata.shared)
    rec.mma = _mma(compiled.asm["ptx"])
    rec.ok = rec.regs >= 0
    if not rec.ok:
        rec.error = "no ptxas report"
    return rec


def _spec(arg):
    """What the JIT specializes an argument on: a tensor's dtype and 16-byte alignment; an int being 1, a
    multiple of 16, or other (and its width); anything else by value."""
    if isinstance(arg, torch.Tensor):
        return str(arg.dtype), arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or not isinstance(arg, int):
        return repr(arg)
    return "1" if arg == 1 else "D" if arg % 16 == 0 else "", abs(arg) < 2**31


def _work(arch, scope):
    """(kernel, args, kwargs, config, labels) of every distinct variant, in launch order."""
    items, seen = [], set()
    with configs.target(arch):
        for kernel, args, kwargs, labels in launches(arch, scope):
            for config in offered(kernel, args, kwargs):
                key = (id(kernel.fn), tuple(_spec(a) for a in args), tuple(sorted(kwargs.items())),
                       tuple(sorted(config.all_kwargs().items())))
                if key not in seen:
                    seen.add(key)
                    items.append((kernel, args, kwargs, config, labels))
    return items


def _compile_share(arch, scope, share, shares):
    records, seen = [], set()
    work = _work(arch, scope)
    with compiling_for(arch):
        for i, (kernel, args, kwargs, config, labels) in enumerate(work):
            if i % shares == share:
                rec = compile_one(kernel, args, kwargs, config, labels, arch, seen)
                if rec is not None:
                    records.append(rec)
                if share == 0 and i % (25 * shares) == 0:
                    print(f"compile-check sm_{arch}: {i} of {len(work)}", file=sys.stderr, flush=True)
    return records


def run(arch, scope="full", jobs=1) -> List[Record]:
    """Records of every distinct variant of scope (see _scenarios) for `arch`."""
    if jobs <= 1:
        records = _compile_share(arch, scope, 0, 1)
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            shares = pool.starmap(_compile_share, [(arch, scope, j, jobs) for j in range(jobs)])
        records = [r for share in shares for r in share]
    # Shares dedupe on their own: drop a variant compiled by two of them.
    unique, seen = [], set()
    for rec in records:
        if rec.hash and rec.hash in seen:
            continue
        seen.add(rec.hash)
        unique.append(rec)
    return unique


def summary(records: List[Record]) -> str:
    lines = [f"{len(records)} variants for sm_{records[0].arch}" if records else "no variants"]
    by = {}
    for r in records:
        by.setdefault((r.kernel, r.dtype), []).append(r)
    lines.append("| kernel | dtype | variants | failed | max regs | spilling | max smem | mma |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---|")
    for (kernel, dtype), rs in sorted(by.items()):
        ok = [r for r in rs if r.ok]
        mma = ",".join(sorted({r.mma for r in ok}))
        lines.append(f"| {kernel} | {dtype} | {len(rs)} | {len(rs) - len(ok)} | {max((r.regs for r in ok), default=0)} | "
                     f"{sum(r.spills > 0 for r in ok)} | {max((r.smem_bytes for r in ok), default=0)} | {mma} |")
    return "\n".join(lines)


def problems(records: List[Record]) -> List[str]:
    """What every variant must satisfy: compiles; fits shared memory; 2-byte variants do not spill; nothing runs
    FMA-only (fp32 on tensor cores too); on Hopper the 2-byte GEMM tiles use wgmma. wgmma needs 64 rows per
    warpgroup: the decode tiles (BLOCK_M 16 or 32, for M <= 64 where the GEMM is memory-bound) use mma.sync."""
    out = []
    for r in records:
        where = f"{r.kernel} {r.dtype} [{r.operands}] {r.route} {r.shape} {r.config}"
        if not r.ok:
            out.append(f"does not compile: {where}: {r.error[:300]}")
            continue
        if r.smem_bytes > r.smem_limit:
            out.append(f"shared memory {r.smem_bytes} > {r.smem_limit}: {where}")
        if r.dtype != "float32" and r.spills > 0:
            out.append(f"spills {r.spills} B: {where}")
        if r.mma == "none":
            out.append(f"no tensor-core instruction: {where}")
        if (r.arch >= 90 and r.kernel.startswith("gemm") and r.dtype != "float32" and r.block_m >= 64
                and r.mma != "wgmma"):
            out.append(f"no wgmma: {where}")
    return out


def main(arch, scope="full", json_path: Optional[str] = None, jobs=1) -> int:
    start = time.perf_counter()
    records = run(arch, scope, jobs)
    print(summary(records))
    found = problems(records)
    print(f"{scope}: {len(records)} variants compiled for sm_{arch} in {time.perf_counter() - start:.0f} s"
          f" ({sum(r.compile_s for r in records):.0f} s of compile time); {len(found)} problems")
    for line in found:
        print("  " + line)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump([asdict(r) for r in records], f, indent=1)
    sys.stdout.flush()
    return 1 if found else 0
