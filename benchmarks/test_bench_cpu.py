"""CPU layer benchmark as a pytest-benchmark suite (not part of the tests): `make bench-pytest`.

Every case of a group is one method at the same shape; pytest-benchmark prints each one's time relative to the
fastest of the group, which is the frozen nn.Linear when LoLDU is within its target.
"""
import pytest
import torch

from loldu_triton.tools.peers import build_methods

SHAPES = [(2048, 1024, 1024, 16), (512, 1024, 1024, 64), (2048, 1024, 1024, 1024)]
METHODS = ["linear", "loldu", "loldu_unfused", "seed_param"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_forward_backward(benchmark, shape, method):
    M, K, N, r = shape
    benchmark.group = f"fwd+bwd float32 M={M} K={K} N={N} r={r}"
    module = build_methods(K, N, r, torch.float32, torch.device("cpu"), [method])[method]
    x = torch.randn(M, K, requires_grad=True)
    dy = torch.randn(M, N)

    def step():
        module(x).backward(dy)
        x.grad = None

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
