"""Per-call cost without autograd (decode: M = 1 row a call): LoLDULinear unmerged against the frozen nn.Linear,
in interleaved rounds, each ratio the median of per-round ratios. A call of a small layer takes microseconds,
so each sample times a loop of calls."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import List

import torch
import torch.nn as nn

from .layer import LoLDULinear

HEADER = ["| M | K x N | r | dtype | nn.Linear us/call | LoLDULinear us/call | ratio | range over rounds |",
          "|---:|---|---:|---|---:|---:|---:|---|"]


def _per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - start) / calls


def bench_calls(M: int, K: int, N: int, rank: int, dtype, repeats: int, calls: int = 2000) -> str:
    torch.manual_seed(0)
    base = nn.Linear(K, N, dtype=dtype)
    layer = LoLDULinear.from_linear(copy_of(base), rank)
    with torch.no_grad():  # a trained state, so no path can shortcut e == 0
        layer.d.mul_(1.01)
    x = torch.randn(M, K, dtype=dtype)
    lin_t, loldu_t, ratios = [], [], []
    with torch.no_grad():
        for fn in (lambda: base(x), lambda: layer(x)):  # warm up
            _per_call_us(fn, calls // 4)
        for _ in range(repeats):
            a = _per_call_us(lambda: base(x), calls)
            b = _per_call_us(lambda: layer(x), calls)
            lin_t.append(a)
            loldu_t.append(b)
            ratios.append(b / a)
    return (f"| {M} | {K} x {N} | {rank} | {str(dtype).replace('torch.', '')} | {statistics.median(lin_t):.2f} | "
            f"{statistics.median(loldu_t):.2f} | {statistics.median(ratios):.3f} | "
            f"{min(ratios):.3f}-{max(ratios):.3f} |")


def copy_of(linear: nn.Linear) -> nn.Linear:
    other = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype=linear.weight.dtype)
    other.load_state_dict(linear.state_dict())
    return other


def run_inference_bench(args) -> List[str]:
    dtype = getattr(torch, args.dtype or "float32")
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in (args.shapes or "1x64x64").split(",")]
    lines = []
    print("forward without autograd (torch.no_grad), CPU, per call")
    print("\n".join(HEADER), flush=True)
    for M, K, N in shapes:
        for rank_text in (args.ranks or "16,full").split(","):
            rank = min(K, N) if rank_text == "full" else int(rank_text)
            lines.append(bench_calls(M, K, N, rank, dtype, args.repeats or 21))
            print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.md").write_text("\n".join(HEADER + lines) + "\n")
    print(f"wrote {out / 'inference.md'}")
    return lines
