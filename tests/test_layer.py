import pytest
import torch
import torch.nn as nn

from kernel_checks import assert_float64_close, assert_linear_close, float64_copy
from loldu_triton import LoLDULinear


def test_output_at_init_equals_base_exactly_for_every_init():
    base = nn.Linear(24, 16)
    x = torch.randn(3, 5, 24)
    for init in ("lu", "uniform", "normal", "constant"):
        layer = LoLDULinear.from_linear(base, rank=8, init=init)
        assert torch.equal(layer(x), base(x)), init


def test_trainable_state_is_r_plus_one_float32_values_and_base_is_frozen_and_shared():
    base = nn.Linear(24, 16).to(torch.bfloat16)
    layer = LoLDULinear.from_linear(base, rank=8)
    trainable = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    assert [(n, tuple(p.shape), p.dtype) for n, p in trainable] == [("d", (8,), torch.float32), ("s", (1,), torch.float32)]
    assert layer.weight is base.weight and not layer.weight.requires_grad
    assert layer.L.dtype == layer.U.dtype == torch.bfloat16
    assert set(layer.state_dict()) == {"weight", "bias", "d", "s"}


def test_training_changes_output_and_never_the_base_weight():
    base = nn.Linear(12, 10)
    w0 = base.weight.detach().clone()
    layer = LoLDULinear.from_linear(base, rank=5)
    opt = torch.optim.SGD([layer.d, layer.s], lr=0.1)
    x = torch.randn(7, 12)
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        opt.step()
    assert torch.equal(layer.weight, w0)
    assert not torch.allclose(layer(x), base(x))
    layer.loldu_enabled = False
    assert torch.equal(layer(x), base(x))
    layer.loldu_enabled = True
    merged = layer.merged_weight()
    e = layer.delta_diagonal().detach()
    assert_linear_close(layer(x), x, layer.weight, layer.bias, layer.L, layer.U, e, "layer")
    assert_linear_close(x @ merged.T + layer.bias, x, layer.weight, layer.bias, layer.L, layer.U, e, "merged")


def test_half_and_to_keep_adapter_state_float32_and_values_exact():
    layer = LoLDULinear(20, 12, rank=6)
    with torch.no_grad():
        layer.d.add_(torch.randn(6) * 1e-4)  # a trained value that float16 would round
    d = layer.d.detach().clone()
    d_param = layer.d
    layer.half()
    assert layer.weight.dtype == layer.L.dtype == torch.float16
    assert layer.d is d_param and layer.d.dtype == torch.float32 and torch.equal(layer.d, d)
    assert layer.s.dtype == layer.d0.dtype == layer.s0.dtype == torch.float32
    y = layer(torch.randn(4, 20, dtype=torch.float16))
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_constructor_mirrors_nn_linear():
    layer = LoLDULinear(9, 4, bias=False, dtype=torch.float64, rank=3)
    assert layer.bias is None and layer.weight.dtype == torch.float64 and layer.weight.shape == (4, 9)
    x = torch.randn(2, 9, dtype=torch.float64)
    assert torch.equal(layer(x), x @ layer.weight.T)
    assert isinstance(layer, nn.Linear)


def test_loading_a_base_checkpoint_refactorizes_and_restarts_at_the_base():
    pretrained = nn.Linear(16, 8)
    layer = LoLDULinear(16, 8, rank=4)
    missing, unexpected = layer.load_state_dict(pretrained.state_dict(), strict=False)
    assert set(missing) == {"d", "s"} and not unexpected
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), pretrained(x))
    assert torch.equal(layer.L, LoLDULinear.from_linear(pretrained, 4).L)


@pytest.mark.parametrize("rank", [0, 9, -2, 2.5])
def test_bad_rank_is_refused_naming_the_layer(rank):
    with pytest.raises(ValueError, match=r"enc\.q: rank must be an int in \[1, min\(out, in\)\] = \[1, 8\]"):
        LoLDULinear.from_linear(nn.Linear(8, 12), rank, name="enc.q")


def test_non_finite_weight_is_refused_and_left_untouched():
    base = nn.Linear(8, 8)
    with torch.no_grad():
        base.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"enc\.k: weight of shape \(8, 8\) contains NaN or Inf"):
        LoLDULinear.from_linear(base, 2, name="enc.k")
    assert base.weight.requires_grad


def test_wrong_input_width_names_the_layer_enabled_or_not():
    layer = LoLDULinear.from_linear(nn.Linear(8, 4), 2, name="head.fc")
    for enabled in (True, False):
        layer.loldu_enabled = enabled
        with pytest.raises(ValueError, match=r"head\.fc: input of shape \(3, 7\) has last dim 7, expected 8"):
            layer(torch.randn(3, 7))


def test_zero_initialised_layer_trains_without_nan():
    base = nn.Linear(10, 6)
    nn.init.zeros_(base.weight)
    with pytest.warns(UserWarning, match=r"out\.proj: weight has usable rank 0 of the requested 4"):
        layer = LoLDULinear.from_linear(base, 4, name="out.proj")
    opt = torch.optim.SGD([layer.d, layer.s], lr=0.5)
    x, target = torch.randn(16, 10), torch.randn(16, 6)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(l == l for l in losses) and losses[-1] < losses[0]
    assert torch.isfinite(layer.merged_weight()).all()


def _paper_trajectory(W_res, L, D, U, bias, x, target):
    """The paper's form: W_res + sigma L diag(z) U, z and sigma trained by Adam; each step's y, then z and sigma."""
    z = nn.Parameter(D.clone())
    sigma = nn.Parameter(torch.ones((), dtype=torch.float64))
    opt = torch.optim.Adam([z, sigma], lr=1e-2)
    ys = []
    for _ in range(6):
        y = x @ (W_res + sigma * L @ torch.diag(z) @ U).T + bias
        ys.append(y.detach())
        opt.zero_grad()
        (y - target).pow(2).mean().backward()
        opt.step()
    return ys, z.detach(), sigma.detach().reshape(1)


def test_paper_residual_formulation_gives_the_same_training_trajectory():
    """The paper keeps W_res = W0 - s0 L diag(z0) U and trains W_res + s L diag(z) U; we never touch W0."""
    torch.manual_seed(1)
    base = nn.Linear(14, 11, dtype=torch.float64)
    r = 6
    layer = LoLDULinear.from_linear(base, r)
    # independent implementation from torch.linalg.lu: first r pivots, P folded into L, U normalised by D
    P, L_full, U_full = torch.linalg.lu(base.weight.detach())
    L = (P @ L_full)[:, :r]
    D = torch.diagonal(U_full)[:r]
    U = U_full[:r] / D[:, None]
    W_res = base.weight.detach() - 1.0 * L @ torch.diag(D) @ U
    x, target = torch.randn(20, 14, dtype=torch.float64), torch.randn(20, 11, dtype=torch.float64)
    opt = torch.optim.Adam([layer.d, layer.s], lr=1e-2)
    ys = []
    for _ in range(6):
        y = layer(x)
        ys.append(y.detach())
        opt.zero_grad()
        (y - target).pow(2).mean().backward()
        opt.step()
    # d, s and their Adam steps are float32 in ours: the paper's float64 run, its roundoff drawn at float32's size
    assert_float64_close((ys, layer.d.detach(), layer.s.detach()), _paper_trajectory, W_res, L, D, U,
                         base.bias.detach(), x, target, dtype=torch.float32)


def test_autocast_bf16_on_cpu_runs_and_keeps_adapter_gradients_float32():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    from loldu_triton import add_loldu, get_loldu_params

    add_loldu(model, rank=4)
    with torch.no_grad():
        for p in get_loldu_params(model):
            p.mul_(1.1)
    x = torch.randn(6, 16)
    reference = (float64_copy(model), x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    assert_float64_close(y, lambda m, x: m(x), *reference, dtype=torch.bfloat16)
    y.float().sum().backward()
    for p in get_loldu_params(model):
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()


def test_in_place_ops_on_the_output_train_like_out_of_place():
    torch.manual_seed(0)
    layer = LoLDULinear.from_linear(nn.Linear(8, 6), 3)
    with torch.no_grad():
        layer.d.mul_(1.5)
    x = torch.randn(2, 5, 8)
    y = layer(x)
    y += 1.0  # in place on the (reshaped) output of the custom Function
    torch.relu_(y)
    y.sum().backward()
    grad_in_place = layer.d.grad.clone()
    layer.d.grad = None
    torch.relu(layer(x) + 1.0).sum().backward()
    assert torch.equal(grad_in_place, layer.d.grad)  # the same ops on the same values
