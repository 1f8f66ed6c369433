import warnings

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_checks import assert_linear_close
from loldu_triton import LoLDULinear

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def layer_cases(draw):
    in_f = draw(st.integers(1, 24))
    out_f = draw(st.integers(1, 24))
    rank = draw(st.integers(1, min(in_f, out_f)))
    dtype = draw(st.sampled_from(DTYPES))
    weight_kind = draw(st.sampled_from(["randn", "zeros", "low_rank", "tiny", "huge_range"]))
    leading = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    init = draw(st.sampled_from(["lu", "uniform", "normal", "constant"]))
    seed = draw(st.integers(0, 2**16))
    return in_f, out_f, rank, dtype, weight_kind, tuple(leading), init, seed


def make_weight(kind, out_f, in_f, gen):
    if kind == "zeros":
        return torch.zeros(out_f, in_f)
    if kind == "low_rank":
        return torch.randn(out_f, 1, generator=gen) @ torch.randn(1, in_f, generator=gen)
    if kind == "tiny":
        return torch.randn(out_f, in_f, generator=gen) * 1e-30
    if kind == "huge_range":
        return torch.randn(out_f, in_f, generator=gen) * torch.logspace(-6, 1, in_f)
    return torch.randn(out_f, in_f, generator=gen)


@settings(max_examples=150)
@given(layer_cases())
def test_any_shape_rank_dtype_and_weight_never_gives_nan_and_matches_float64(case):
    in_f, out_f, rank, dtype, kind, leading, init, seed = case
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.copy_(make_weight(kind, out_f, in_f, gen))
    base = base.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank-deficient kinds warn by design
        layer = LoLDULinear.from_linear(base, rank, init=init)
    for t in (layer.L, layer.U, layer.d0):
        assert torch.isfinite(t).all()
    x = torch.randn(*leading, in_f, generator=gen).to(dtype)
    assert torch.equal(layer(x), base(x))  # identical at init
    with torch.no_grad():
        layer.d.add_(torch.randn(rank, generator=gen))
        layer.s.mul_(1.25)
    x.requires_grad_(True)
    y = layer(x)
    y.float().sum().backward()
    for t in (y, x.grad, layer.d.grad, layer.s.grad):
        assert torch.isfinite(t).all()
    assert_linear_close(y, x, base.weight, base.bias, layer.L, layer.U, layer.delta_diagonal())
