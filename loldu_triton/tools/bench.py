"""Layer benchmark: every adapter as a ratio to the frozen nn.Linear, measured in the same run."""
from __future__ import annotations

import csv
import importlib.util
import statistics
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..layers.linear import LoLDULinear
from .peers import build_methods, saved_bytes
from .timing import SAMPLE_MS, Clock, calibrate, machine, ratio_cell, sample, spread, unranked

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
# K x N of the layer that `--adapter-counts` times
ADAPTER_BATCH_SHAPE = {"cpu": (1024, 1024), "cuda": (4096, 4096)}


@dataclass
class Result:
    device: str
    dtype: str
    M: int
    K: int
    N: int
    rank: int
    method: str
    forward_ms: float  # medians over rounds of the per-call times, each phase timed on its own
    backward_ms: float
    fwd_bwd_ms: float
    forward_ratio: float = float("nan")  # medians over rounds of (method / floor) in the same round
    backward_ratio: float = float("nan")
    fwd_bwd_ratio: float = float("nan")
    forward_ratio_min: float = float("nan")  # the range of the per-round ratios
    forward_ratio_max: float = float("nan")
    backward_ratio_min: float = float("nan")
    backward_ratio_max: float = float("nan")
    fwd_bwd_ratio_min: float = float("nan")
    fwd_bwd_ratio_max: float = float("nan")
    noisy: str = ""  # the ratios whose range holds another method's median (see unranked): not ranked by this run
    rounds: int = 0
    calls: int = 0  # the fewest calls a timed sample of this method made
    saved_mb: float = 0.0
    peak_mb: float = float("nan")
    weights_mb: float = 0.0  # what the layer stores: base weight (quantized or not), bias, factors
    # roofline of this shape on a named GPU (see ideal_ms): frozen layer and LoLDU, forward + input gradient
    ideal_floor_ms: float = float("nan")
    ideal_loldu_ms: float = float("nan")


def _noisy_column(r: "Result") -> str:
    return "1 round" if r.rounds < 2 else (r.noisy or "-")


def bench_case(M, K, N, rank, dtype, device, wanted, rounds) -> List[Result]:
    modules = build_methods(K, N, rank, dtype, device, wanted)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    clock = Clock(device)

    def phases(m):  # forward, then backward of that forward: each timed on its own
        return (lambda: m(x), lambda y: y.backward(dy))

    def reset(m):  # as after zero_grad(set_to_none=True): every backward writes fresh gradients
        def run():
            x.grad = None
            for p in m.parameters():
                p.grad = None
        return run

    calls = {name: calibrate(phases(m), clock, reset(m)) for name, m in modules.items()}
    samples: Dict[str, List[List[float]]] = {name: [] for name in modules}  # per round: [forward, backward] ms
    counts: Dict[str, List[int]] = {name: [] for name in modules}
    names = list(modules)
    for i in range(rounds):  # interleaved, each round in another order: every method sees the same machine
        for name in names[i % len(names):] + names[:i % len(names)]:
            per_call, count = sample(phases(modules[name]), calls[name], clock, reset(modules[name]))
            samples[name].append(per_call)
            counts[name].append(count)
    results = []
    for name, m in modules.items():
        f, b = ([s[k] for s in samples[name]] for k in (0, 1))
        peak = float("nan")
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_mem = torch.cuda.memory_allocated()
            m(x).backward(dy)
            reset(m)()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
        stored = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
        results.append(Result(device.type, str(dtype).replace("torch.", ""), M, K, N, rank, name,
                              statistics.median(f), statistics.median(b),
                              statistics.median(a + c for a, c in zip(f, b)),
                              saved_mb=saved_bytes(m, x) / 2**20, peak_mb=peak, weights_mb=stored / 2**20,
                              rounds=rounds, calls=min(counts[name])))
    if "linear" in samples:
        # Each ratio is paired: method / floor within the same round, so the drift of a shared machine between
        # rounds cancels; the row keeps the median and the range over rounds.
        floor = samples["linear"]
        ratios = {kind: {} for kind in ("fwd", "bwd", "fwd+bwd")}
        for name, own in samples.items():
            ratios["fwd"][name] = [a[0] / b[0] for a, b in zip(own, floor)]
            ratios["bwd"][name] = [a[1] / b[1] for a, b in zip(own, floor)]
            ratios["fwd+bwd"][name] = [sum(a) / sum(b) for a, b in zip(own, floor)]
        flags = {kind: unranked(by_name) for kind, by_name in ratios.items()}
        for r in results:
            (r.forward_ratio, r.forward_ratio_min, r.forward_ratio_max) = spread(ratios["fwd"][r.method])
            (r.backward_ratio, r.backward_ratio_min, r.backward_ratio_max) = spread(ratios["bwd"][r.method])
            (r.fwd_bwd_ratio, r.fwd_bwd_ratio_min, r.fwd_bwd_ratio_max) = spread(ratios["fwd+bwd"][r.method])
            r.noisy = ",".join(kind for kind in ratios if flags[kind][r.method])
    return results


def bench_adapter_batch(batch: int, tokens: int, K: int, N: int, rank: int, counts, dtype, device, rounds: int):
    """Forward time of one batch whose rows use `count` different adapters, against the same batch with one
    adapter, measured in interleaved rounds (median and range of per-round ratios). Returns markdown rows."""
    from ..model.manage import adapter_batch

    torch.manual_seed(0)
    layer = LoLDULinear.from_base(nn.Linear(K, N, device=device, dtype=dtype), rank)
    for i in range(max(counts)):
        layer.set_named_adapter(f"a{i}", torch.randn(rank, device=device))
    x = torch.randn(batch, tokens, K, device=device, dtype=dtype)
    clock = Clock(device)
    forward = (lambda: layer(x),)
    lines = ["| adapters in the batch | batch x tokens | K x N | r | forward ms | ratio to one adapter (range) | "
             "noisy |", "|---:|---|---|---:|---:|---:|---|"]
    one = ["a0"] * batch
    for count in counts:
        names = {"one": one, "many": [f"a{i % count}" for i in range(batch)]}
        times: Dict[str, List[float]] = {"one": [], "many": []}
        with torch.no_grad():
            calls = {}
            for key, rows in names.items():
                with adapter_batch(layer_holder(layer), rows):
                    calls[key] = calibrate(forward, clock)
            for _ in range(rounds):
                for key, rows in names.items():
                    with adapter_batch(layer_holder(layer), rows):
                        times[key] += sample(forward, calls[key], clock)[0]
        ratios = {"one": [1.0] * rounds, "many": [a / b for a, b in zip(times["many"], times["one"])]}
        noisy = "1 round" if rounds < 2 else ("yes" if unranked(ratios)["many"] else "-")
        lines.append(f"| {count} | {batch} x {tokens} | {K} x {N} | {rank} | {statistics.median(times['many']):.3f} | "
                     f"{ratio_cell(*spread(ratios['many']))} | {noisy} |")
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
        return requested
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((gpu for gpu in GPU_PEAKS if gpu in name), None)
    return None


MARKDOWN_HEADER = ["| device | dtype | M | K | N | r | method | fwd ms | bwd ms | fwd+bwd ms | fwd x (range) | "
                   "bwd x (range) | fwd+bwd x (range) | noisy | rounds x calls | saved MB | peak MB | weights MB | "
                   "ideal floor ms | ideal LoLDU ms | ideal x |", "|" + "---|" * 21]


def _ms(value):
    return "-" if value != value else f"{value:.3f}"


def markdown(results: List[Result], header: bool = True) -> str:
    """The table; the ideal columns (fwd+bwd on the named GPU) are "-" where no GPU was named."""
    lines = list(MARKDOWN_HEADER) if header else []
    for r in results:
        lines.append(f"| {r.device} | {r.dtype} | {r.M} | {r.K} | {r.N} | {r.rank} | {r.method} | "
                     f"{r.forward_ms:.3f} | {r.backward_ms:.3f} | {r.fwd_bwd_ms:.3f} | "
                     f"{ratio_cell(r.forward_ratio, r.forward_ratio_min, r.forward_ratio_max)} | "
                     f"{ratio_cell(r.backward_ratio, r.backward_ratio_min, r.backward_ratio_max)} | "
                     f"{ratio_cell(r.fwd_bwd_ratio, r.fwd_bwd_ratio_min, r.fwd_bwd_ratio_max)} | "
                     f"{_noisy_column(r)} | {r.rounds} x {r.calls} | {r.saved_mb:.2f} | {r.peak_mb:.1f} | "
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
        rows = [next((r for r in results if (r.M, r.K, r.N, r.rank) == c and r.method == method), None)
                for c in cases]
        ratios = [r.fwd_bwd_ratio if r else float("nan") for r in rows]
        # error bars: the range of the per-round ratios
        low = [r.fwd_bwd_ratio - r.fwd_bwd_ratio_min if r else 0.0 for r in rows]
        high = [r.fwd_bwd_ratio_max - r.fwd_bwd_ratio if r else 0.0 for r in rows]
        ax.bar([i + j * width for i in range(len(cases))], ratios, width, yerr=[low, high], capsize=2, label=method)
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


def run_bench(args) -> List[Result]:
    """The layer table, or with args.adapter_counts the many-adapters batch; args as cli.parse_args leaves them
    (checked, defaults filled in)."""
    device, dtype = args.device, getattr(torch, args.dtype)
    out = Path(args.out)
    if args.adapter_counts:
        counts = args.adapter_counts
        K, N = ADAPTER_BATCH_SHAPE[device.type]
        lines = bench_adapter_batch(max(counts), 8, K, N, args.ranks[0], counts, dtype, device, args.repeats)
        table = "\n".join(lines)
        print(f"{machine(device)}; {args.dtype}, forward (no grad), 8 tokens per batch row, {args.repeats} "
              f"interleaved rounds")
        print(table)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_batch.md").write_text(table + "\n")
        return []
    wanted = args.methods or list(METHODS)
    gpu = gpu_name(device, args.gpu)
    if gpu:
        print(f"roofline columns: {gpu} ({GPU_PEAKS[gpu][args.dtype] / 1e12:.0f} TFLOP/s "
              f"{args.dtype}, {GPU_PEAKS[gpu]['bytes'] / 1e12:.2f} TB/s)")
    missing = [m for m in ("peft_lora", "peft_vera") if m in wanted and importlib.util.find_spec("peft") is None]
    if missing:
        print(f"note: peft is not installed; skipping the {', '.join(missing)} rows")
    print(f"{machine(device)}; {args.repeats} interleaved rounds; each sample times enough calls that its forward "
          f"and its backward each last {SAMPLE_MS[device.type]:g} ms or more")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    # Every case's rows go to the files as soon as they are measured: a run cut short keeps what it measured.
    with open(out / "bench.csv", "w", newline="") as csv_file, open(out / "bench.md", "w") as md_file:
        writer = csv.DictWriter(csv_file, fieldnames=[f.name for f in fields(Result)])
        writer.writeheader()
        md_file.write("\n".join(MARKDOWN_HEADER) + "\n")
        print("\n".join(MARKDOWN_HEADER), flush=True)  # the header once; each row once, as soon as it is measured
        cases = [(M, K, N, rank) for M, K, N in args.shapes for rank in args.ranks]
        with _progress(total=len(cases), desc="bench cases") as bar:
            for M, K, N, rank in cases:
                rank = min(K, N) if rank == "full" else rank
                case = bench_case(M, K, N, rank, dtype, device, wanted, args.repeats)
                if gpu:
                    floor, ideal = ideal_ms(M, K, N, rank, args.dtype, gpu)
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
