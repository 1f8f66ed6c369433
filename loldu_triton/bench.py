"""Layer benchmark: every adapter as a ratio to the frozen nn.Linear, measured in the same run."""
from __future__ import annotations

import csv
import importlib.util
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import LoLDULinear

CPU_SHAPES = [(2048, 1024, 1024)]
# Peak dense FLOP/s per activation dtype and DRAM bytes/s of the SXM parts (vendor datasheets). float32 is the
# TF32 tensor-core peak / 3: what 3xTF32, the kernels' fp32 under "highest" precision, can reach.
GPU_PEAKS = {
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12 / 3, "bytes": 3.35e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12 / 3, "bytes": 4.8e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12 / 3, "bytes": 2.039e12},
}
GPU_SHAPES = [(m, 4096, n) for m in (1, 512, 8192) for n in (4096, 11008)]
METHODS = ("linear", "loldu", "loldu_torch", "loldu_int8", "loldu_fp8", "loldu_unfused", "seed_param", "peft_lora",
           "peft_vera")


class UnfusedLoLDU(nn.Module):
    """LoLDU written with plain autograd ops: the PyTorch form without a custom backward."""

    def __init__(self, layer: LoLDULinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        return F.linear(x, m.weight, m.bias) + ((x @ m.U.T) * m.loldu_scale().to(x.dtype)) @ m.L.T


class SeedParametrization(nn.Module):
    """What the reference code does: a dense out x out P, W rebuilt from the residual on every forward."""

    def __init__(self, layer: LoLDULinear):
        super().__init__()
        m = layer
        self.bias = m.bias
        P = torch.zeros(m.out_features, m.out_features, dtype=m.weight.dtype, device=m.weight.device)
        rows = m.pivots
        taken = set(rows.tolist())
        # L in elimination order (P^T L): the pivot rows first, then the rest
        rest = torch.tensor([i for i in range(m.out_features) if i not in taken], dtype=torch.long, device=rows.device)
        order = torch.cat([rows, rest])
        P[order, torch.arange(m.out_features, device=rows.device)] = 1
        self.register_buffer("P", P)
        self.register_buffer("L_elim", m.L[order])
        self.register_buffer("U", m.U)
        self.register_buffer("W_res", m.weight - m.L @ (m.d0.to(m.weight.dtype)[:, None] * m.U) * m.s0.item())
        self.z = nn.Parameter(m.d.detach().clone())
        self.sigma = nn.Parameter(m.s.detach().clone())

    def forward(self, x):
        delta = self.P @ (self.L_elim @ ((self.sigma * self.z).to(x.dtype)[:, None] * self.U))
        return F.linear(x, self.W_res + delta, self.bias)


def _peft_module(kind: str, base: nn.Linear, rank: int) -> Optional[nn.Module]:
    try:
        import peft
    except ImportError:
        return None

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    config = (peft.LoraConfig(r=rank, target_modules=["proj"]) if kind == "lora"
              else peft.VeraConfig(r=rank, target_modules=["proj"]))
    return peft.get_peft_model(Wrapper(), config)


def build_methods(K: int, N: int, rank: int, dtype, device, wanted) -> Dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Linear(K, N, device=device, dtype=dtype)
    base.requires_grad_(False)
    layer = LoLDULinear.from_linear(base, rank)
    with torch.no_grad():  # a trained state, so no path can shortcut e == 0
        layer.d.mul_(1.01)

    def quantized(kind):
        if kind == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            return None
        q = LoLDULinear.from_parametrization(base, layer)
        q.quantize_base(kind)
        return q

    candidates: Dict[str, Callable[[], Optional[nn.Module]]] = {
        "linear": lambda: base,
        "loldu": lambda: layer,
        # the PyTorch path of the same layer; on CPU it is what "loldu" runs already
        "loldu_torch": lambda: LoLDULinear.from_parametrization(base, layer, backend="torch")
        if device.type != "cpu" else None,
        "loldu_int8": lambda: quantized("int8"),
        "loldu_fp8": lambda: quantized("fp8"),
        "loldu_unfused": lambda: UnfusedLoLDU(layer),
        "seed_param": lambda: SeedParametrization(layer),
        "peft_lora": lambda: _peft_module("lora", base, rank),
        "peft_vera": lambda: _peft_module("vera", base, rank),
    }
    out = {}
    for name in wanted:
        module = candidates[name]()
        if module is not None:
            out[name] = module
    return out


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward beyond the module's own parameters and buffers (x counts)."""
    own = {t.data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    seen: Dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in own:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


@dataclass
class Result:
    device: str
    dtype: str
    M: int
    K: int
    N: int
    rank: int
    method: str
    forward_ms: float
    backward_ms: float
    fwd_bwd_ms: float
    forward_ratio: float = float("nan")
    backward_ratio: float = float("nan")
    fwd_bwd_ratio: float = float("nan")
    saved_mb: float = 0.0
    peak_mb: float = float("nan")
    weights_mb: float = 0.0  # what the layer stores: base weight (quantized or not), bias, factors
    # roofline of this shape on a named GPU (see ideal_ms): frozen layer and LoLDU, forward + input gradient
    ideal_floor_ms: float = float("nan")
    ideal_loldu_ms: float = float("nan")


def _timer(device: torch.device):
    """Milliseconds of one measurement: do_bench's median on CUDA, one timed call on CPU."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn):
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)

    return cpu_time


def bench_case(M, K, N, rank, dtype, device, wanted, repeats) -> List[Result]:
    modules = build_methods(K, N, rank, dtype, device, wanted)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    timer = _timer(device)

    def fwd(m):
        return lambda: m(x)

    def fwd_bwd(m):
        def run():
            m(x).backward(dy)
            x.grad = None
        return run

    samples = {name: {"f": [], "fb": []} for name in modules}
    for m in modules.values():  # warm up
        fwd_bwd(m)()
    rounds = repeats if device.type == "cpu" else 3
    for _ in range(rounds):  # interleaved: every method sees the same machine state
        for name, m in modules.items():
            samples[name]["f"].append(timer(fwd(m)))
            samples[name]["fb"].append(timer(fwd_bwd(m)))
    results = []
    for name, m in modules.items():
        f = statistics.median(samples[name]["f"])
        fb = statistics.median(samples[name]["fb"])
        peak = float("nan")
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_mem = torch.cuda.memory_allocated()
            fwd_bwd(m)()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
        # backward alone = (forward+backward) - forward, both medians of the same interleaved rounds
        stored = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
        results.append(Result(device.type, str(dtype).replace("torch.", ""), M, K, N, rank, name, f, fb - f, fb,
                              saved_mb=saved_bytes(m, x) / 2**20, peak_mb=peak, weights_mb=stored / 2**20))
    if "linear" in samples:
        # Each ratio is the median over rounds of (method / floor) within the same round: paired, so the drift
        # of a shared machine between rounds cancels.
        floor = samples["linear"]
        for r in results:
            own = samples[r.method]
            f = [a / b for a, b in zip(own["f"], floor["f"])]
            fb = [a / b for a, b in zip(own["fb"], floor["fb"])]
            b = [(a2 - a1) / (b2 - b1) for a1, a2, b1, b2 in zip(own["f"], own["fb"], floor["f"], floor["fb"])]
            r.forward_ratio, r.fwd_bwd_ratio, r.backward_ratio = (statistics.median(v) for v in (f, fb, b))
    return results


def bench_adapter_batch(batch: int, tokens: int, K: int, N: int, rank: int, counts, dtype, device, repeats: int):
    """Forward time of one batch whose rows use `count` different adapters, against the same batch with one
    adapter, measured in interleaved rounds (median of per-round ratios). Returns markdown rows."""
    from .api import adapter_batch

    torch.manual_seed(0)
    layer = LoLDULinear.from_base(nn.Linear(K, N, device=device, dtype=dtype), rank)
    for i in range(max(counts)):
        layer.set_named_adapter(f"a{i}", torch.randn(rank, device=device))
    x = torch.randn(batch, tokens, K, device=device, dtype=dtype)
    timer = _timer(device)
    lines = ["| adapters in the batch | batch x tokens | K x N | r | forward ms | ratio to one adapter |",
             "|---:|---|---|---:|---:|---:|"]
    one = ["a0"] * batch
    for count in counts:
        names = [f"a{i % count}" for i in range(batch)]
        ratios, times = [], []
        with torch.no_grad():
            for _ in range(repeats):
                with adapter_batch(layer_holder(layer), one):
                    base = timer(lambda: layer(x))
                with adapter_batch(layer_holder(layer), names):
                    t = timer(lambda: layer(x))
                ratios.append(t / base)
                times.append(t)
        lines.append(f"| {count} | {batch} x {tokens} | {K} x {N} | {rank} | {statistics.median(times):.3f} | "
                     f"{statistics.median(ratios):.3f} |")
    return lines


def layer_holder(layer: nn.Module) -> nn.Module:
    """adapter_batch works on models: wrap a single layer in one."""
    holder = nn.Module()
    holder.layer = layer
    return holder


def ideal_ms(M: int, K: int, N: int, r: int, dtype: str, gpu: str):
    """Roofline forward + input-gradient times (ms) of the frozen layer and of LoLDU on `gpu` (a GPU_PEAKS key):
    each pass takes the longer of its FLOPs at peak and its DRAM bytes at peak bandwidth.

    frozen, each pass: 2*M*K*N FLOPs; reads the input (x, or dY) and W, writes the output (y, or dX).
    LoLDU adds: forward 2*M*r*(K + N) FLOPs, reads U and L, writes t; backward 2*M*r*(K + N) + 2*M*r FLOPs,
    reads L, U and t. Nothing else: the rank-r work fused into the GEMM, no extra pass over x or dY."""
    peak = GPU_PEAKS[gpu]
    size = torch.finfo(getattr(torch, dtype)).bits // 8

    def t(flops, elements):
        return 1e3 * max(flops / peak[dtype], elements * size / peak["bytes"])

    frozen = 2 * t(2.0 * M * K * N, M * K + K * N + M * N)
    side = r * (K + N) + M * r  # factors and t
    loldu = (t(2.0 * M * K * N + 2.0 * M * r * (K + N), M * K + K * N + M * N + side)
             + t(2.0 * M * K * N + 2.0 * M * r * (K + N + 1), M * K + K * N + M * N + side))
    return frozen, loldu


def gpu_name(device: torch.device, requested: Optional[str] = None) -> Optional[str]:
    """The GPU_PEAKS entry for the roofline columns: the one asked for, else the CUDA device's, if listed."""
    if requested:
        if requested not in GPU_PEAKS:
            raise SystemExit(f"bench: --gpu must be one of {sorted(GPU_PEAKS)}, got {requested!r}")
        return requested
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((gpu for gpu in GPU_PEAKS if gpu in name), None)
    return None


MARKDOWN_HEADER = ["| device | dtype | M | K | N | r | method | fwd ms | bwd ms | fwd+bwd ms | fwd x | bwd x | "
                   "fwd+bwd x | saved MB | peak MB | weights MB | ideal floor ms | ideal LoLDU ms | ideal x |",
                   "|" + "---|" * 19]


def _ms(value):
    return "-" if value != value else f"{value:.3f}"


def markdown(results: List[Result], header: bool = True) -> str:
    """The table; the ideal columns (fwd+bwd on the named GPU) are "-" where no GPU was named."""
    lines = list(MARKDOWN_HEADER) if header else []
    for r in results:
        lines.append(f"| {r.device} | {r.dtype} | {r.M} | {r.K} | {r.N} | {r.rank} | {r.method} | "
                     f"{r.forward_ms:.3f} | {r.backward_ms:.3f} | {r.fwd_bwd_ms:.3f} | {r.forward_ratio:.3f} | "
                     f"{r.backward_ratio:.3f} | {r.fwd_bwd_ratio:.3f} | {r.saved_mb:.2f} | {r.peak_mb:.1f} | "
                     f"{r.weights_mb:.2f} | {_ms(r.ideal_floor_ms)} | {_ms(r.ideal_loldu_ms)} | "
                     f"{_ms(r.ideal_loldu_ms / r.ideal_floor_ms)} |")
    return "\n".join(lines)


def plot(results: List[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, LogLocator

    cases = sorted({(r.M, r.K, r.N, r.rank) for r in results})
    methods = [m for m in METHODS if any(r.method == m for r in results)]
    fig, ax = plt.subplots(figsize=(min(max(6.4, 0.9 * len(cases) + 2.5), 24), 4.8))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        ratios = [next((r.fwd_bwd_ratio for r in results if (r.M, r.K, r.N, r.rank) == c and r.method == method),
                       float("nan")) for c in cases]
        ax.bar([i + j * width for i in range(len(cases))], ratios, width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"M={m}\n{k}x{n}\nr={r}" for m, k, n, r in cases], fontsize=8)
    ax.set_ylabel("forward+backward time / frozen nn.Linear")
    ax.set_yscale("log")
    # plain ratios (0.5x, 1x, 2x, 5x), not powers of ten
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    first = results[0]
    ax.set_title(f"LoLDU layer benchmark: forward+backward time relative to the frozen nn.Linear "
                 f"({first.device}, {first.dtype})", fontsize=10)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _Lines:
    """A stand-in for tqdm where it is not installed: rows as plain lines, no bar."""

    def __init__(self, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, text):
        print(text, flush=True)

    def update(self, n=1):
        pass


def _progress(**kwargs):
    """A progress bar on stderr that is shown on a terminal only (disable=None), so a log piped to a file gets
    the rows as plain lines and no carriage-return updates."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines()
    return tqdm(disable=None, leave=False, file=sys.stderr, **kwargs)


def _parse_shapes(text):
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]


def run_bench(args) -> List[Result]:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if getattr(args, "adapter_counts", None):
        counts = [int(c) for c in args.adapter_counts.split(",")]
        batch = max(counts)
        K, N = (4096, 4096) if device.type == "cuda" else (1024, 1024)
        rank = int((args.ranks or "16").split(",")[0])
        lines = bench_adapter_batch(batch, 8, K, N, rank, counts, dtype, device, args.repeats or 9)
        table = "\n".join(lines)
        print(f"{device.type}, {str(dtype).replace('torch.', '')}, forward (no grad), 8 tokens per batch row")
        print(table)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_batch.md").write_text(table + "\n")
        return []
    shapes = _parse_shapes(args.shapes) if args.shapes else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    ranks = (args.ranks or ("16,64,256,1024,full" if device.type == "cuda" else "16")).split(",")
    wanted = args.methods.split(",") if args.methods else list(METHODS)
    unknown = set(wanted) - set(METHODS)
    if unknown:
        raise SystemExit(f"bench: unknown methods {sorted(unknown)}; choose from {METHODS}")
    gpu = gpu_name(device, getattr(args, "gpu", None))
    if gpu:
        print(f"roofline columns: {gpu} ({GPU_PEAKS[gpu][str(dtype).replace('torch.', '')] / 1e12:.0f} TFLOP/s "
              f"{str(dtype).replace('torch.', '')}, {GPU_PEAKS[gpu]['bytes'] / 1e12:.2f} TB/s)")
    missing = [m for m in ("peft_lora", "peft_vera") if m in wanted and importlib.util.find_spec("peft") is None]
    if missing:
        print(f"note: peft is not installed; skipping the {', '.join(missing)} rows")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    # Every case's rows go to the files as soon as they are measured: a run cut short keeps what it measured.
    with open(out / "bench.csv", "w", newline="") as csv_file, open(out / "bench.md", "w") as md_file:
        writer = csv.DictWriter(csv_file, fieldnames=list(asdict(Result("", "", 0, 0, 0, 0, "", 0, 0, 0))))
        writer.writeheader()
        md_file.write("\n".join(MARKDOWN_HEADER) + "\n")
        print("\n".join(MARKDOWN_HEADER), flush=True)  # the header once; each row once, as soon as it is measured
        cases = [(M, K, N, rank_text) for M, K, N in shapes for rank_text in ranks]
        with _progress(total=len(cases), desc="bench cases") as bar:
            for M, K, N, rank_text in cases:
                rank = min(K, N) if rank_text == "full" else int(rank_text)
                case = bench_case(M, K, N, rank, dtype, device, wanted, args.repeats or 15)
                if gpu:
                    floor, ideal = ideal_ms(M, K, N, rank, str(dtype).replace("torch.", ""), gpu)
                    for r in case:
                        r.ideal_floor_ms, r.ideal_loldu_ms = floor, ideal
                results += case
                writer.writerows(asdict(r) for r in case)
                csv_file.flush()
                rows = markdown(case, header=False)
                md_file.write(rows + "\n")
                md_file.flush()
                bar.write(rows)
                bar.update(1)
    plot(results, out / "bench.png")
    print(f"wrote {out / 'bench.csv'}, {out / 'bench.md'}, {out / 'bench.png'}")
    return results
