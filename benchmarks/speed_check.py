"""The CPU speed targets of the redesign, in one process: LoLDULinear's forward + backward over the frozen
nn.Linear's (M=2048, K=N=1024, fp32, r = 16, 256 and full) and an unmerged 64x64 layer at M=1 without grad over
nn.Linear. Uses only LoLDULinear.from_linear, so the same script times any version of the package: run it
alternately against two checkouts (PYTHONPATH=CHECKOUT python benchmarks/speed_check.py) to compare them.

Each sample times enough calls to last SAMPLE_S; rounds alternate the two layers and the ratio is taken per
round; the median and the range over rounds are printed."""
import argparse
import statistics
import time

import torch
import torch.nn as nn

import loldu_triton
from loldu_triton import LoLDULinear

SAMPLE_S = 0.05


def timed(step, calls):
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def calls_for(step):
    calls = 1
    while timed(step, calls) * calls < SAMPLE_S:
        calls *= 2
    return calls


def ratio(floor_step, step, rounds):
    floor_calls, calls = calls_for(floor_step), calls_for(step)
    ratios = []
    for i in range(rounds):
        pair = [(floor_step, floor_calls), (step, calls)]
        if i % 2:
            pair.reverse()
        t = {id(f): timed(f, n) for f, n in pair}
        ratios.append(t[id(step)] / t[id(floor_step)])
    return statistics.median(ratios), min(ratios), max(ratios)


def train_step(layer, x):
    def step():
        layer(x).sum().backward()
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"loldu_triton from {loldu_triton.__file__}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = nn.Linear(1024, 1024)
    x = torch.randn(2048, 1024, requires_grad=True)
    for rank in (16, 256, 1024):
        layer = LoLDULinear.from_linear(base, rank)
        with torch.no_grad():
            layer.d.mul_(1.01)  # off its init
        med, lo, hi = ratio(train_step(base, x), train_step(layer, x), args.rounds)
        print(f"M=2048 K=N=1024 fp32 r={rank}: fwd+bwd {med:.3f}x nn.Linear (range {lo:.3f}-{hi:.3f})")
    small = nn.Linear(64, 64)
    layer = LoLDULinear.from_linear(small, 16)
    x1 = torch.randn(1, 64)
    with torch.no_grad():
        layer.d.mul_(1.01)
        med, lo, hi = ratio(lambda: small(x1), lambda: layer(x1), args.rounds)
    print(f"64x64 r=16 M=1 no grad: {med:.3f}x nn.Linear (range {lo:.3f}-{hi:.3f})")


if __name__ == "__main__":
    main()
