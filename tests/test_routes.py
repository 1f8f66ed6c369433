"""Every route of a training step (loldu_triton.factors.planner.StepPlan) against a float64 reference, element by element,
with and without grad, and its double backward (gradgradcheck in float64); what each route keeps for backward;
the planner's choices. No timings: speed is the benchmark's business."""
import pytest
import torch
import torch.nn.functional as F

import loldu_triton.ops.function as function
from loldu_triton import ldu_factors, loldu_linear
from loldu_triton.factors.planner import SIDE_STEP, StepPlan, plan, plan_step

from kernel_checks import EPS, assert_close

STEPS = [
    SIDE_STEP,
    StepPlan("merged", "merged", "shrink", False),
    StepPlan("merged", "merged", "shrink", True),
    StepPlan("merged", "merged", "outer", True),
    StepPlan("merged", "merged", "outer", False),
    StepPlan("side", "merged", "outer", False),
    StepPlan("merged", "side", "shrink", False),
    StepPlan("side", "side", "outer", False),
]
STEP_IDS = ["{}-{}-{}{}".format(s.forward, s.backward, s.grad_e, "-keep" if s.keep_merged else "") for s in STEPS]


@pytest.fixture
def force_step(monkeypatch):
    """Make every call take ``step`` (with its backward and grad_e parts dropped where they are not wanted)."""
    def force(step):
        def forced(M, K, N, r, itemsize, device_type, fused, need_dx, need_grad_e):
            return step._replace(backward=step.backward if need_dx else None,
                                 grad_e=step.grad_e if need_grad_e else None,
                                 keep_merged=step.keep_merged and need_dx)
        monkeypatch.setattr(function, "plan_step", forced)
    return force


def operands(M=37, K=21, N=13, r=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    f = ldu_factors(W, r)
    e = torch.randn(r, generator=g, dtype=torch.float32)  # a trained e, not the zero of init
    b = torch.randn(N, generator=g, dtype=torch.float64)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, W, b, f.L, f.U)] + [e]


def reference(x, W, b, L, U, e, dy):
    """y, dX and grad_e in float64, and each one's scale: the same products on absolute values."""
    x, W, b, L, U, e, dy = (t.detach().double() for t in (x, W, b, L, U, e, dy))
    e = e.requires_grad_(True)
    x = x.requires_grad_(True)
    y = x @ (W + (L * e) @ U).T + b
    y.backward(dy)
    dx, ge, x, e = x.grad, e.grad, x.detach(), e.detach()
    w_abs = W.abs() + (L.abs() * e.abs()) @ U.abs()
    scale_ge = ((dy.abs() @ L.abs()) * (x.abs() @ U.abs().T)).sum(0)  # also bounds diag(|L|^T |dY|^T |x| |U|^T)
    return (y.detach(), x.abs() @ w_abs.T + b.abs()), (dx, dy.abs() @ w_abs), (ge, scale_ge)


@pytest.mark.parametrize("step", STEPS, ids=STEP_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_route_matches_float64_with_and_without_grad(force_step, step, dtype):
    force_step(step)
    x, W, b, L, U, e = operands(dtype=dtype)
    dy = torch.randn(x.shape[0], W.shape[0], dtype=torch.float64).to(dtype)
    (y64, y_scale), (dx64, dx_scale), (ge64, ge_scale) = reference(x, W, b, L, U, e, dy)
    M, K, N, r = x.shape[0], x.shape[1], W.shape[0], e.shape[0]
    with torch.no_grad():
        y0 = loldu_linear(x, W, b, L, U, e, backend="torch")
    assert_close(y0, y64, y_scale, K + r, dtype, "y without grad")
    xg = x.clone().requires_grad_(True)
    eg = e.clone().requires_grad_(True)
    y = loldu_linear(xg, W, b, L, U, eg, backend="torch")
    assert y.dtype == dtype and eg.dtype == torch.float32
    assert_close(y, y64, y_scale, K + r, dtype, "y")
    y.backward(dy)
    assert xg.grad.dtype == dtype and eg.grad.dtype == torch.float32
    assert_close(xg.grad, dx64, dx_scale, N + r, dtype, "dX")
    ge_dtype = dtype if EPS[dtype] > EPS[torch.float32] else torch.float32  # grad_e is float32, as e is
    assert_close(eg.grad, ge64, ge_scale, M + N + K, ge_dtype, "grad_e")
    # a first layer: no dX wanted, grad_e alone
    eg.grad = None
    loldu_linear(x, W, b, L, U, eg, backend="torch").backward(dy)
    assert_close(eg.grad, ge64, ge_scale, M + N + K, ge_dtype, "grad_e without dX")


@pytest.mark.parametrize("step", STEPS, ids=STEP_IDS)
def test_every_route_passes_gradgradcheck_in_float64(force_step, step):
    force_step(step)
    x, W, b, L, U, e = operands(M=6, K=5, N=4, r=3, dtype=torch.float64)
    x.requires_grad_(True)
    e = e.double().requires_grad_(True)

    def fn(x, e):
        return torch.tanh(loldu_linear(x, W, b, L, U, e, backend="torch"))

    assert torch.autograd.gradcheck(fn, (x, e))
    assert torch.autograd.gradgradcheck(fn, (x, e))
    # the first layer's case: only e needs a gradient (x is data), its gradient of a gradient reaches x
    x0 = x.detach()
    assert torch.autograd.gradgradcheck(lambda e: fn(x0, e), (e,))


@pytest.mark.parametrize("step", STEPS, ids=STEP_IDS)
def test_every_route_gives_every_input_its_gradient(force_step, step):
    """The frozen weight, bias and factors too (a caller may train them): against autograd of the dense form."""
    force_step(step)
    inputs = operands(M=6, K=5, N=4, r=3, dtype=torch.float64)
    inputs[-1] = inputs[-1].double()
    for t in inputs:
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: loldu_linear(*a, backend="torch"), inputs)


def saved_by(step, force_step, M, K, N, r, x_grad=True):
    force_step(step)
    x, W, b, L, U, e = operands(M, K, N, r)
    x.requires_grad_(x_grad)
    e.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = loldu_linear(x, W, b, L, U, e, backend="torch")
    y.sum().backward()
    own = {t.data_ptr() for t in (W, b, L, U, e)}
    return sorted(tuple(t.shape) for t in saved if t.data_ptr() not in own)


def test_what_each_route_keeps_for_backward(force_step):
    M, K, N, r = 37, 21, 13, 5
    assert saved_by(SIDE_STEP, force_step, M, K, N, r) == [(M, r)]  # t alone
    assert saved_by(StepPlan("merged", "merged", "shrink", False), force_step, M, K, N, r) == [(M, r)]
    assert saved_by(StepPlan("merged", "merged", "shrink", True), force_step, M, K, N, r) == [(N, K), (M, r)]
    assert saved_by(StepPlan("merged", "merged", "outer", True), force_step, M, K, N, r) == sorted([(M, K), (N, K)])
    assert saved_by(StepPlan("merged", "merged", "outer", False), force_step, M, K, N, r, x_grad=False) == [(M, K)]


def test_the_outer_route_never_computes_t(force_step, monkeypatch):
    force_step(StepPlan("merged", "merged", "outer", True))
    x, W, b, L, U, e = operands()
    x.requires_grad_(True)
    e.requires_grad_(True)
    shrinks = []
    real_linear = F.linear
    monkeypatch.setattr(function.F, "linear", lambda a, w, *rest: shrinks.append(w is U) or real_linear(a, w, *rest))
    y, t = function.LoLDULinearFunction.apply(x, W, b, L, U, e, None, None, "torch")
    y.sum().backward()
    assert t is None and not any(shrinks) and x.grad is not None and e.grad is not None


def test_at_init_every_route_gives_the_base_output(force_step):
    for step in STEPS:
        force_step(step)
        x, W, b, L, U, e = operands()
        e = torch.zeros_like(e).requires_grad_(True)
        # side: the rank-r term is exactly zero; merged: W + L diag(0) U is W itself
        assert torch.equal(loldu_linear(x, W, b, L, U, e, backend="torch"), F.linear(x, W, b)), step


def test_planner_picks_the_high_rank_routes_on_cpu():
    """The issue's shapes (M=2048, K=N=1024, fp32, CPU): merged both ways with W_eff kept; grad_e from
    dY^T x at full rank, from the two M x r GEMMs at r = 256."""
    full = plan_step(2048, 1024, 1024, 1024, 4, "cpu", False)
    assert full == StepPlan("merged", "merged", "outer", True)
    assert plan_step(2048, 1024, 1024, 256, 4, "cpu", False) == StepPlan("merged", "merged", "shrink", True)
    assert plan_step(2048, 1024, 1024, 1024, 4, "cpu", False, need_dx=False) == StepPlan("merged", None, "outer", False)
    assert plan_step(1, 1024, 1024, 1024, 4, "cpu", False) == SIDE_STEP  # decode: never a pass over W
    # W_eff is kept only where it is no larger than x (N <= M), which LoRA keeps too, and saves a merge worth
    # 1/32 of the GEMMs: not at r = 16 or 64 here
    assert not plan_step(512, 4096, 4096, 1024, 4, "cpu", False).keep_merged
    assert [plan_step(2048, 1024, 1024, r, 4, "cpu", False).keep_merged for r in (16, 64, 128)] == [False, False, True]
    for M in (2 ** p for p in range(15)):
        step = plan_step(M, 1024, 1024, 256, 4, "cpu", False)
        assert not step.keep_merged or (step.forward == step.backward == "merged" and 1024 <= M)


def test_plan_step_agrees_with_plan_where_nothing_couples_the_passes():
    """With grad_e from t (shrink) and W_eff not kept, each GEMM's route is plan()'s."""
    for M, K, N, r in ((3, 40, 30, 4), (200, 12, 10, 4), (2048, 1024, 1024, 16), (64, 4096, 11008, 64)):
        for device, fused in (("cpu", False), ("cuda", True)):
            step = plan_step(M, K, N, r, 4, device, fused)
            if step.grad_e == "shrink" and not step.keep_merged:
                assert step.forward == plan(M, K, N, r, 4, device, fused)
                assert step.backward == plan(M, N, K, r, 4, device, fused)


def test_kept_w_eff_is_built_once_per_step(force_step, monkeypatch):
    built = []
    real_merge = function.merged_weight
    monkeypatch.setattr(function, "merged_weight", lambda *a: built.append(1) or real_merge(*a))
    for step, merges in ((StepPlan("merged", "merged", "shrink", True), 1),
                         (StepPlan("merged", "merged", "outer", True), 1),
                         (StepPlan("merged", "merged", "shrink", False), 2)):
        force_step(step)
        built.clear()
        x, W, b, L, U, e = operands()
        x.requires_grad_(True)
        e.requires_grad_(True)
        loldu_linear(x, W, b, L, U, e, backend="torch").sum().backward()
        assert len(built) == merges, step
    # under create_graph the kept W_eff (no graph to e) is not used: backward builds it from e again
    built.clear()
    force_step(StepPlan("merged", "merged", "outer", True))
    y = loldu_linear(x, W, b, L, U, e, backend="torch")
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    assert len(built) == 2 and gx.requires_grad


INTERPRETED_WORKER = r'''
import json, torch
import loldu_triton.ops.function as function
import loldu_triton.kernels.launch as kernels
from kernel_checks import mismatches, references
from loldu_triton import ldu_factors, loldu_linear
from loldu_triton.factors.planner import StepPlan

calls = {"forward": 0, "backward": 0, "merge": 0}
for name in calls:  # the entry points the autograd Function calls (its operands checked once, before)
    original = getattr(kernels, "run_" + name)
    def counted(*args, _name=name, _original=original, **kwargs):
        calls[_name] += 1
        return _original(*args, **kwargs)
    setattr(kernels, "run_" + name, counted)

torch.manual_seed(0)
M, K, N, r = 37, 45, 29, 5
W = torch.randn(N, K)
f = ldu_factors(W, r)
L, U = f.L.float(), f.U.float()
x, b, dy, e = torch.randn(M, K), torch.randn(N), torch.randn(M, N), torch.randn(r)
ref = references(x, W, b, L, U, e, dy)
out = {}
for step in (StepPlan("merged", "merged", "shrink", True), StepPlan("merged", "merged", "outer", True),
             StepPlan("merged", None, "outer", False), StepPlan("side", "merged", "shrink", False)):
    function.plan_step = lambda *a, _s=step: _s._replace(backward=_s.backward if a[7] else None)
    for backend in ("torch", "triton"):  # each against float64
        for c in calls:
            calls[c] = 0
        xg = x.clone().requires_grad_(step.backward is not None)
        eg = e.clone().requires_grad_(True)
        y = loldu_linear(xg, W, b, L, U, eg, backend=backend)
        y.backward(dy)
        bad = mismatches(y, *ref["y"], torch.float32, "y") + mismatches(eg.grad, *ref["grad_e"], torch.float32, "ge")
        if step.backward is not None:
            bad += mismatches(xg.grad, *ref["dx"], torch.float32, "dx")
        out["-".join(map(str, step)) + "/" + backend] = {"bad": bad, "dx": xg.grad is not None, "calls": dict(calls)}
print(json.dumps(out))
'''


def test_triton_backend_takes_the_same_routes_through_the_merge_kernel():
    """Under the Triton interpreter: a kept W_eff and the outer grad_e run as PyTorch GEMMs around the merge
    kernel (one merge per step); the other routes through the kernels with the planner's routes."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(repo), str(repo / "tests"), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", INTERPRETED_WORKER], env=env, cwd=repo, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res) == 8
    for name, r in res.items():
        assert not r["bad"], (name, r["bad"])
        assert r["dx"] == (not name.startswith("merged-None"))
    assert res["merged-merged-shrink-True/triton"]["calls"] == {"forward": 0, "backward": 0, "merge": 1}
    assert res["merged-merged-outer-True/triton"]["calls"] == {"forward": 0, "backward": 0, "merge": 1}
    assert res["merged-None-outer-False/triton"]["calls"] == {"forward": 0, "backward": 0, "merge": 1}
    assert res["side-merged-shrink-False/triton"]["calls"] == {"forward": 1, "backward": 1, "merge": 0}


def test_side_rows_is_the_planners_crossover():
    from loldu_triton.factors.planner import side_rows

    for K, N, r, itemsize, device, fused in ((1024, 1024, 16, 4, "cpu", False), (64, 64, 64, 4, "cpu", False),
                                             (4096, 11008, 1024, 2, "cuda", True), (24, 16, 6, 8, "cpu", False)):
        m = side_rows(K, N, r, itemsize, device, fused)
        assert m >= 1 and plan(m, K, N, r, itemsize, device, fused) == "side"
        assert plan(m + 1, K, N, r, itemsize, device, fused) == "merged"
