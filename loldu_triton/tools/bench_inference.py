"""Per-call cost without autograd (decode: M = 1 row a call): LoLDULinear unmerged against the frozen nn.Linear,
in interleaved rounds, each ratio the median of per-round ratios. A call of a small layer takes microseconds,
so each sample times as many calls as last timing.SAMPLE_MS (calibrated per layer)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn

from .timing import Clock, calibrate, machine, sample, spread, unranked
from ..layers.linear import LoLDULinear

HEADER = ["| M | K x N | r | dtype | nn.Linear us/call | LoLDULinear us/call | ratio | range over rounds | noisy | "
          "rounds x calls (nn.Linear, LoLDULinear) |", "|---:|---|---:|---|---:|---:|---:|---|---|---|"]


def bench_calls(M: int, K: int, N: int, rank: int, dtype, rounds: int) -> str:
    torch.manual_seed(0)
    base = nn.Linear(K, N, dtype=dtype)
    layer = LoLDULinear.from_linear(copy_of(base), rank)
    with torch.no_grad():  # a trained state, so no path can shortcut e == 0
        layer.d.mul_(1.01)
    x = torch.randn(M, K, dtype=dtype)
    clock = Clock(torch.device("cpu"))
    calls_of = {"linear": (lambda: base(x),), "loldu": (lambda: layer(x),)}
    times: Dict[str, List[float]] = {name: [] for name in calls_of}
    counts: Dict[str, List[int]] = {name: [] for name in calls_of}
    with torch.no_grad():
        calls = {name: calibrate(phases, clock) for name, phases in calls_of.items()}
        for _ in range(rounds):
            for name, phases in calls_of.items():
                per_call, count = sample(phases, calls[name], clock)
                times[name] += per_call
                counts[name].append(count)
    ratios = {"linear": [1.0] * rounds, "loldu": [b / a for a, b in zip(times["linear"], times["loldu"])]}
    ratio, low, high = spread(ratios["loldu"])
    noisy = "1 round" if rounds < 2 else ("yes" if unranked(ratios)["loldu"] else "-")
    return (f"| {M} | {K} x {N} | {rank} | {str(dtype).replace('torch.', '')} | "
            f"{1e3 * statistics.median(times['linear']):.2f} | {1e3 * statistics.median(times['loldu']):.2f} | "
            f"{ratio:.3f} | {low:.3f}-{high:.3f} | {noisy} | "
            f"{rounds} x {min(counts['linear'])}, {min(counts['loldu'])} |")


def copy_of(linear: nn.Linear) -> nn.Linear:
    other = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype=linear.weight.dtype)
    other.load_state_dict(linear.state_dict())
    return other


def run_inference_bench(args) -> List[str]:
    """args as cli.parse_args leaves them (checked, defaults filled in)."""
    dtype = getattr(torch, args.dtype)
    lines = []
    print(f"{machine(torch.device('cpu'))}; forward without autograd (torch.no_grad), per call; {args.repeats} "
          f"interleaved rounds")
    print("\n".join(HEADER), flush=True)
    for M, K, N in args.shapes:
        for rank in args.ranks:
            lines.append(bench_calls(M, K, N, min(K, N) if rank == "full" else rank, dtype, args.repeats))
            print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.md").write_text("\n".join(HEADER + lines) + "\n")
    print(f"wrote {out / 'inference.md'}")
    return lines
