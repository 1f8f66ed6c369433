"""A weight-only quantized frozen base (int8, fp8 e4m3) under LoLDU: PyTorch path, kernels (interpreter),
adapter files between quantized and full bases, merge/remove, dtype moves."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from conftest import rel_err, run_interpreted
from loldu_triton import LoLDULinear, add_loldu, get_loldu_params, load_loldu, merge_loldu, remove_loldu, save_loldu
from loldu_triton.quant import dequantize, quantize_weight
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
    if kind == "int8":  # rounding to nearest: at most half a step per element
        assert ((back - W).abs() <= scale[:, None] / 2 + 1e-7).all()
    else:  # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 for normal values
        big = W.abs() > scale[:, None] * 2.0**-6
        assert ((back - W).abs()[big] <= W.abs()[big] * 2.0**-4 + 1e-7).all()
    with pytest.raises(ValueError, match=r"lm.fc: base_quantization must be one of \['fp8', 'int8'\]"):
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
    e = quant.loldu_scale().detach().double()
    w_eff = dense.double() + quant.L.double() @ torch.diag(e) @ quant.U.double()
    x64 = x.detach().double().requires_grad_(True)
    y64 = x64 @ w_eff.T + quant.bias.double()
    y64.pow(2).sum().backward()
    assert rel_err(y, y64) < 1e-5 and rel_err(x.grad, x64.grad) < 1e-5
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
    state = model.state_dict()
    assert state["0.weight"].dtype == torch.int8 and state["0.weight_scale"].dtype == torch.float32
    merged, removed, halved = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    merge_loldu(merged)  # documented choice: a full-precision weight, W0 dequantized + delta, no requantizing
    assert type(merged[0]) is nn.Linear and merged[0].weight.dtype == torch.float32
    assert rel_err(merged(x), y) < 1e-5
    remove_loldu(removed)
    assert torch.equal(removed[0].weight, model[0].dense_weight()) and not hasattr(removed[0], "weight_scale")
    halved.half()
    assert halved[0].weight.dtype == torch.int8 and halved[0].weight_scale.dtype == torch.float32
    assert halved[0].L.dtype == torch.float16 and halved[0].d.dtype == torch.float32
    assert rel_err(halved(x.half()), y) < 1e-2
    with pytest.raises(ValueError, match=r"0: holds a quantized \(int8\) base; a torch.float32 weight cannot be loaded"):
        model[0].load_state_dict({"weight": torch.randn(24, 16), "bias": torch.randn(24)}, strict=False)
    reloaded = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    add_loldu(reloaded, rank=4, base_quantization="int8")
    # a quantized checkpoint alone: the factors (and d0) come from the dequantized weight, so e moves at the
    # quantization level
    reloaded.load_state_dict(state)
    assert torch.equal(reloaded[0].weight, model[0].weight)
    assert rel_err(reloaded(x), y) < 3e-2


WORKER = r'''
import json, torch, torch.nn as nn
import loldu_triton.kernels.loldu_linear as k
from loldu_triton import LoLDULinear
from loldu_triton.quant import dequantize, quantize_weight
torch.manual_seed(0)
out = {}
for kind in ("int8", "fp8"):
    for dtype in (torch.float32, torch.float16):
        M, K, N, r = 37, 45, 29, 5
        q, sc = quantize_weight(torch.randn(N, K), kind)
        Wd = dequantize(q, sc, torch.float64)
        x, dy = torch.randn(M, K).to(dtype), torch.randn(M, N).to(dtype)
        L, U, b, e = torch.randn(N, r).to(dtype), torch.randn(r, K).to(dtype), torch.randn(N).to(dtype), torch.randn(r)
        W_eff = Wd + L.double() @ torch.diag(e.double()) @ U.double()
        def rel(a, ref):
            return float((a.double() - ref).norm() / ref.norm())
        for route in ("side", "merged"):
            y_out = torch.full((M, N), float("nan"), dtype=dtype)
            y, t = k.forward(x, q, b, L, U, e, route=route, weight_scale=sc, y_out=y_out)
            dx, ge = k.backward(dy, t, q, L, U, e, route=route, weight_scale=sc)
            v = dy.double() @ L.double()
            out[f"{kind}/{dtype}/{route}"] = [rel(y, x.double() @ W_eff.T + b.double()), rel(dx, dy.double() @ W_eff),
                                              rel(ge, (t.double() * v).sum(0))]
        out[f"{kind}/{dtype}/merge"] = [rel(k.merge(q, L, U, e, weight_scale=sc), W_eff)]
    layer = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        m = LoLDULinear.from_linear(nn.Linear(45, 29), 5, backend=backend)
        m.quantize_base(kind)
        with torch.no_grad():
            m.d.mul_(1.3)
        xx = torch.randn(3, 7, 45, requires_grad=True)
        m(xx).pow(2).sum().backward()
        layer[backend] = (m(xx).detach(), xx.grad, m.d.grad)
    out[f"{kind}/layer"] = [float((a - b).norm() / b.norm()) for a, b in zip(layer["triton"], layer["torch"])]
print(json.dumps(out))
'''


def test_kernels_read_the_quantized_base_under_the_interpreter():
    pytest.importorskip("triton")
    res = run_interpreted(WORKER)
    assert len(res) == 2 * (2 * 3 + 1)
    for case, errs in res.items():
        tol = 5e-3 if "float16" in case else 1e-5  # outputs rounded to fp16; fp32 exact up to accumulation
        assert all(err < tol for err in errs), (case, errs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_gpu_quantized_kernels_match_the_dequantized_reference(kind):
    if kind == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 e4m3 needs compute capability 8.9+")
    import loldu_triton.kernels.loldu_linear as k

    g = torch.Generator(device="cuda").manual_seed(0)
    M, K, N, r = 512, 4096, 4096, 64
    q, sc = quantize_weight(torch.randn(N, K, device="cuda", generator=g) * K**-0.5, kind)
    x, dy = (torch.randn(M, K, device="cuda", generator=g).bfloat16(),
             torch.randn(M, N, device="cuda", generator=g).bfloat16())
    L = (torch.randn(N, r, device="cuda", generator=g) * r**-0.5).bfloat16()
    U = (torch.randn(r, K, device="cuda", generator=g) * K**-0.5).bfloat16()
    e = torch.randn(r, device="cuda", generator=g)
    W_eff = dequantize(q, sc, torch.float64) + L.double() @ torch.diag(e.double()) @ U.double()
    for route in ("side", "merged"):
        y, t = k.forward(x, q, None, L, U, e, route=route, weight_scale=sc)
        dx, _ = k.backward(dy, t, q, L, U, e, route=route, weight_scale=sc)
        assert rel_err(y, x.double() @ W_eff.T) < 2e-2 and rel_err(dx, dy.double() @ W_eff) < 2e-2
