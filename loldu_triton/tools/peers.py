"""The layers the benchmarks compare: the frozen nn.Linear (the floor), LoLDULinear and its quantized bases, the
unfused PyTorch form, the reference code's parametrization, and PEFT's LoRA and VeRA at the same rank."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.linear import LoLDULinear

class UnfusedLoLDU(nn.Module):
    """LoLDU written with plain autograd ops: the PyTorch form without a custom backward."""

    def __init__(self, layer: LoLDULinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        return F.linear(x, m.weight, m.bias) + ((x @ m.U.T) * m.delta_diagonal().to(x.dtype)) @ m.L.T


class SeedParametrization(nn.Module):
    """What the reference code does: a dense out x out P, W rebuilt from the residual on every forward."""

    def __init__(self, layer: LoLDULinear):
        super().__init__()
        m = layer
        self.bias = m.bias
        P = torch.zeros(m.out_features, m.out_features, dtype=m.weight.dtype, device=m.weight.device)
        rows = m.pivots
        taken = set(rows.tolist())
        # L in elimination order (P^T L): the pivot rows first, then the rest
        rest = torch.tensor([i for i in range(m.out_features) if i not in taken], dtype=torch.long, device=rows.device)
        order = torch.cat([rows, rest])
        P[order, torch.arange(m.out_features, device=rows.device)] = 1
        self.register_buffer("P", P)
        self.register_buffer("L_elim", m.L[order])
        self.register_buffer("U", m.U)
        self.register_buffer("W_res", m.weight - m.L @ (m.d0.to(m.weight.dtype)[:, None] * m.U) * m.s0.item())
        self.z = nn.Parameter(m.d.detach().clone())
        self.sigma = nn.Parameter(m.s.detach().clone())

    def forward(self, x):
        delta = self.P @ (self.L_elim @ ((self.sigma * self.z).to(x.dtype)[:, None] * self.U))
        return F.linear(x, self.W_res + delta, self.bias)


def _peft_module(kind: str, base: nn.Linear, rank: int) -> Optional[nn.Module]:
    try:
        import peft
    except ImportError:
        return None

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    config = (peft.LoraConfig(r=rank, target_modules=["proj"]) if kind == "lora"
              else peft.VeraConfig(r=rank, target_modules=["proj"]))
    return peft.get_peft_model(Wrapper(), config)


def build_methods(K: int, N: int, rank: int, dtype, device, wanted) -> Dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Linear(K, N, device=device, dtype=dtype)
    base.requires_grad_(False)
    layer = LoLDULinear.from_linear(base, rank)
    with torch.no_grad():  # a trained state, so no path can shortcut e == 0
        layer.d.mul_(1.01)

    def quantized(kind):
        if kind == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            return None
        q = LoLDULinear.from_parametrization(base, layer)
        q.quantize_base(kind)
        return q

    candidates: Dict[str, Callable[[], Optional[nn.Module]]] = {
        "linear": lambda: base,
        "loldu": lambda: layer,
        # the PyTorch path of the same layer; on CPU it is what "loldu" runs already
        "loldu_torch": lambda: LoLDULinear.from_parametrization(base, layer, backend="torch")
        if device.type != "cpu" else None,
        "loldu_int8": lambda: quantized("int8"),
        "loldu_fp8": lambda: quantized("fp8"),
        "loldu_unfused": lambda: UnfusedLoLDU(layer),
        "seed_param": lambda: SeedParametrization(layer),
        "peft_lora": lambda: _peft_module("lora", base, rank),
        "peft_vera": lambda: _peft_module("vera", base, rank),
    }
    out = {}
    for name in wanted:
        module = candidates[name]()
        if module is not None:
            out[name] = module
    return out


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward beyond the module's own parameters and buffers (x counts)."""
    own = {t.data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    seen: Dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in own:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())
