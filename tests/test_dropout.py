"""Dropout on the adapter's input (PEFT's lora_dropout) on the PyTorch backend:
y = x W0^T + b + ((dropout(x) U^T) * e) L^T, the base path on x itself.

Every numeric check is against a float64 run with the SAME mask: the mask is drawn again by re-seeding torch's
generator and calling F.dropout on ones of x's shape (its draws depend on the shape and the generator, not on the
values), so no test hook is needed. The Triton backend's tests are in tests/interpreted/test_dropout_interpreted.py
and share the helpers here."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from kernel_checks import assert_float64_close

from loldu_triton import (LoLDUConfig, LoLDUConv2d, LoLDUEmbedding, LoLDULinear, adapter_batch, add_loldu,
                          loldu_linear, save_loldu)
from loldu_triton.core.formulas import delta_diagonal
from loldu_triton.ops import function, functional

M, K, N, R = 37, 45, 29, 5
P = 0.3
SEED = 1234
BAD = (-0.1, 1.0, float("nan"), float("inf"), "0.1", True)


def make_layer(dtype=torch.float32, backend="torch", p=P, bias=True, seed=0):
    """A LoLDULinear with e != 0 (at init the rank-r path adds exactly 0: nothing to test) and a trainable bias."""
    torch.manual_seed(seed)
    layer = LoLDULinear.from_linear(nn.Linear(K, N, bias=bias, dtype=dtype), R, backend=backend, dropout=p)
    with torch.no_grad():
        layer.d.mul_(1 + 0.5 * torch.randn(R))
        layer.s.add_(0.25)
    if bias:
        layer.bias.requires_grad_(True)
    return layer


def inputs(dtype=torch.float32, shape=(M, K), out=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn((*shape[:-1], out), generator=g).to(dtype)
    return x, dy


def kept(x, p, seed=SEED):
    """The inverted-dropout factor (0 or 1/(1-p), float64) that F.dropout draws for x after manual_seed(seed)."""
    torch.manual_seed(seed)
    return (F.dropout(torch.ones_like(x), p) != 0).double() / (1 - p)


def step(layer, x, dy, seed=SEED):
    """(y, dx, grad d, grad s, grad bias) of one training call after manual_seed(seed)."""
    for t in (x, layer.d, layer.s, layer.bias):
        if t is not None:
            t.grad = None
    torch.manual_seed(seed)
    y = layer(x)
    y.backward(dy)
    grads = [x.grad, layer.d.grad, layer.s.grad] + ([layer.bias.grad] if layer.bias is not None else [])
    return [y.detach()] + [g.clone() for g in grads]


def reference(x, weight, bias, L, U, d, s, d0, s0, keep, dy):
    """float64 autograd of y = x W^T + b + (((x * keep) U^T) * e) L^T: (y, dx, grad d, grad s[, grad b]);
    keep: the inverted-dropout factor of each input, (..., in), or 1 (no dropout). e may be per row (rows, r)."""
    x, d, s = (t.detach().clone().requires_grad_(True) for t in (x, d, s))
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    e = delta_diagonal(d, s, d0, s0)
    y = x @ weight.T + ((x * keep) @ U.T * e) @ L.T
    y = y + b if b is not None else y
    leaves = [x, d, s] + ([b] if b is not None else [])
    return [y.detach()] + list(torch.autograd.grad(y, leaves, dy))


def reference_args(layer, x, dy, keep, weight=None):
    """reference()'s float64 arguments for ``layer``'s parameters (weight: its dense base, where quantized)."""
    weight = layer.weight if weight is None else weight
    bias = layer.bias
    args = (x, weight, bias, layer.L, layer.U, layer.d, layer.s, layer.d0, layer.s0, keep, dy)
    return tuple(a.detach().double() if isinstance(a, torch.Tensor) else a for a in args)


def rows_reference(layer, names, repeat):
    """The float64 reference under adapter_batch(names), each name's rows ``repeat`` times: e per row, the
    trainable adapter's through d and s (so that their gradients come out), the others fixed."""
    table = torch.cat([torch.zeros(1, layer.rank), layer.delta_diagonal().detach()[None], layer.adapter_table])
    rows = torch.tensor([layer.batch_table_row(n) for n in names]).repeat_interleave(repeat)
    trainable = (rows == 1).double()[:, None]
    fixed = table.double()[rows] * (1 - trainable)

    def ref(x, weight, bias, L, U, d, s, d0, s0, keep, dy):
        x, d, s = (t.detach().clone().requires_grad_(True) for t in (x, d, s))
        e = delta_diagonal(d, s, d0, s0) * trainable + fixed
        y = x @ weight.T + bias + ((x * keep) @ U.T * e) @ L.T
        return [y.detach()] + list(torch.autograd.grad(y, (x, d, s), dy))

    return ref


def check_step(layer, x, dy, dtype, p=P, name=""):
    got = step(layer, x, dy)
    x2 = x.detach().reshape(-1, x.shape[-1])
    keep = kept(x2, p).reshape(x.shape) if p else 1.0
    weight = layer.dense_weight()
    assert_float64_close(got, reference, *reference_args(layer, x, dy, keep, weight), dtype=dtype, name=name)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_and_backward_match_float64_with_the_same_mask(dtype):
    layer = make_layer(dtype)
    x, dy = inputs(dtype, shape=(3, 13, K))  # leading dims flattened: the mask is drawn on (39, K)
    check_step(layer, x, dy, dtype, name=str(dtype))


def test_the_reference_sees_the_mask():
    """The same comparison without dropout in the reference fails: the mask makes a difference the tolerance
    notices (else the test above would prove nothing)."""
    layer = make_layer()
    x, dy = inputs()
    got = step(layer, x, dy)
    with pytest.raises(AssertionError):
        assert_float64_close(got, reference, *reference_args(layer, x, dy, 1.0))


def test_eval_mode_and_p0_are_no_dropout_bit_for_bit(monkeypatch):
    x, dy = inputs()
    plain = step(make_layer(p=0.0), x, dy)
    layer = make_layer(p=P).eval()
    assert all(torch.equal(a, b) for a, b in zip(step(layer, x, dy), plain))
    with torch.no_grad():  # the inference shortcut, in eval mode
        assert torch.equal(layer(x), make_layer(p=0.0)(x))
    # p == 0 (and eval mode) call exactly today's routes: no dropout drawn, no x_side, the generator untouched
    calls = []
    original = function.LoLDULinearFunction.apply
    monkeypatch.setattr(function.LoLDULinearFunction, "apply",
                        lambda *a: calls.append(len(a)) or original(*a))
    monkeypatch.setattr(functional.F, "dropout", lambda *a, **k: pytest.fail("dropout drawn at p == 0"))
    for model in (make_layer(p=0.0).train(), make_layer(p=P).eval()):
        state = torch.get_rng_state()
        y = model(x)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(y, plain[0])
    assert calls == [9, 9]  # (x2, weight, bias, L, U, e, rows, scale, backend): no x_side


def test_training_with_dropout_differs_and_the_side_path_alone_is_dropped():
    layer = make_layer()
    x, dy = inputs()
    y_drop = step(layer, x, dy)[0]
    y_eval = step(layer.eval(), x, dy)[0]
    assert not torch.equal(y_drop, y_eval)
    layer.train()
    with torch.no_grad():  # at init (e == 0) dropout cannot change the output: the base path sees all of x
        layer.reset_loldu()
    assert torch.equal(step(layer, x, dy)[0], step(layer.eval(), x, dy)[0])


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_invalid_p_refused_by_name_and_nothing_changed(bad):
    with pytest.raises(ValueError, match=r"my_layer: dropout must be a float in \[0, 1\)"):
        LoLDULinear(K, N, rank=R, dropout=bad, name="my_layer")
    layer = make_layer(p=0.1)
    with pytest.raises(ValueError, match=r"LoLDULinear\(29x45\): dropout"):
        layer.dropout = bad
    assert layer.dropout == 0.1
    with pytest.raises(ValueError, match="LoLDUConfig: dropout"):
        LoLDUConfig(dropout=bad)
    config = LoLDUConfig(dropout=0.2)
    with pytest.raises(ValueError, match="LoLDUConfig: dropout"):
        config.dropout = bad
    assert config.dropout == 0.2
    model = nn.Sequential(nn.Linear(K, N))
    with pytest.raises(ValueError, match="add_loldu: dropout"):
        add_loldu(model, rank=R, dropout=bad)
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad
    x = torch.randn(3, K)
    with pytest.raises(ValueError, match="loldu_linear: dropout"):
        loldu_linear(x, layer.weight, layer.bias, layer.L, layer.U, layer.delta_diagonal(), dropout=bad)


def test_settings_reach_the_layers_and_the_config_round_trips(tmp_path):
    config = LoLDUConfig(rank=4, dropout=0.05)
    assert LoLDUConfig.from_dict(config.to_dict()) == config and config.to_dict()["dropout"] == 0.05
    assert LoLDUConfig.from_dict({"rank": 4}).dropout == 0.0
    for model in (add_loldu(nn.Sequential(nn.Linear(K, N)), config),
                  add_loldu(nn.Sequential(nn.Linear(K, N)), rank=4, dropout=0.05)):
        assert model[0].dropout == 0.05 and model[0].loldu_settings().dropout == 0.05
        assert "dropout=0.05" in repr(model[0])
    # the file records it with the adapter's settings (as PEFT's adapter_config holds lora_dropout); a file
    # without it (older ones) reads as 0
    save_loldu(model, tmp_path)
    assert LoLDUConfig.from_pretrained(tmp_path).dropout == 0.05
    model[0].dropout = 0.0
    save_loldu(model, tmp_path)
    assert LoLDUConfig.from_pretrained(tmp_path).dropout == 0.0


def test_reproducible_under_a_seed():
    layer = make_layer()
    x, dy = inputs()
    first, again = step(layer, x, dy, seed=7), step(layer, x, dy, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], step(layer, x, dy, seed=8)[0])


def test_fraction_dropped(monkeypatch):
    """The share of the side path's inputs that dropout zeroes is p. With n inputs the dropped count is
    Binomial(n, p): its share has standard deviation sqrt(p (1 - p) / n) (0.0011 at n = 180k, p = 0.3); 6 of
    those fail a correct mask with probability 2e-9, and catch a wrong p (0.25 or 0.35) or a mask applied twice
    (0.51) many times over. The kept inputs are x / (1 - p)."""
    seen = []
    original = F.dropout
    monkeypatch.setattr(functional.F, "dropout", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    layer = make_layer()
    x = torch.randn(4000, K) + 3.0  # (no zeros of its own)
    layer(x)
    side = seen[0]
    n = side.numel()
    share = (side == 0).double().mean().item()
    assert abs(share - P) < 6 * math.sqrt(P * (1 - P) / n), share
    kept_in = side != 0
    torch.testing.assert_close(side[kept_in], x[kept_in] / (1 - P), rtol=2 * torch.finfo(x.dtype).eps, atol=0)


def test_gradcheck_of_the_function_with_a_fixed_mask():
    """The autograd Function with x_side = x * mask (the mask fixed, as autograd's dropout keeps it): every
    gradient, x's two paths included, by finite differences in float64."""
    g = torch.Generator().manual_seed(3)
    m, k, n, r = 7, 6, 5, 3
    mask = (torch.rand(m, k, generator=g) > 0.3).double() / 0.7
    x, L, U = (torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
               for shape in ((m, k), (n, r), (r, k)))
    weight = torch.randn(n, k, generator=g, dtype=torch.float64)
    bias, e = (torch.randn(size, generator=g, dtype=torch.float64, requires_grad=True) for size in (n, r))

    def fn(x, bias, L, U, e):
        return function.LoLDULinearFunction.apply(x, weight, bias, L, U, e, None, None, "torch", x * mask)[0]

    assert torch.autograd.gradcheck(fn, (x, bias, L, U, e))
    assert torch.autograd.gradgradcheck(fn, (x, bias, L, U, e))


def test_torch_compile_aot_eager_matches_float64_with_the_same_mask():
    """Compiled (aot_eager: the captured graph run without inductor) draws the same mask under the same seed
    and matches the float64 run with it, forward and backward."""
    layer = make_layer()
    x, dy = inputs(shape=(3, 13, K))
    compiled = torch.compile(layer, backend="aot_eager")
    x2 = x.detach().reshape(-1, K)
    args = reference_args(layer, x, dy, kept(x2, P).reshape(x.shape))
    for _ in range(2):  # the second call runs the cached graph
        assert_float64_close(step(compiled, x, dy), reference, *args, name="compiled")
    assert_float64_close(step(layer, x, dy), reference, *args, name="eager")


def test_adapter_batch_applies_dropout_to_every_row():
    """Under adapter_batch in training mode each row's rank-r path reads dropout(x) with its own adapter's e;
    in eval mode none does."""
    layer = make_layer(p=P)
    torch.manual_seed(5)
    layer.set_named_adapter("a", layer.d0 * (1 + 0.3 * torch.randn(R)), layer.s0 * 1.5)
    model = nn.Sequential(layer)
    names = [None, "a", layer.active_adapter, "a"]
    x, dy = inputs(shape=(4, 3, K))
    x2 = x.detach().reshape(-1, K)
    with adapter_batch(model, names):
        got = step(layer, x, dy)[:4]
        with torch.no_grad():
            layer.eval()
            y_eval = layer(x)
            layer.train()
    ref = rows_reference(layer, names, repeat=3)
    keep = kept(x2, P)
    args = reference_args(layer, x2, dy.reshape(-1, N), keep)
    flat = [got[0].reshape(-1, N), got[1].reshape(-1, K), got[2], got[3]]
    assert_float64_close(flat, ref, *args, name="adapter_batch")
    assert_float64_close(y_eval.reshape(-1, N), lambda *a: ref(*a)[0], *reference_args(layer, x2, dy.reshape(-1, N),
                                                                                          1.0), name="eval")


def test_conv2d_dropout_matches_float64_and_eval_is_plain():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    layer = LoLDUConv2d.from_base(conv, 4, dropout=P)
    with torch.no_grad():
        layer.d.mul_(1 + 0.5 * torch.randn(4))
    x = torch.randn(2, 3, 7, 6, requires_grad=True)
    dy = torch.randn(2, 8, 7, 6)
    torch.manual_seed(SEED)
    y = layer(x)
    y.backward(dy)
    got = [y.detach(), x.grad.clone(), layer.d.grad.clone(), layer.s.grad.clone()]
    keep = kept(x.detach(), P)

    def ref(x, weight, bias, L, U, d, s, d0, s0, keep, dy):
        x, d, s = (t.detach().clone().requires_grad_(True) for t in (x, d, s))
        delta = ((L * delta_diagonal(d, s, d0, s0)) @ U).view_as(weight)
        y = F.conv2d(x, weight, bias, padding=1) + F.conv2d(x * keep, delta, None, padding=1)
        return [y.detach()] + list(torch.autograd.grad(y, (x, d, s), dy))

    args = reference_args(layer, x, dy, keep)
    assert_float64_close(got, ref, *args, name="conv2d")
    layer.eval()
    plain = LoLDUConv2d.from_base(nn.Conv2d(3, 8, 3, padding=1), 4)
    plain.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x), plain(x))


def test_embedding_refuses_dropout_by_name():
    emb = nn.Embedding(10, 6)
    with pytest.raises(ValueError, match=r"my_emb: dropout must be 0 for a LoLDUEmbedding"):
        LoLDUEmbedding.from_base(emb, 3, name="my_emb", dropout=0.1)
    layer = LoLDUEmbedding.from_base(emb, 3)
    with pytest.raises(ValueError, match="dropout must be 0 for a LoLDUEmbedding"):
        layer.dropout = 0.1
    assert layer.dropout == 0.0
    model = nn.Sequential(nn.Embedding(10, K), nn.Linear(K, N))
    with pytest.raises(ValueError, match=r"add_loldu: dropout=0.1 .* \['0'\] are nn.Embedding"):
        add_loldu(model, rank=3, target_modules=["0", "1"], dropout=0.1)
    assert type(model[0]) is nn.Embedding and type(model[1]) is nn.Linear
    add_loldu(model, rank=3, target_modules=["1"], dropout=0.1)  # the linear layer alone takes it
    assert model[1].dropout == 0.1


def test_a_no_grad_call_in_training_mode_applies_dropout():
    check_no_grad_call("torch")


def check_no_grad_call(backend):
    """Without autograd (forward_2d, not the Function; not the inference cache) the mask applies as well."""
    layer = make_layer(backend=backend)
    x, dy = inputs()
    torch.manual_seed(SEED)
    with torch.no_grad():
        y = layer(x)
    args = reference_args(layer, x, dy, kept(x.detach(), P))
    assert_float64_close(y, lambda *a: reference(*a)[0], *args, name="no_grad")
