"""Time to add LoLDU to LLaMA-7B's layer shapes on this CPU, against the LAPACK floor of the same work.

    PYTHONPATH=. python benchmarks/adapt_time.py [--rounds 3] [--ranks 1024 full] [--out FILE] [--before FILE]

``--before FILE``: also time add LoLDU with another version of ``loldu_triton/factors/factorize.py`` (say
``git show 38c3fc3:loldu_triton/factors/factorize.py > /tmp/factorize_before.py``), in the same rounds.

For each shape (out x in) of LLaMA-7B (4096x4096: q/k/v/o; 11008x4096: gate, up; 4096x11008: down), bf16
weights, and each rank: the time of ``LoLDULinear.from_linear(layer, rank)`` (what add_loldu does per layer:
factors, initial diagonal, buffers in the layer's dtype), and in the same run the floor: float64
``torch.linalg.lu_factor`` of the first ``rank`` columns plus the unit-triangular solve that gives the other
columns of U's pivot rows. Medians of interleaved rounds (each variant once per round). The whole-model estimate
is 32 layers x (4 x 4096x4096 + 2 x 11008x4096 + 4096x11008).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import sys
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

import loldu_triton.layers.state as state
from loldu_triton import LoLDULinear

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
PER_LAYER = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}  # of one LLaMA-7B decoder layer
LAYERS = 32


def floor(weight: torch.Tensor, rank: int) -> None:
    """LAPACK's share: LU of the first rank columns (float64) and the triangular solve for U's other columns."""
    cols = weight[:, :rank].to(torch.float64)
    lu, piv = torch.linalg.lu_factor(cols)
    if weight.shape[1] > rank:
        rows = piv[:rank].long() - 1  # (not the exact permutation; the same amount of work)
        rest = weight[rows, rank:].to(torch.float64)
        torch.linalg.solve_triangular(lu[:rank], rest, upper=False, unitriangular=True)


def adapt(linear: nn.Linear, rank: int) -> None:
    LoLDULinear.from_linear(linear, rank)


def load_before(path: Path):
    """ldu_factors of another factorize.py, loaded inside the package (its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location("loldu_triton.factors.factorize_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return lambda weight, rank, name="weight", pivots=None, dtype=None: module.ldu_factors(weight, rank, name)


@contextlib.contextmanager
def factorizer(fn):
    saved = state.ldu_factors
    state.ldu_factors = fn
    try:
        yield
    finally:
        state.ldu_factors = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", nargs="+", default=["1024", "full"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--before", type=Path, default=None)
    args = parser.parse_args()
    before = load_before(args.before) if args.before else None
    lines = [f"# adapt time, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 weights, {args.rounds} rounds",
             f"load average {os.getloadavg()[0]:.1f} at the start", "",
             "| shape (out x in) | rank | add LoLDU (s) | LAPACK floor (s) | ratio |"
             + (" before: add LoLDU (s) | before: ratio |" if before else ""),
             "|---|---|---|---|---|" + ("---|---|" if before else "")]
    print("\n".join(lines), flush=True)
    totals = {}
    for out_f, in_f in SHAPES:
        gen = torch.Generator().manual_seed(out_f + in_f)
        linear = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.02)
        for rank_arg in args.ranks:
            rank = min(out_f, in_f) if rank_arg == "full" else int(rank_arg)
            variants = {"adapt": lambda: adapt(linear, rank), "floor": lambda: floor(linear.weight, rank)}
            if before:
                def adapt_before():
                    with factorizer(before):
                        adapt(linear, rank)
                variants["before"] = adapt_before
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            a, f = statistics.median(times["adapt"]), statistics.median(times["floor"])
            totals.setdefault(rank_arg, [0.0, 0.0])
            totals[rank_arg][0] += a * PER_LAYER[(out_f, in_f)] * LAYERS
            totals[rank_arg][1] += f * PER_LAYER[(out_f, in_f)] * LAYERS
            row = f"| {out_f}x{in_f} | {rank_arg} ({rank}) | {a:.3f} | {f:.3f} | {a / f:.2f}x |"
            if before:
                b = statistics.median(times["before"])
                row += f" {b:.3f} | {b / f:.2f}x |"
                totals[rank_arg][2:] = [(totals[rank_arg][2:] or [0.0])[0] + b * PER_LAYER[(out_f, in_f)] * LAYERS]
            lines.append(row)
            print(row, flush=True)
    lines += ["", "Whole LLaMA-7B (32 x (q, k, v, o, gate, up, down)), estimated from the medians:", ""]
    for rank_arg, (a, f, *b) in totals.items():
        was = f"; before: {b[0]:.0f} s ({b[0] / f:.2f}x)" if b else ""
        lines.append(f"- rank {rank_arg}: add LoLDU {a:.0f} s, LAPACK floor {f:.0f} s ({a / f:.2f}x){was}")
    print("\n".join(lines[-len(totals):]), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
