"""Hostile inputs, as an attacker would try them: numerics at init, second derivatives, argument types, model
surgery, threads and the functional API. Each case asserts the exact outcome (values, or the error and that its
message names the culprit) and, after a refusal, that nothing changed. Adapter files: test_hostile_files.py."""
import threading
import warnings
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

from kernel_checks import Float64Reference, assert_float64_close, float64_copy
from loldu_triton import (
    LoLDUEmbedding,
    LoLDULinear,
    LoLDUParametrization,
    adapter_batch,
    add_loldu,
    get_loldu_params,
    ldu_factors,
    load_loldu,
    loldu_linear,
    merge_loldu,
    save_loldu,
)
from loldu_triton.factors.planner import plan
from conftest import rel_err
from test_adapters import assert_unchanged, snapshot
from test_api import TinyLM, train
from test_quant import QUANT_TOL


def adam_step(model, x, lr=1e-2):
    train(model, x, steps=1, lr=lr)


# --------------------------------------------------------------------------------------------------------------
# 1. Numerics at init
# --------------------------------------------------------------------------------------------------------------


def small_pivot_fp16_linear(column0):
    """The issue's case: column 0 is +-column0, the rest N(0, 1), so U's first row grows as 1/column0."""
    torch.manual_seed(0)
    lin = nn.Linear(512, 16).half()
    with torch.no_grad():
        lin.weight.normal_()
        lin.weight[:, 0] = column0 * torch.sign(torch.randn(16)).half()
    return lin


@pytest.mark.parametrize("column0, lost", [(5e-4, True), (2e-2, False)])
def test_fp16_small_pivot_is_finite_and_exact_at_init_and_after_a_step(column0, lost):
    lin = small_pivot_fp16_linear(column0)
    x = 30 * torch.randn(8, 512).half()
    base = lin(x)
    assert torch.isfinite(base).all()
    model = nn.Sequential(lin)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_loldu(model, rank=4)
    # 5e-4 is below fp16's resolution of the largest pivot: a lost pivot, with a warning. 2e-2 is kept, and
    # then x U^T exceeds fp16's range although x W^T does not.
    assert any("usable rank 3 of the requested 4" in str(w.message) for w in caught) == lost
    if not lost:
        assert (x.float() @ model[0].U.float().T).abs().max() > 65504
    assert torch.equal(model(x), base)  # e == 0 at init: the base output itself, no inf * 0
    adam_step(model, x, lr=1e-3)
    y = model(x)
    assert torch.isfinite(y).all() and not torch.equal(y, base)
    assert all(torch.isfinite(p).all() for p in get_loldu_params(model))


@pytest.mark.parametrize("dtype, value", [(torch.float32, 3e38), (torch.float64, 1e300)])
def test_weights_beyond_float32_pivots_are_refused_naming_the_layer(dtype, value):
    model = nn.Sequential(nn.Linear(6, 4).to(dtype))
    with torch.no_grad():
        model[0].weight.copy_(torch.sign(torch.randn(4, 6)).to(dtype) * value)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^0: weight of shape \(4, 6\) has LU pivots up to .* beyond what LoLDU's float32 diagonal can hold"):
        add_loldu(model, rank=2)
    assert_unchanged(model, before)


def test_large_but_representable_fp32_weights_stay_finite():
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.mul_(1e30)
    layer = LoLDULinear.from_linear(lin, rank=3)
    x = torch.randn(5, 6)
    assert torch.equal(layer(x), lin(x)) and torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_weight_reports_its_usable_rank_and_warns(dtype):
    torch.manual_seed(0)
    w = torch.randn(24, 1, dtype=dtype) @ torch.randn(1, 20, dtype=dtype)  # rank 1, rounded in the dtype
    assert ldu_factors(w, 4).usable_rank == 1
    lin = nn.Linear(20, 24).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    with pytest.warns(UserWarning, match=r"usable rank 1 of the requested 4"):
        layer = LoLDULinear.from_linear(lin, rank=4)
    x = torch.randn(3, 20, dtype=dtype)
    assert torch.equal(layer(x), lin(x))


def test_full_rank_weights_keep_every_pivot():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = nn.Linear(64, 64).weight.detach().to(dtype)
        assert ldu_factors(w, 64).usable_rank == 64, dtype


def test_zero_weight_is_finite_everywhere():
    lin = nn.Linear(8, 5)
    with torch.no_grad():
        lin.weight.zero_()
    with pytest.warns(UserWarning, match="usable rank 0 of the requested 3"):
        model = add_loldu(nn.Sequential(lin), rank=3)
    x = torch.randn(4, 8)
    adam_step(model, x)
    assert torch.isfinite(model(x)).all() and all(torch.isfinite(p.grad).all() for p in get_loldu_params(model))


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -1.0, 0.0, "abc", True, [1]])
def test_bad_alpha_is_refused_naming_alpha_on_every_entry_point(alpha):
    model = TinyLM()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"add_loldu: alpha must be a positive finite number"):
        add_loldu(model, rank=2, alpha=alpha)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"alpha must be a positive finite number"):
        LoLDULinear.from_linear(nn.Linear(4, 4), rank=2, alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha must be a positive finite number"):
        LoLDUParametrization.from_linear(nn.Linear(4, 4), rank=2, alpha=alpha)


# --------------------------------------------------------------------------------------------------------------
# 2. Second derivatives
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, route", [(4, "side"), (12, "merged")])
def test_gradgradcheck_float64(rows, route):
    assert plan(rows, 7, 5, 3, 8, "cpu", fused_epilogue=False) == route == plan(rows, 5, 7, 3, 8, "cpu", False)
    torch.manual_seed(0)
    layer = LoLDULinear.from_linear(nn.Linear(7, 5).double(), rank=3)
    x = torch.randn(rows, 7, dtype=torch.float64, requires_grad=True)
    e = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(x, e):
        return torch.tanh(loldu_linear(x, layer.weight, layer.bias, layer.L, layer.U, e, backend="torch"))

    assert torch.autograd.gradcheck(fn, (x, e))
    assert torch.autograd.gradgradcheck(fn, (x, e))


def test_gradgradcheck_with_per_row_adapters():
    torch.manual_seed(0)
    layer = LoLDULinear.from_linear(nn.Linear(6, 4).double(), rank=2)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    table = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 2, 1, 2, 0])

    def fn(x, table):
        return torch.tanh(loldu_linear(x, layer.weight, layer.bias, layer.L, layer.U, table, rows=rows))

    assert torch.autograd.gradgradcheck(fn, (x, table))


def _dense_second_derivative(layer, x, d):
    """d/dx of sum(d/dd tanh(x W_eff^T + b).sum()), W_eff from d by the dense formula."""
    d, x = d.requires_grad_(), x.requires_grad_()
    e = layer.s.double() * d - layer.s0.double() * layer.d0.double()
    y = torch.tanh(x @ (layer.weight + (layer.L * e) @ layer.U).T + layer.bias).sum()
    (g,) = torch.autograd.grad(y, d, create_graph=True)
    return torch.autograd.grad(g.sum(), x)[0]


def test_gradient_of_a_gradient_matches_the_dense_reference():
    """The issue's case: grad of tanh(layer(x)).sum() w.r.t. d with create_graph, then its gradient w.r.t. x."""
    torch.manual_seed(0)
    layer = LoLDULinear.from_linear(nn.Linear(7, 5).double(), rank=3)
    with torch.no_grad():
        layer.d.add_(0.1)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.tanh(layer(x)).sum(), layer.d, create_graph=True)
    (gx,) = torch.autograd.grad(g.sum(), x)
    # d, s and e are float32 in the layer: the dense float64 run, its roundoff drawn at float32's size
    assert_float64_close(gx, _dense_second_derivative, layer, x.detach(), layer.d.detach().double(),
                         dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# 3. Argument types
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [2.7, "3", True, None, -2, 0, 2.0])
def test_ranks_that_are_not_positive_ints_are_refused_everywhere(rank):
    lin = nn.Linear(8, 6)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, min\(out, in\)\] = \[1, 6\]"):
        LoLDUParametrization.from_linear(lin, rank=rank)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, min\(out, in\)\] = \[1, 6\]"):
        LoLDULinear.from_linear(lin, rank=rank)
    model = TinyLM()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'layers.0.q_proj'.*rank must be an int"):
        add_loldu(model, loldu_config={nn.Linear: {"weight": partial(LoLDUParametrization.from_linear, rank=rank)}})
    if rank is not None:  # add_loldu(rank=None) means "use loldu_config"
        with pytest.raises(ValueError, match=r"add_loldu: rank must be a positive int or 'full'"):
            add_loldu(model, rank=rank)
    assert_unchanged(model, before)


def test_numpy_integer_ranks_work_on_every_entry_point():
    x = torch.randn(3, 16)
    for rank in (np.int64(3), np.int32(3)):
        model = TinyLM()
        add_loldu(model, rank=rank, target_modules=["lm_head"])
        assert model.lm_head.rank == 3 and type(model.lm_head.rank) is int
        other = TinyLM()
        add_loldu(other, loldu_config={nn.Linear: {"weight": partial(LoLDUParametrization.from_linear, rank=rank)}})
        assert other.lm_head.rank == 3 and torch.isfinite(other(x)).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"backend": "cuda"}, r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"),
    ({"init": "xavier"}, r"init must be one of .*got 'xavier'"),
    ({"init_seed": 1.5}, r"init_seed must be an int, got 1.5"),
    ({"base_quantization": "int4"}, r"base_quantization must be None or one of \('int8', 'fp8'\), got 'int4'"),
])
def test_bad_settings_are_refused_before_anything_changes(kwargs, match):
    model = TinyLM()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"add_loldu: {match}"):
        add_loldu(model, rank=2, **kwargs)
    assert_unchanged(model, before)
    if "base_quantization" not in kwargs:  # the layer constructor catches the same, at construction
        with pytest.raises(ValueError, match=match):
            LoLDULinear.from_linear(nn.Linear(4, 4), rank=2, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# 6. Model surgery
# --------------------------------------------------------------------------------------------------------------


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a  # one layer under two names
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.a(x) + self.b(x))


@pytest.mark.parametrize("targets", [None, ["b"], ["a", "b"]])
def test_a_shared_module_stays_shared(targets, tmp_path):
    torch.manual_seed(0)
    model = Shared()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_loldu(model, rank=2, target_modules=targets)
    assert isinstance(model.a, LoLDULinear) and model.a is model.b
    x = torch.randn(4, 8)
    train(model, x, steps=3)
    assert not torch.equal(model.a.d, model.a.d0)
    save_loldu(model, tmp_path)
    fresh = Shared()
    fresh.load_state_dict(base_state)
    load_loldu(fresh, tmp_path)
    assert fresh.a is fresh.b and torch.equal(fresh(x), model(x))
    y = model(x)
    reference = Float64Reference(lambda m, x: m(x), float64_copy(model), x.double())
    merge_loldu(model)
    assert type(model.a) is nn.Linear and model.a is model.b
    reference.assert_close(y, "adapted")  # each against float64
    reference.assert_close(model(x), "merged")


@pytest.mark.parametrize("kind", ["parametrization", "legacy"])
def test_weight_norm_is_refused_up_front_and_nothing_changes(kind):
    model = TinyLM()
    if kind == "parametrization":
        torch.nn.utils.parametrizations.weight_norm(model.layers[1].v_proj)
        match = r"'layers.1.v_proj'.*computed by a parametrization"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(model.layers[1].v_proj)
        match = r"'layers.1.v_proj'.*not a plain parameter.*remove_weight_norm"
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        add_loldu(model, rank=2, target_modules=["q_proj", "v_proj"])
    assert_unchanged(model, before)
    with pytest.warns(UserWarning, match=r"left out \['layers.1.v_proj'\]"):
        add_loldu(model, rank=2)  # every Linear: that one is skipped, the others adapted
    assert not isinstance(model.layers[1].v_proj, LoLDULinear) and isinstance(model.layers[0].v_proj, LoLDULinear)


def test_embedding_padding_row_never_moves():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, padding_idx=3)
    base_row = emb.weight[3].detach().clone()
    model = nn.Sequential(emb)
    add_loldu(model, rank=4, target_modules=["0"])
    assert isinstance(model[0], LoLDUEmbedding)
    idx = torch.tensor([[3, 1, 3, 7], [0, 3, 19, 2]])
    opt = torch.optim.Adam(get_loldu_params(model), lr=5e-2)
    for _ in range(5):
        opt.zero_grad()
        model(idx).pow(2).mean().backward()
        opt.step()
    out = model(idx)
    assert torch.equal(out[0, 0], base_row) and torch.equal(out[1, 1], base_row)
    assert not torch.equal(out[0, 1], emb.weight[1])  # other rows did train
    merge_loldu(model)
    assert torch.equal(model[0].weight[3], base_row)


def test_quantized_checkpoint_into_a_full_layer_is_refused_and_leaves_the_weight():
    torch.manual_seed(0)
    quantized = add_loldu(nn.Sequential(nn.Linear(8, 6)), rank=2, base_quantization="int8")
    full = add_loldu(nn.Sequential(nn.Linear(8, 6)), rank=2)
    before = snapshot(full)
    with pytest.raises(ValueError, match=r"^0: the checkpoint holds a quantized \(torch.int8\) weight"):
        full.load_state_dict(quantized.state_dict(), strict=False)
    assert_unchanged(full, before)
    with pytest.raises(ValueError, match=r"^0: reset_parameters would redraw a quantized \(int8\) base"):
        quantized[0].reset_parameters()


def test_other_rank_on_a_quantized_layer_is_refused_and_changes_nothing(tmp_path):
    # Refitting the factors on the dequantized weight gave an effect off by ~45% with no warning (issue 19).
    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(8, 6))
    state = {k: v.clone() for k, v in full.state_dict().items()}
    add_loldu(full, rank=4)
    train(full, torch.randn(5, 8), steps=3)
    save_loldu(full, tmp_path)
    quantized = nn.Sequential(nn.Linear(8, 6))
    quantized.load_state_dict(state)
    add_loldu(quantized, rank=2, base_quantization="int8")
    before = snapshot(quantized)
    with pytest.raises(ValueError, match=r"load_loldu: layer '0' has a quantized \(int8\) base with LoLDU at "
                                         r"\(rank, alpha, init, init_seed\) = \(2, 2.0, 'lu', 0\)"):
        load_loldu(quantized, tmp_path)
    assert_unchanged(quantized, before)
    assert quantized[0].rank == 2


def test_other_default_rank_does_not_silently_drop_named_adapters(tmp_path):
    torch.manual_seed(0)
    base = TinyLM()
    trained = TinyLM()
    trained.load_state_dict(base.state_dict())
    add_loldu(trained, rank=4, target_modules=["q_proj"])
    train(trained, torch.randn(4, 16))
    save_loldu(trained, tmp_path / "r4")
    serving = TinyLM()
    serving.load_state_dict(base.state_dict())
    add_loldu(serving, rank=2, target_modules=["q_proj"])
    save_loldu(serving, tmp_path / "r2")
    load_loldu(serving, tmp_path / "r2", adapter_name="other")
    before = snapshot(serving)
    with pytest.raises(ValueError, match=r"layer 'layers.0.q_proj' has named adapters \['other'\].*would drop them"):
        load_loldu(serving, tmp_path / "r4")
    assert_unchanged(serving, before)
    assert serving.layers[0].q_proj.adapter_names == ("other",)


def test_a_new_base_weight_drops_named_adapters_with_a_warning(tmp_path):
    model = add_loldu(nn.Sequential(nn.Linear(8, 6)), rank=2)
    save_loldu(model, tmp_path)
    load_loldu(model, tmp_path, adapter_name="named")
    with pytest.warns(UserWarning, match=r"^0: the base weight changed; named adapters \['named'\]"):
        model.load_state_dict({"0.weight": torch.randn(6, 8), "0.bias": torch.randn(6)}, strict=False)
    assert model[0].adapter_names == () and getattr(model[0], "adapter_table", None) is None


def test_meta_device_deferred_init_then_real_weights():
    layer = LoLDULinear(8, 6, rank=3, device="meta")
    y = layer(torch.randn(5, 8, device="meta"))
    assert y.is_meta and y.shape == (5, 6)
    layer.to_empty(device="cpu")
    source = nn.Linear(8, 6)
    layer.load_state_dict(source.state_dict(), strict=False)
    reference = LoLDULinear.from_linear(source, rank=3)
    for name in ("L", "U", "pivots", "d0", "s0"):
        assert torch.equal(getattr(layer, name), getattr(reference, name)), name
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), source(x))


def test_add_loldu_on_a_meta_model_then_a_base_checkpoint():
    torch.manual_seed(0)
    real = TinyLM()
    with torch.device("meta"):
        model = TinyLM()
    add_loldu(model, rank=2, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"layers.0.q_proj: the base weight is on the meta device"):
        save_loldu(model, "never-written")
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict(), strict=False)
    reference = add_loldu(TinyLM(), rank=2, target_modules=["q_proj", "lm_head"])
    reference.load_state_dict(real.state_dict(), strict=False)
    x = torch.randn(3, 16)
    assert torch.equal(model(x), real(x)) and torch.equal(model.lm_head.U, reference.lm_head.U)


@pytest.mark.parametrize("x, match", [
    (torch.tensor(1.0), r"my.layer: input is a 0-d tensor"),
    (torch.randn(3, 7), r"my.layer: input of shape \(3, 7\) has last dim 7, expected 8"),
    (torch.randn(3, 8, device="meta"), r"my.layer: input is on meta, the layer's weight on cpu"),
])
def test_bad_inputs_name_the_layer(x, match):
    layer = LoLDULinear.from_linear(nn.Linear(8, 6), rank=2, name="my.layer")
    with pytest.raises(ValueError, match=match):
        layer(x)


# --------------------------------------------------------------------------------------------------------------
# 7. Threads
# --------------------------------------------------------------------------------------------------------------


def forward(model, inputs):
    """model(x) for each x of inputs, without grad."""
    with torch.no_grad():
        return [model(x) for x in inputs]


@pytest.fixture
def serving(tmp_path):
    torch.manual_seed(0)
    base = TinyLM()
    models = {}
    for name in ("a", "b"):
        model = TinyLM()
        model.load_state_dict(base.state_dict())
        add_loldu(model, rank=2, target_modules=["q_proj", "lm_head"])
        train(model, torch.randn(4, 16))
        save_loldu(model, tmp_path / name)
        models[name] = model
    serving = TinyLM()
    serving.load_state_dict(base.state_dict())
    for name in ("a", "b"):
        load_loldu(serving, tmp_path / name, adapter_name=name)
    return serving, models, base


def test_two_threads_in_adapter_batch_see_only_their_own_adapters(serving):
    model, models, base = serving
    x = torch.randn(2, 3, 16)
    barrier = threading.Barrier(2, timeout=30)
    results, errors = {}, []

    def worker(name):
        try:
            with adapter_batch(model, [name, name]):
                barrier.wait()  # both inside at once
                first = model(x)
                barrier.wait()
                if name == "a":
                    barrier.wait()  # "b" has left; "a" is still inside
                    results[name] = (first, model(x))
                else:
                    results[name] = (first, None)
            if name == "b":
                barrier.wait()
        except Exception as err:  # surfaced below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    # each thread's rows against its adapter's model alone, in float64
    assert_float64_close(results["a"], forward, float64_copy(models["a"]), [x.double()] * 2, name="a")
    assert_float64_close(results["b"][0], forward, float64_copy(models["b"]), [x.double()], name="b")
    assert torch.equal(model(x), base(x))  # outside every batch: the default adapter, still at init


def test_adapter_batch_takes_a_generator_and_refuses_a_string(serving):
    model, models, _ = serving
    x = torch.randn(3, 2, 16)
    with adapter_batch(model, (n for n in ["a", "b", "a"])):
        y = model(x)
    assert_float64_close(y[1], forward, float64_copy(models["b"]), [x[1].double()])
    with pytest.raises(ValueError, match=r"names must be a sequence .* got str 'ab'"):
        with adapter_batch(model, "ab"):
            pass
    with pytest.raises(ValueError, match=r"each name must be a string or None, got 3"):
        with adapter_batch(model, ["a", 3]):
            pass


# --------------------------------------------------------------------------------------------------------------
# 8. The functional API's per-row indices (checked before any kernel runs, on both backends)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rows, match", [
    (torch.tensor([0, 3, 1]), r"rows must be in \[0, 3\) .*got values in \[0, 3\]"),
    (torch.tensor([0, -1, 1]), r"rows must be in \[0, 3\) .*got values in \[-1, 1\]"),
    (torch.tensor([0, 1, 1], dtype=torch.int32), r"rows must be an int64 tensor of shape \(3,\)"),
    (torch.tensor([0, 1]), r"rows must be an int64 tensor of shape \(3,\), one per input row; got torch.int64 \(2,\)"),
    ([0, 1, 1], r"rows must be an int64 tensor .* got list"),
])
def test_out_of_range_rows_are_refused(backend, rows, match):
    if backend == "triton":
        pytest.importorskip("triton")
    layer = LoLDULinear.from_linear(nn.Linear(8, 6), rank=2)
    table = torch.randn(3, 2)
    with pytest.raises(ValueError, match=match):
        loldu_linear(torch.randn(3, 8), layer.weight, layer.bias, layer.L, layer.U, table, backend, rows=rows)


def test_empty_inputs_give_empty_outputs_and_zero_gradients():
    layer = LoLDULinear.from_linear(nn.Linear(8, 6), rank=2)
    x = torch.randn(0, 8, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 6) and torch.equal(layer.d.grad, torch.zeros(2)) and x.grad.shape == (0, 8)
    assert layer(torch.randn(2, 0, 8)).shape == (2, 0, 6)


def test_a_layer_with_no_features_cannot_hold_any_rank():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nn.Linear's own note on zero-element init
        empty = nn.Linear(0, 5)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, min\(out, in\)\] = \[1, 0\] for weight 5x0"):
        LoLDULinear.from_linear(empty, rank=1)
