"""LoLDULinear and the seed API on the Triton backend, run by the Triton interpreter in a subprocess
(the interpreter must be on before triton kernels are defined; this pytest process may have defined them)."""
import os

import pytest
import torch
import torch.nn as nn

from conftest import run_interpreted

pytest.importorskip("triton")

WORKER = r'''
import json, torch, torch.nn as nn
import loldu_triton.kernels.loldu_linear as kernels
from loldu_triton import add_loldu, get_loldu_params, merge_loldu

calls = {"forward": 0, "backward": 0, "merge": 0}
for name in calls:
    original = getattr(kernels, name)
    def counted(*args, _name=name, _original=original, **kwargs):
        calls[_name] += 1
        return _original(*args, **kwargs)
    setattr(kernels, name, counted)

def model_and_data(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(45, 29), nn.GELU(), nn.Linear(29, 13, bias=False))
    return model, torch.randn(2, 19, 45), torch.randn(2, 19, 13)

result = {}
states = {}
for backend in ("torch", "triton"):
    model, x, target = model_and_data(0)
    add_loldu(model, rank=5, backend=backend)
    opt = torch.optim.Adam(get_loldu_params(model), lr=1e-2)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous leading dims
    for _ in range(3):
        opt.zero_grad()
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
    y = model(x).detach()
    merge_loldu(model)
    states[backend] = (torch.cat([p.detach().flatten() for p in get_loldu_params(model)] or [torch.zeros(0)]),
                       y, model(x).detach())
t, g = states["torch"], states["triton"]
def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())
result["y_rel"] = rel(g[1], t[1])
result["merged_rel"] = rel(g[2], t[2])
result["merged_vs_unmerged_rel"] = rel(g[2], g[1])
result["calls"] = dict(calls)

# many adapters in one batch: the per-row gather in the GEMM epilogue, against the PyTorch path
from loldu_triton import adapter_batch
batched = {}
for backend in ("torch", "triton"):
    model, x, target = model_and_data(1)
    add_loldu(model, rank=5, backend=backend)
    gen = torch.Generator().manual_seed(3)
    for layer in (model[0], model[2]):
        with torch.no_grad():
            layer.d.add_(torch.randn(5, generator=gen))
        for name in ("a", "b"):
            layer.set_named_adapter(name, torch.randn(5, generator=gen))
    x = x.repeat(2, 1, 1).requires_grad_(True)  # 4 batch rows of 19 tokens
    with adapter_batch(model, ["b", None, "default", "a"]):
        y = model(x)
        y.pow(2).sum().backward()
    batched[backend] = (y.detach(), x.grad, model[0].d.grad, model[2].d.grad)
result["batch_rel"] = [rel(g, t) for g, t in zip(batched["triton"], batched["torch"])]
print(json.dumps(result))
'''


def test_layer_on_triton_backend_trains_like_the_torch_path_and_launches_the_kernels():
    res = run_interpreted(WORKER)
    assert res["y_rel"] < 1e-5 and res["merged_rel"] < 1e-5 and res["merged_vs_unmerged_rel"] < 1e-5
    # forward: 2 layers x (3 training steps + 1 final forward); backward kernel: the second layer only, 3 steps
    # (the first layer's input needs no gradient, so no dX GEMM runs there); merge once per layer
    assert res["calls"] == {"forward": 8, "backward": 3, "merge": 2}
    assert all(err < 1e-5 for err in res["batch_rel"]), res["batch_rel"]  # y, dx, grad of both layers' d


def test_triton_backend_on_cpu_without_interpreter_raises_instead_of_falling_back():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs the non-interpreted code path")
    from loldu_triton import LoLDULinear

    layer = LoLDULinear.from_linear(nn.Linear(8, 6), 3, backend="triton", name="enc.fc")
    with pytest.raises(RuntimeError, match="Triton kernels need CUDA tensors"):
        layer(torch.randn(2, 8))
