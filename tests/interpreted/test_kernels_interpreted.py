"""The kernels under the Triton interpreter: every route, dtype, odd shape and layout against float64, element
by element; poisoned outputs; the registered ops (torch.compile, opcheck); e exactly 0 at init.

bf16 tl.dot is wrong in the interpreter, so bf16 runs through an fp32 upcast here (UPCAST), and the
interpreter computes every tl.dot as an fp32 numpy matmul whatever input_precision says (tf32, tf32x3,
ieee alike): 3xTF32's own error is tested by emulation in tests/test_kernels.py and on GPU.
"""
import itertools

import pytest
import torch
from kernel_checks import NAN, mismatches, poison_intact, poisoned, references

from loldu_triton.core.formulas import shrink_dtype
import loldu_triton.kernels.launch as k
from loldu_triton.kernels import configs
from loldu_triton.core.formulas import delta_diagonal

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def layout(a, kind):
    """The same values with other strides: column-major, or every other column of a wider buffer."""
    if kind == "transposed":
        return a.t().contiguous().t()
    if kind == "strided":
        buf = torch.full((a.shape[0], 2 * a.shape[1]), NAN, dtype=a.dtype)
        buf[:, ::2] = a
        return buf[:, ::2]
    return a


def make_case(M, K, N, r, dtype, params_fp32, seed):
    g = torch.Generator().manual_seed(seed)
    pdt = torch.float32 if params_fp32 else dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    # Scaled so the base GEMM and the rank-r term are of the same size; e kept away from zero.
    e = (torch.randn(r, generator=g) + torch.where(torch.rand(r, generator=g) < 0.5, -0.5, 0.5)).float()
    return dict(x=rnd(M, K), weight=rnd(N, K, scale=K ** -0.5, dt=pdt), bias=rnd(N, dt=pdt),
                L=rnd(N, r, scale=r ** -0.5, dt=pdt), U=rnd(r, K, scale=K ** -0.5, dt=pdt), e=e, dy=rnd(M, N))


def _grid():
    cases = []
    for M, (K, N) in itertools.product((1, 37), ((45, 29), (130, 45), (29, 130))):
        for r in sorted({1, 5, 16, min(K, N)}):
            for dtype in DTYPES:
                cases.append((len(cases), M, K, N, r, dtype))
    return cases


CASES = _grid()


def _variant(i):
    """(x layout, dy layout, with bias, fp32 factors) of case i: cycles independent of the dtype (i % 3)."""
    j = i // 3
    kinds = ["contiguous", "transposed", "strided"]
    return kinds[j % 3], kinds[(j + 1) % 3], (i // 9) % 2 == 0, j % 2 == 1


def _id(case):
    i, M, K, N, r, dtype = case
    return f"{i}-M{M}-K{K}-N{N}-r{r}-{str(dtype).replace('torch.', '')}"


def test_grid_covers_shapes_dtypes_layouts_and_factor_dtypes():
    assert len(CASES) == 72
    assert {c[1] for c in CASES} == {1, 37}
    assert {c[5] for c in CASES} == set(DTYPES)
    variants = [(_variant(c[0]), c[5]) for c in CASES]
    for d in DTYPES:  # every layout, with and without bias, meets every dtype; fp32 factors every 2-byte one
        assert {v[0] for v, dt in variants if dt == d} == {"contiguous", "transposed", "strided"}
        assert {v[1] for v, dt in variants if dt == d} == {"contiguous", "transposed", "strided"}
        assert {v[2] for v, dt in variants if dt == d} == {True, False}
        assert {v[3] for v, dt in variants if dt == d} == {True, False}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_routes_match_float64_and_write_exactly_their_outputs(case):
    i, M, K, N, r, dtype = case
    x_layout, dy_layout, with_bias, params_fp32 = _variant(i)
    c = make_case(M, K, N, r, dtype, params_fp32, seed=1000 + i)
    bias = c["bias"] if with_bias else None
    x, dy = layout(c["x"], x_layout), layout(c["dy"], dy_layout)
    bad = []
    for route in ("side", "merged"):
        buf, y_out = poisoned(M, N, dtype)
        y, t = k.forward(x, c["weight"], bias, c["L"], c["U"], c["e"], route=route, y_out=y_out)
        assert y is y_out and (y.dtype, t.dtype, t.shape) == (dtype, shrink_dtype(dtype), (M, r))
        assert poison_intact(buf, y) == (True, True), route
        buf, dx_out = poisoned(M, K, dtype)
        dx, ge = k.backward(dy, t, c["weight"], c["L"], c["U"], c["e"], route=route, dx_out=dx_out)
        assert dx is dx_out and (dx.dtype, ge.dtype, ge.shape) == (dtype, torch.float32, (r,))
        assert poison_intact(buf, dx) == (True, True), route
        ref = references(c["x"], c["weight"], bias, c["L"], c["U"], c["e"], c["dy"], t)
        for name, out in (("y", y), ("t", t), ("dx", dx), ("grad_e", ge)):
            bad += mismatches(out, *ref[name], dtype, f"{route} {name}")
    buf, w_out = poisoned(N, K, c["weight"].dtype)
    w_eff = k.merge(c["weight"], c["L"], c["U"], c["e"], out=w_out)
    assert w_eff is w_out and poison_intact(buf, w_eff) == (True, True)
    bad += mismatches(w_eff, *ref["merge"], c["weight"].dtype, "merge")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_e_of_the_formula_is_exact_at_init_and_the_kernels_then_give_the_base(dtype):
    c = make_case(37, 45, 29, 5, dtype, False, seed=3)
    g = torch.Generator().manual_seed(4)
    s0, d0 = torch.tensor([0.8]), torch.randn(5, generator=g)
    e0 = delta_diagonal(d0.clone(), s0.clone(), d0, s0)
    assert torch.equal(e0, torch.zeros(5))
    args = (c["weight"], c["bias"], c["L"], c["U"])
    for route in ("side", "merged"):
        y0, _ = k.forward(c["x"], *args, e0, route=route)
        y_base, _ = k.forward(c["x"], *args, torch.zeros(5), route=route)
        assert torch.equal(y0, y_base), route
    with pytest.raises(ValueError, match="do not fit"):
        k.forward(c["x"], *args, torch.zeros(3))


def test_grad_e_sums_the_partials_of_every_m_tile():
    """M = 200 is 13 shrink tiles here: the backward GEMM adds up 13 rows of partials, over more columns (r = 40)
    than one program's share, and writes grad_e without a launch of its own."""
    assert configs.shrink_block_m(200) == 16
    c = make_case(200, 45, 41, 40, torch.float32, False, seed=9)
    for route in ("side", "merged"):
        _, t = k.forward(c["x"], c["weight"], None, c["L"], c["U"], c["e"], route=route)
        _, ge = k.backward(c["dy"], t, c["weight"], c["L"], c["U"], c["e"], route=route)
        ref = references(c["x"], c["weight"], None, c["L"], c["U"], c["e"], c["dy"], t)
        assert not mismatches(ge, *ref["grad_e"], torch.float32, route)


def test_registered_ops_compile_opcheck_and_match_the_out_path():
    c = make_case(37, 45, 29, 5, torch.float32, False, seed=7)
    args = (c["x"], c["weight"], c["bias"], c["L"], c["U"], c["e"])
    assert k.plan(37, 45, 29, 5, 4) == "side"
    y, t = k.forward(*args)
    y_s, t_s = k.forward(*args, route="side", y_out=torch.empty_like(y))
    dx, ge = k.backward(c["dy"], t, c["weight"], c["L"], c["U"], c["e"])
    dx_s, ge_s = k.backward(c["dy"], t, c["weight"], c["L"], c["U"], c["e"], route="side",
                            dx_out=torch.empty_like(dx))
    w = k.merge(c["weight"], c["L"], c["U"], c["e"])
    w_s = k.merge(c["weight"], c["L"], c["U"], c["e"], out=torch.empty_like(w))
    for a, b in [(y, y_s), (t, t_s), (dx, dx_s), (ge, ge_s), (w, w_s)]:
        assert torch.equal(a, b)

    def f(x, weight, bias, L, U, e, dy):
        y, t = k.forward(x, weight, bias, L, U, e)
        dx, ge = k.backward(dy, t, weight, L, U, e)
        return y, t, dx, ge, k.merge(weight, L, U, e)

    eager = f(*args, c["dy"])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*args, c["dy"])
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))

    for name, op_args in [("fwd", args + ("merged",)),
                          ("fwd", args + ("side", None)),
                          ("bwd", (c["dy"], t, c["weight"], c["L"], c["U"], c["e"], "side")),
                          ("merge", (c["weight"], c["L"], c["U"], c["e"]))]:
        report = torch.library.opcheck(getattr(torch.ops.loldu_triton, name).default, op_args)
        assert set(report.values()) == {"SUCCESS"}, (name, report)


def test_empty_batch_errors_and_strided_e():
    c = make_case(37, 45, 29, 5, torch.float32, False, seed=7)
    args = (c["x"], c["weight"], c["bias"], c["L"], c["U"], c["e"])
    y0, t0 = k.forward(c["x"][:0], *args[1:])
    dx0, ge0 = k.backward(c["dy"][:0], t0, c["weight"], c["L"], c["U"], c["e"])
    assert [tuple(y0.shape), tuple(t0.shape), tuple(dx0.shape), ge0.tolist()] == [(0, 29), (0, 5), (0, 45), [0.0] * 5]
    with pytest.raises(ValueError, match="route must be"):
        k.forward(*args, route="fast")
    with pytest.raises(TypeError, match="e must be float32"):
        k.forward(*args[:5], c["e"].double())
    with pytest.raises(ValueError, match="do not fit"):
        k.forward(c["x"], c["weight"], None, c["L"][:, :3], c["U"], c["e"])
    e_strided = torch.stack([c["e"], -c["e"]], 1).reshape(-1)[::2]  # the same values with stride 2
    assert torch.equal(k.forward(*args[:5], e_strided)[0], k.forward(*args)[0])
