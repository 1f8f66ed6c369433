"""A weight-only quantized frozen base (int8, fp8 e4m3) under LoLDU: PyTorch path, kernels on GPU (the
interpreter runs them in tests/interpreted/test_quant_interpreted.py), adapter files between quantized and full bases, merge/remove, dtype moves."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from conftest import rel_err
from kernel_checks import EPS, assert_close, assert_float64_close, float64_copy, references
from loldu_triton import LoLDULinear, add_loldu, get_loldu_params, load_loldu, merge_loldu, remove_loldu, save_loldu
from loldu_triton.factors.quant import dequantize, quantize_weight
from test_api import TinyLM

# Relative output error of a quantized base against the full one (per-row absmax): int8 ~0.5%, e4m3 ~3%.
QUANT_TOL = {"int8": 1e-2, "fp8": 6e-2}


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantize_weight_per_row_error_bounds_and_zero_rows(kind):
    W = torch.randn(12, 40) * torch.logspace(-3, 1, 12)[:, None]
    W[5] = 0
    q, scale = quantize_weight(W, kind)
    assert q.dtype == (torch.int8 if kind == "int8" else torch.float8_e4m3fn) and scale.dtype == torch.float32
    back = dequantize(q, scale, torch.float32)
    assert torch.equal(back[5], torch.zeros(40)) and torch.isfinite(back).all()
    rounding = EPS[torch.float32] * W.abs()  # of the float32 product q * scale
    if kind == "int8":  # rounding to nearest: at most half a step per element
        assert ((back - W).abs() <= scale[:, None] / 2 + rounding).all()
    else:  # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 for normal values
        big = W.abs() > scale[:, None] * 2.0**-6
        assert ((back - W).abs()[big] <= (W.abs() * 2.0**-4 + rounding)[big]).all()
    with pytest.raises(ValueError, match=r"lm.fc: base_quantization must be None or one of \('int8', 'fp8'\)"):
        quantize_weight(W, "int4", name="lm.fc")


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_layer_keeps_the_full_base_factors_and_matches_its_dequantized_math(kind):
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    full = LoLDULinear.from_linear(copy.deepcopy(base), 8)
    quant = LoLDULinear.from_linear(copy.deepcopy(base), 8)
    quant.quantize_base(kind)
    assert quant.weight.dtype.itemsize == 1 and quant.weight.numel() == 40 * 48 and not quant.weight.requires_grad
    assert torch.equal(quant.L, full.L) and torch.equal(quant.U, full.U) and torch.equal(quant.d0, full.d0)
    x = torch.randn(6, 48, requires_grad=True)
    dense = quant.dense_weight()
    assert torch.equal(quant(x), nn.functional.linear(x, dense, quant.bias))  # identical to its base at init
    with torch.no_grad():
        quant.d.mul_(1.2)
        full.d.mul_(1.2)
    y = quant(x)
    y.pow(2).sum().backward()
    ref = references(x, dense, quant.bias, quant.L, quant.U, quant.delta_diagonal(), 2 * y.detach())
    assert_close(y, *ref["y"], torch.float32, "y")
    assert_close(x.grad, *ref["dx"], torch.float32, "dx")
    assert rel_err(y, full(x)) < QUANT_TOL[kind]


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_adapter_moves_between_quantized_and_full_bases(tmp_path, kind):
    torch.manual_seed(0)
    base = TinyLM()
    base_state = copy.deepcopy(base.state_dict())
    targets = ["q_proj", "v_proj", "mlp.0"]
    quantized = copy.deepcopy(base)
    add_loldu(quantized, rank=4, target_modules=targets, base_quantization=kind)
    opt = torch.optim.Adam(get_loldu_params(quantized), lr=5e-2)
    x = torch.randn(6, 16)
    for _ in range(4):
        opt.zero_grad()
        quantized(x).pow(2).mean().backward()
        opt.step()
    save_loldu(quantized, tmp_path / "q")
    full = TinyLM()
    full.load_state_dict(base_state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fingerprint is the unquantized weight's: no "not identical"
        load_loldu(full, tmp_path / "q")
    assert rel_err(full(x), quantized(x)) < QUANT_TOL[kind]
    save_loldu(full, tmp_path / "full")
    back = TinyLM()
    back.load_state_dict(base_state)
    add_loldu(back, rank=4, target_modules=targets, base_quantization=kind)
    load_loldu(back, tmp_path / "full")
    assert torch.equal(back(x), quantized(x))


def test_merge_remove_half_and_checkpoints_of_a_quantized_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    add_loldu(model, rank=4, base_quantization="int8")
    with torch.no_grad():
        for p in get_loldu_params(model):
            p.mul_(1.1)
    x = torch.randn(5, 16)
    y = model(x)
    reference = (float64_copy(model), x.double())
    state = model.state_dict()
    assert state["0.weight"].dtype == torch.int8 and state["0.weight_scale"].dtype == torch.float32
    merged, removed, halved = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    merge_loldu(merged)  # documented choice: a full-precision weight, W0 dequantized + delta, no requantizing
    assert type(merged[0]) is nn.Linear and merged[0].weight.dtype == torch.float32
    assert_float64_close(merged(x), lambda m, x: m(x), *reference, name="merged")
    remove_loldu(removed)
    assert torch.equal(removed[0].weight, model[0].dense_weight()) and not hasattr(removed[0], "weight_scale")
    halved.half()
    assert halved[0].weight.dtype == torch.int8 and halved[0].weight_scale.dtype == torch.float32
    assert halved[0].L.dtype == torch.float16 and halved[0].d.dtype == torch.float32
    assert_float64_close(halved(x.half()), lambda m, x: m(x), *reference, dtype=torch.float16, name="halved")
    with pytest.raises(ValueError, match=r"0: holds a quantized \(int8\) base; a torch.float32 weight cannot be loaded"):
        model[0].load_state_dict({"weight": torch.randn(24, 16), "bias": torch.randn(24)}, strict=False)
    reloaded = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    add_loldu(reloaded, rank=4, base_quantization="int8")
    # a quantized checkpoint alone: the factors (and d0) come from the dequantized weight, so e moves at the
    # quantization level
    reloaded.load_state_dict(state)
    assert torch.equal(reloaded[0].weight, model[0].weight)
    assert rel_err(reloaded(x), y) < 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_gpu_quantized_kernels_match_the_dequantized_reference(kind):
    if kind == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 e4m3 needs compute capability 8.9+")
    import loldu_triton.kernels.launch as k

    g = torch.Generator(device="cuda").manual_seed(0)
    M, K, N, r = 512, 4096, 4096, 64
    q, sc = quantize_weight(torch.randn(N, K, device="cuda", generator=g) * K**-0.5, kind)
    x, dy = (torch.randn(M, K, device="cuda", generator=g).bfloat16(),
             torch.randn(M, N, device="cuda", generator=g).bfloat16())
    L = (torch.randn(N, r, device="cuda", generator=g) * r**-0.5).bfloat16()
    U = (torch.randn(r, K, device="cuda", generator=g) * K**-0.5).bfloat16()
    e = torch.randn(r, device="cuda", generator=g)
    W = dequantize(q, sc, torch.float64)
    for route in ("side", "merged"):
        y, t = k.forward(x, q, None, L, U, e, route=route, weight_scale=sc)
        dx, ge = k.backward(dy, t, q, L, U, e, route=route, weight_scale=sc)
        ref = references(x, W, None, L, U, e, dy, t)
        for name, out in (("y", y), ("dx", dx), ("grad_e", ge)):
            assert_close(out, *ref[name], torch.bfloat16, f"{kind} {route} {name}")
