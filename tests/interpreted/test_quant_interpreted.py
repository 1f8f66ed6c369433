"""The kernels reading a quantized base (int8, fp8 e4m3 values with a float32 scale per row), under the
Triton interpreter: against the dequantized float64 weight, element by element."""
import pytest
import torch
import torch.nn as nn
from kernel_checks import assert_float64_close, float64_copy, mismatches, references

import loldu_triton.kernels.launch as k
from loldu_triton import LoLDULinear
from loldu_triton.factors.quant import dequantize, quantize_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_kernels_dequantize_the_base_inside(kind, dtype):
    torch.manual_seed(0)
    M, K, N, r = 37, 45, 29, 5
    q, sc = quantize_weight(torch.randn(N, K), kind)
    W = dequantize(q, sc, torch.float64)
    x, dy = torch.randn(M, K).to(dtype), torch.randn(M, N).to(dtype)
    L, U, b, e = torch.randn(N, r).to(dtype), torch.randn(r, K).to(dtype), torch.randn(N).to(dtype), torch.randn(r)
    bad = []
    for route in ("side", "merged"):
        y_out = torch.full((M, N), float("nan"), dtype=dtype)
        y, t = k.forward(x, q, b, L, U, e, route=route, weight_scale=sc, y_out=y_out)
        dx, ge = k.backward(dy, t, q, L, U, e, route=route, weight_scale=sc)
        ref = references(x, W, b, L, U, e, dy, t)
        for name, out in (("y", y), ("t", t), ("dx", dx), ("grad_e", ge)):
            bad += mismatches(out, *ref[name], dtype, f"{route} {name}")
    bad += mismatches(k.merge(q, L, U, e, weight_scale=sc), *ref["merge"], dtype, "merge")
    assert not bad, "\n".join(bad)


def _step(m, x):
    x = x.requires_grad_(True)
    m(x).pow(2).sum().backward()
    return m(x).detach(), x.grad, m.d.grad


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_layer_trains_like_the_torch_path(kind):
    for backend in ("torch", "triton"):  # each against a float64 run on the same quantized base
        torch.manual_seed(1)
        m = LoLDULinear.from_linear(nn.Linear(45, 29), 5, backend=backend)
        m.quantize_base(kind)
        with torch.no_grad():
            m.d.mul_(1.3)
        x = torch.randn(3, 7, 45)
        reference = (float64_copy(m), x.double())
        assert_float64_close(_step(m, x), _step, *reference, name=f"{kind} {backend}")
