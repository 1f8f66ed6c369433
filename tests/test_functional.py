import pytest
import torch

from kernel_checks import assert_close, assert_linear_close, references
from loldu_triton import ldu_factors, loldu_linear, loldu_merged_weight


def operands(M=6, K=7, N=5, r=3, dtype=torch.float64, bias=True):
    W = torch.randn(N, K, dtype=dtype)
    f = ldu_factors(W, r)
    e = torch.randn(r, dtype=torch.float32)
    b = torch.randn(N, dtype=dtype) if bias else None
    return torch.randn(M, K, dtype=dtype), W, b, f.L.to(dtype), f.U.to(dtype), e


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_all_inputs_float64(bias):
    x, W, b, L, U, e = operands(bias=bias)
    e = e.double()
    inputs = [x, W, b, L, U, e]
    for t in inputs:
        if t is not None:
            t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: loldu_linear(*a, backend="torch"), inputs)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_x_and_e_only(bias):
    # the training case: the frozen weight and factors need no gradient, so x is not kept
    x, W, b, L, U, e = operands(bias=bias)
    x.requires_grad_(True)
    e = e.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, e: loldu_linear(x, W, b, L, U, e, backend="torch"), [x, e])


def test_backward_saves_only_t_not_x_nor_a_delta():
    from loldu_triton.factors.planner import SIDE_STEP, plan_step

    M, K, N, r = 16, 40, 30, 4  # low rank, few rows: the side path (other routes: test_routes.py)
    assert plan_step(M, K, N, r, 4, "cpu", False) == SIDE_STEP
    x, W, b, L, U, e = operands(M, K, N, r, dtype=torch.float32)
    x.requires_grad_(True)
    e.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = loldu_linear(x, W, b, L, U, e, backend="torch")
    per_row = [t for t in saved if t.dim() == 2 and t.shape[0] == M]
    assert [tuple(t.shape) for t in per_row] == [(M, r)]  # t = x U^T, nothing of x's size
    assert not any(t.shape == (N, K) and not (t is W or t.data_ptr() == W.data_ptr()) for t in saved)
    y.sum().backward()
    assert x.grad is not None and e.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_leading_dims_noncontiguous_and_dtypes_match_float64(dtype):
    x, W, b, L, U, e = operands(M=10, K=24, N=18, r=6, dtype=dtype)
    x3 = torch.randn(2, 24, 5, dtype=dtype).transpose(1, 2)  # (2, 5, 24), not contiguous
    y = loldu_linear(x3, W, b, L, U, e, backend="torch")
    assert y.shape == (2, 5, 18) and y.dtype == dtype
    assert_linear_close(y, x3, W, b, L, U, e)


def test_gradients_match_float64_reference_in_float32():
    x, W, b, L, U, e = operands(M=9, K=11, N=13, r=4, dtype=torch.float32)
    x.requires_grad_(True)
    e.requires_grad_(True)
    dy = torch.randn(9, 13)
    loldu_linear(x, W, b, L, U, e, backend="torch").backward(dy)
    ref = references(x, W, b, L, U, e, dy)
    assert_close(x.grad, *ref["dx"], torch.float32, "dx")
    assert_close(e.grad, *ref["grad_e"], torch.float32, "grad_e")
    assert e.grad.dtype == torch.float32


def test_merge_equals_dense_formula():
    x, W, b, L, U, e = operands(K=30, N=20, r=7, dtype=torch.float32)
    merged = loldu_merged_weight(W, L, U, e, backend="torch")
    assert merged.dtype == W.dtype
    assert_close(merged, *references(x, W, b, L, U, e, torch.zeros(6, 20))["merge"], torch.float32, "merge")


def test_shape_and_backend_errors_name_the_caller():
    x, W, b, L, U, e = operands(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"blocks\.0: input of shape \(6, 8\) has last dim 8, expected 7"):
        loldu_linear(torch.randn(6, 8), W, b, L, U, e, name="blocks.0")
    with pytest.raises(ValueError, match="factor shapes"):
        loldu_linear(x, W, b, L, U, e[:2])
    with pytest.raises(ValueError, match="backend must be one of"):
        loldu_linear(x, W, b, L, U, e, backend="cuda")
    with pytest.raises(ValueError, match="input dtype torch.float64 differs"):
        loldu_linear(x.double(), W, b, L, U, e)


@pytest.mark.parametrize("M,K,N,route", [(3, 40, 30, "side"), (200, 12, 10, "merged")])
def test_torch_path_takes_the_planned_route_and_both_match_float64(M, K, N, route):
    from loldu_triton.factors.planner import plan

    assert plan(M, K, N, 4, 4, "cpu", fused_epilogue=False) == route
    assert plan(M, N, K, 4, 4, "cpu", fused_epilogue=False) == route  # the backward GEMM
    x, W, b, L, U, e = operands(M, K, N, 4, dtype=torch.float32)
    x.requires_grad_(True)
    e.requires_grad_(True)
    y = loldu_linear(x, W, b, L, U, e, backend="torch")
    dy = torch.randn(M, N)
    y.backward(dy)
    ref = references(x, W, b, L, U, e, dy)
    for name, got in (("y", y), ("dx", x.grad), ("grad_e", e.grad)):
        assert_close(got, *ref[name], torch.float32, f"{route} {name}")
    # at e == 0 either route gives the base output bit for bit
    assert torch.equal(loldu_linear(x, W, b, L, U, torch.zeros_like(e), backend="torch"), torch.nn.functional.linear(x, W, b))


def test_planner_crossovers():
    from loldu_triton.factors.planner import plan

    for K, N, r in ((768, 768, 768), (4096, 4096, 16), (4096, 11008, 1024)):
        for device, fused in (("cuda", True), ("cpu", False)):
            routes = [plan(2 ** p, K, N, r, 2, device, fused) for p in range(21)]
            assert routes[0] == "side"  # decode never pays a pass over W
            assert routes == sorted(routes, key=lambda route: route == "merged")  # one crossover
    assert plan(197 * 64, 768, 768, 768) == "merged"  # the paper's full-rank ViT-B, batch 64, kernels
    assert plan(16384, 4096, 4096, 16) == "side"
    assert plan(2048, 1024, 1024, 16, 4, "cpu", fused_epilogue=False) == "merged"


def test_inference_path_skips_autograd_and_gives_the_same_output():
    x, W, b, L, U, e = operands(M=5, K=9, N=7, r=3, dtype=torch.float32)
    e.requires_grad_(True)
    y_train = loldu_linear(x, W, b, L, U, e, backend="torch")
    assert y_train.grad_fn is not None
    with torch.no_grad():
        y_infer = loldu_linear(x, W, b, L, U, e, backend="torch")
    assert y_infer.grad_fn is None and torch.equal(y_infer, y_train.detach())
    y_frozen = loldu_linear(x, W, b, L, U, e.detach(), backend="torch")  # nothing requires grad
    assert y_frozen.grad_fn is None and torch.equal(y_frozen, y_infer)


def test_merged_route_without_autograd_skips_the_shrink(monkeypatch):
    import loldu_triton.ops.function as function
    from loldu_triton.factors.planner import plan_step

    x, W, b, L, U, e = operands(M=200, K=40, N=30, r=4, dtype=torch.float32)  # the merged route on CPU
    assert plan_step(200, 40, 30, 4, 4, "cpu", False, False, True).grad_e == "shrink"  # t from x U^T
    shrinks = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(function.F, "linear", lambda a, w, *rest: shrinks.append(w is U) or real_linear(a, w, *rest))
    with torch.no_grad():
        y = loldu_linear(x, W, b, L, U, e, backend="torch")
    assert not any(shrinks)  # x U^T is only for backward there
    e.requires_grad_(True)
    assert torch.equal(loldu_linear(x, W, b, L, U, e, backend="torch").detach(), y) and any(shrinks)
