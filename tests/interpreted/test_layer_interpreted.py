"""LoLDULinear and the seed API on the Triton backend, run by the Triton interpreter: training matches the
PyTorch path (each against a float64 run of the same model) and the layer launches the kernels it should."""
import pytest
import torch
import torch.nn as nn
from kernel_checks import assert_float64_close, float64_copy

import loldu_triton.kernels.launch as kernels
from loldu_triton import adapter_batch, add_loldu, get_loldu_params, merge_loldu


def _model_and_data(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(45, 29), nn.GELU(), nn.Linear(29, 13, bias=False))
    return model, torch.randn(2, 19, 45), torch.randn(2, 19, 13)


@pytest.fixture
def calls(monkeypatch):
    counted = {"forward": 0, "backward": 0, "merge": 0}
    for name in counted:  # the entry points the autograd Function calls, its operands checked once before
        original = getattr(kernels, "run_" + name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            counted[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, "run_" + name, wrapper)
    return counted


def _train_and_merge(model, x, target):
    """3 Adam steps, then (the trained output, the merged model's output)."""
    opt = torch.optim.Adam(get_loldu_params(model), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        opt.step()
    y = model(x).detach()
    merge_loldu(model)
    return y, model(x).detach()


def test_layer_trains_like_the_torch_path_and_launches_the_kernels(calls):
    for backend in ("torch", "triton"):
        model, x, target = _model_and_data(0)
        add_loldu(model, rank=5, backend=backend)
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous leading dims
        reference = (float64_copy(model), x.double(), target.double())
        got = _train_and_merge(model, x, target)
        assert_float64_close(got, _train_and_merge, *reference, name=backend)
    # forward: 2 layers x (3 training steps + 1 final forward); backward kernel: the second layer only, 3 steps
    # (the first layer's input needs no gradient, so no dX GEMM runs there); merge once per layer. The float64
    # runs take the PyTorch path: no kernel.
    assert calls == {"forward": 8, "backward": 3, "merge": 2}


def _batched_step(model, x):
    """y, dx and the gradient of both layers' d, for 4 rows of 4 adapters in one batch."""
    x = x.requires_grad_(True)
    with adapter_batch(model, ["b", None, "default", "a"]):
        y = model(x)
        y.pow(2).sum().backward()
    return y.detach(), x.grad, model[0].d.grad, model[2].d.grad


def test_many_adapters_in_one_batch_match_the_torch_path():
    for backend in ("torch", "triton"):
        model, x, _ = _model_and_data(1)
        add_loldu(model, rank=5, backend=backend)
        gen = torch.Generator().manual_seed(3)
        for layer in (model[0], model[2]):
            with torch.no_grad():
                layer.d.add_(torch.randn(5, generator=gen))
            for name in ("a", "b"):
                layer.set_named_adapter(name, torch.randn(5, generator=gen))
        x = x.repeat(2, 1, 1)  # 4 batch rows of 19 tokens
        reference = (float64_copy(model), x.double())
        assert_float64_close(_batched_step(model, x), _batched_step, *reference, name=backend)


def test_fp16_small_pivot_keeps_t_in_float32_and_the_output_finite():
    # Column 0 of +-2e-2 next to N(0, 1) entries: U's first row grows to ~150, and x U^T exceeds fp16's range
    # although x W^T does not. Issue 10: never NaN at init (inf * (e == 0)).
    torch.manual_seed(0)
    lin = nn.Linear(64, 16).half()
    with torch.no_grad():
        lin.weight.normal_()
        lin.weight[:, 0] = 2e-2 * torch.sign(torch.randn(16)).half()
    x = 150 * torch.randn(5, 64).half()
    model = add_loldu(nn.Sequential(lin), rank=4, backend="triton")
    assert (x.float() @ model[0].U.float().T).abs().max() > 65504
    y, t = kernels.forward(x, lin.weight, lin.bias, model[0].L, model[0].U, model[0].delta_diagonal())
    assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert torch.isfinite(model(x)).all() and torch.isfinite(y).all()


def _penalty_gradients(model, x):
    """The gradient of a gradient penalty, w.r.t. x and every d and s: second derivatives."""
    x = x.requires_grad_(True)
    params = get_loldu_params(model)
    first = torch.autograd.grad(model(x).pow(2).sum(), params, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    return torch.autograd.grad(penalty, [x] + params)


def test_double_backward_on_the_triton_backend_matches_the_torch_path():
    # Both backends err by ~2e-4 on second derivatives of ~1e3 (float32), by CPU-dependent amounts: each against
    # a float64 run of the same model, not against each other.
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = add_loldu(nn.Sequential(nn.Linear(45, 29), nn.Tanh(), nn.Linear(29, 13)), rank=5, backend=backend)
        with torch.no_grad():
            for p in get_loldu_params(model):
                p.mul_(1.1)
        x = torch.randn(19, 45)
        reference = (float64_copy(model), x.double())
        assert_float64_close(_penalty_gradients(model, x), _penalty_gradients, *reference, name=backend)
