"""Dropout on the adapter's input on the Triton backend, run by the Triton interpreter: forward and backward
against float64 with the same mask (drawn again by re-seeding, see tests/test_dropout.py), the kernels each
call launches, and at p == 0 exactly the launches of today."""
import pytest
import torch
import torch.nn as nn
from kernel_checks import assert_float64_close
from test_dropout import (K, N, P, check_no_grad_call, inputs, kept, make_layer, reference, reference_args,
                          rows_reference, step)

import loldu_triton.kernels.launch as kernels
from loldu_triton import adapter_batch

ENTRY_POINTS = ("run_forward", "run_backward", "run_backward_base", "run_forward_rows", "run_backward_rows",
                "run_merge")


@pytest.fixture
def calls(monkeypatch):
    """{entry point: [whether x_side was passed, per call]}."""
    seen = {name: [] for name in ENTRY_POINTS}
    for name in ENTRY_POINTS:
        original = getattr(kernels, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            seen[_name].append(kwargs.get("x_side") is not None)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, wrapper)
    return seen


# bf16 runs here with its dots upcast to fp32 (the interpreter's bf16 tl.dot is wrong): its tolerance is bf16's,
# which the kernels' own bf16 rounding of t and (t * e) needs.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_forward_and_backward_match_float64_with_the_same_mask(dtype, calls):
    layer = make_layer(dtype, backend="triton")
    x, dy = inputs(dtype, shape=(3, 13, K))
    got = step(layer, x, dy)
    keep = kept(x.detach().reshape(-1, K), P).reshape(x.shape)
    assert_float64_close(got, reference, *reference_args(layer, x, dy, keep), dtype=dtype, name=str(dtype))
    assert calls["run_forward"] == [True] and calls["run_backward_base"] == [False]
    assert not calls["run_backward"] and not calls["run_merge"]


def test_triton_p0_and_eval_launch_what_they_always_did(calls):
    """No dropout: the launches of today (the planner's routes, no x_side, no base-only backward)."""
    x, dy = inputs()
    for layer in (make_layer(backend="triton", p=0.0), make_layer(backend="triton").eval()):
        got = step(layer, x, dy)
        assert_float64_close(got, reference, *reference_args(layer, x, dy, 1.0), name="no dropout")
    assert calls["run_forward"] == [False, False] and calls["run_backward"] == [False, False]
    assert not calls["run_backward_base"]


def test_triton_quantized_base_with_dropout(calls):
    """An int8 base: the backward's dY W GEMM dequantizes without the rank-r term (a kernel variant of its
    own)."""
    layer = make_layer(torch.float32, backend="triton")
    layer.quantize_base("int8")
    x, dy = inputs()
    got = step(layer, x, dy)[:4]  # (a quantized base's bias is kept as it was)
    keep = kept(x.detach(), P)
    args = reference_args(layer, x, dy, keep, weight=layer.dense_weight())
    assert_float64_close(got, lambda *a: reference(*a)[:4], *args, name="int8")
    assert calls["run_backward_base"] == [False]


def test_triton_adapter_batch_with_dropout(calls):
    layer = make_layer(backend="triton")
    torch.manual_seed(5)
    layer.set_named_adapter("a", layer.d0 * (1 + 0.3 * torch.randn(layer.rank)), layer.s0 * 1.5)
    names = [None, "a", layer.active_adapter]
    x, dy = inputs(shape=(3, 4, K))
    with adapter_batch(nn.Sequential(layer), names):
        got = step(layer, x, dy)[:4]
    ref = rows_reference(layer, names, repeat=4)
    x2 = x.detach().reshape(-1, K)
    flat = [got[0].reshape(-1, N), got[1].reshape(-1, K), got[2], got[3]]
    assert_float64_close(flat, ref, *reference_args(layer, x2, dy.reshape(-1, N), kept(x2, P)), name="rows")
    assert calls["run_forward_rows"] == [True] and calls["run_backward_base"] == [False]


def test_triton_dropout_under_torch_compile_aot_eager():
    """The registered ops (fwd with x_side, bwd_base) trace: compiled matches float64 with the same mask."""
    layer = make_layer(backend="triton")
    x, dy = inputs(shape=(3, 13, K))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    keep = kept(x.detach().reshape(-1, K), P).reshape(x.shape)
    for _ in range(2):
        assert_float64_close(step(compiled, x, dy), reference, *reference_args(layer, x, dy, keep), name="compiled")


def test_triton_no_grad_call_in_training_mode_applies_dropout(calls):
    check_no_grad_call("triton")
    assert calls["run_forward"] == [True]
