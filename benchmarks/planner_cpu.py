"""Measure the planner's CPU decisions on this machine (the PyTorch path, float32) and fit BYTE_FLOPS["cpu"].

    PYTHONPATH=. python benchmarks/planner_cpu.py [--rounds 7] [--out benchmarks/results/planner-cpu.md]

1. One GEMM, side against merged (planner.plan): forward times of both routes over a sweep of rows M, for a few
   (K, N, r); where merged starts to win.
2. A whole training step (fwd + bwd, x and e needing gradients) at M = 2048, K = N = 1024 for each rank, with
   every StepPlan forced: the fastest against the planner's pick.
3. The fit: for each candidate BYTE_FLOPS["cpu"], the time lost where the planner's pick (1 and 2) is not the
   fastest measured; the candidate that loses least.

Times are medians of interleaved rounds (every variant once per round), so the drift of a shared machine hits
all variants alike.
"""
from __future__ import annotations

import argparse
import statistics
import time
from datetime import date
from pathlib import Path

import torch

import loldu_triton.ops.function as function
from loldu_triton import ldu_factors, loldu_linear
from loldu_triton.factors import planner
from loldu_triton.factors.planner import StepPlan

GEMM_CASES = [(1024, 1024, 16), (1024, 1024, 256), (1024, 4096, 64), (4096, 1024, 64)]
GEMM_ROWS = [64, 256, 512, 1024, 2048, 4096]
STEP_RANKS = [16, 64, 256, 512, 768, 1024]
STEP_PLANS = [StepPlan(f, b, g, k) for f in ("side", "merged") for b in ("side", "merged")
              for g in ("shrink", "outer") for k in ((False, True) if f == b == "merged" else (False,))]
CANDIDATES = [0.5, 1, 2, 3, 5, 8, 12, 20, 30, 50]


def operands(M, K, N, r):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g) / K ** 0.5
    f = ldu_factors(W, r)
    return (torch.randn(M, K, generator=g), W, torch.randn(N, generator=g), f.L.float(), f.U.float(),
            0.1 * torch.randn(r, generator=g))


def timed(fn):
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def interleaved(variants, rounds):
    """{name: median ms} over rounds in which every variant runs once."""
    for fn in variants.values():
        fn()
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(v) for name, v in samples.items()}


def gemm_sweep(rounds):
    rows = []
    for K, N, r in GEMM_CASES:
        for M in GEMM_ROWS:
            x, W, b, L, U, e = operands(M, K, N, r)
            ms = interleaved({route: (lambda route=route: function.torch_forward(x, W, b, L, U, e, None, route))
                              for route in ("side", "merged")}, rounds)
            rows.append((M, K, N, r, ms["side"], ms["merged"]))
            print(f"GEMM M={M} K={K} N={N} r={r}: side {ms['side']:.2f} ms, merged {ms['merged']:.2f} ms", flush=True)
    return rows


def step_sweep(rounds, M=2048, K=1024, N=1024):
    rows = []
    for r in STEP_RANKS:
        x, W, b, L, U, e = operands(M, K, N, r)
        x.requires_grad_(True)
        e.requires_grad_(True)
        dy = torch.randn(M, N)

        def run(step):
            function.plan_step = lambda *a, _s=step: _s
            loldu_linear(x, W, b, L, U, e, backend="torch").backward(dy)
            x.grad = e.grad = None

        real = function.plan_step
        try:
            ms = interleaved({step: (lambda step=step: run(step)) for step in STEP_PLANS}, rounds)
        finally:
            function.plan_step = real
        rows.append((M, K, N, r, ms))
        best = min(ms, key=ms.get)
        print(f"step M={M} K=N={K} r={r}: fastest {_name(best)} {ms[best]:.1f} ms; planner "
              f"{_name(real(M, K, N, r, 4, 'cpu', False))} {ms[real(M, K, N, r, 4, 'cpu', False)]:.1f} ms",
              flush=True)
    return rows


def _name(step):
    return f"{step.forward}/{step.backward}/{step.grad_e}" + ("/keep" if step.keep_merged else "")


def regret(byte_flops, gemm_rows, step_rows):
    """ms lost where the planner with this constant picks other than the fastest measured (1 and 2)."""
    saved = planner.BYTE_FLOPS["cpu"]
    planner.BYTE_FLOPS["cpu"] = byte_flops
    planner.plan.cache_clear()
    planner.plan_step.cache_clear()
    try:
        lost_gemm = sum((side if planner.plan(M, K, N, r, 4, "cpu", False) == "side" else merged) - min(side, merged)
                        for M, K, N, r, side, merged in gemm_rows)
        lost_step = sum(ms[planner.plan_step(M, K, N, r, 4, "cpu", False)] - min(ms.values())
                        for M, K, N, r, ms in step_rows)
    finally:
        planner.BYTE_FLOPS["cpu"] = saved
        planner.plan.cache_clear()
        planner.plan_step.cache_clear()
    return lost_gemm, lost_step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = parser.parse_args()
    torch.manual_seed(0)
    gemm_rows = gemm_sweep(args.rounds)
    step_rows = step_sweep(args.rounds)
    fits = {c: regret(c, gemm_rows, step_rows) for c in CANDIDATES}
    best = min(fits, key=lambda c: (sum(fits[c]), c))
    lines = [f"# Planner constants on the CPU, {date.today()}", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, PyTorch path. Command:", "",
             f"    PYTHONPATH=. python benchmarks/planner_cpu.py --rounds {args.rounds}", "",
             "## 1. One GEMM: side against merged (forward, ms, medians of interleaved rounds)", "",
             "| M | K | N | r | side | merged | faster | planner (current constants) |", "|---:|---:|---:|---:|---:|---:|---|---|"]
    for M, K, N, r, side, merged in gemm_rows:
        lines.append(f"| {M} | {K} | {N} | {r} | {side:.2f} | {merged:.2f} | {'side' if side <= merged else 'merged'} "
                     f"| {planner.plan(M, K, N, r, 4, 'cpu', False)} |")
    lines += ["", "## 2. Training step at M = 2048, K = N = 1024 (fwd + bwd, ms) for every StepPlan", "",
              "| r | " + " | ".join(_name(s) for s in STEP_PLANS) + " | planner (current) |",
              "|---:|" + "---:|" * len(STEP_PLANS) + "---|"]
    for M, K, N, r, ms in step_rows:
        best_ms = min(ms.values())
        lines.append(f"| {r} | " + " | ".join(("**%.1f**" if ms[s] == best_ms else "%.1f") % ms[s] for s in STEP_PLANS)
                     + f" | {_name(planner.plan_step(M, K, N, r, 4, 'cpu', False))} |")
    lines += ["", "## 3. Fit of BYTE_FLOPS[\"cpu\"]: ms lost to the planner's wrong picks in 1 and 2", "",
              "| BYTE_FLOPS | lost in 1 | lost in 2 | total |", "|---:|---:|---:|---:|"]
    for c, (g, s) in fits.items():
        lines.append(f"| {c:g} | {g:.1f} | {s:.1f} | {g + s:.1f} |")
    lines += ["", f"Least lost: BYTE_FLOPS[\"cpu\"] = {best:g} (in use: {planner.BYTE_FLOPS['cpu']:g})."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
