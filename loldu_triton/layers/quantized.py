"""LoLDUQuantizedLinear: LoLDU on a base another library quantized (bitsandbytes Linear4bit / Linear8bitLt,
torchao int8 / int4 weight-only nn.Linear).

The quantized module stays whole, as the child ``base_layer`` (as PEFT keeps it), and its own forward, with
its own kernels, computes x W0^T + b; LoLDU adds its rank-r term ((x U^T) * e) L^T. The factors come from the
weight as the library dequantizes it (factors.quantized_bases). At init e == 0, so the output is the quantized
base's own output bit for bit; disabled, it is that output itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.formulas import shrink_dtype, side_term
from ..core.settings import warn_caller
from ..factors.fingerprint import weight_checksum, weight_sketch
from ..factors.quantized_bases import compute_dtype, dequantized_weight, quantized_kind, why_not_dequantizable
from ..ops.functional import loldu_merged_weight
from .base import LoLDULayer
from .batch import batch_rows

MERGE_ROUNDING = ("merge_loldu: layers with a quantized base (bitsandbytes, torchao) become full-precision "
                  "nn.Linear layers holding the dequantized weight plus the adapter's delta; their outputs differ "
                  "from the quantized model's by the base's rounding (quantize the merged model again to serve "
                  "it small)")


class LoLDUQuantizedLinear(LoLDULayer, nn.Module):
    """``y = base_layer(x) + ((x U^T) * e) L^T`` for a quantized ``base_layer``. Trainable: ``d`` and ``s``."""

    base_class = nn.Linear

    @classmethod
    def _shell(cls, module: nn.Module):
        kind = quantized_kind(module)
        reason = why_not_dequantizable(module, kind) if kind is not None else "it is not a quantized layer"
        if reason:
            raise ValueError(f"LoLDUQuantizedLinear: cannot wrap {type(module).__name__}: {reason}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.base_layer = module
        self.register_load_state_dict_post_hook(_after_state_dict)
        self.quantized_by = kind
        self.in_features, self.out_features = int(module.in_features), int(module.out_features)
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The base's quantized weight (packed as its library keeps it)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def dense_weight(self) -> torch.Tensor:
        """W0 (out x in) as the base's library dequantizes it."""
        reason = why_not_dequantizable(self.base_layer, self.quantized_by)
        if reason:
            raise ValueError(f"{self.loldu_name}: cannot read the base weight: {reason}")
        return dequantized_weight(self.base_layer, self.quantized_by)

    def weight2d(self) -> torch.Tensor:
        """The weight as the matrix LoLDU factors: the dequantized one (out x in)."""
        return self.dense_weight()

    def factor_weight(self) -> torch.Tensor:
        """The dequantized weight in the base's compute dtype, which the factors come from (and take)."""
        return self.dense_weight().to(compute_dtype(self.base_layer, self.quantized_by))

    def freeze_base(self) -> None:
        """requires_grad=False on the base's weight and bias (a quantized weight never needs a gradient)."""
        for p in (self.weight, self.bias):
            if p is not None and p.requires_grad:
                p.requires_grad_(False)

    def _setup(self, *args, **kwargs):
        super()._setup(*args, **kwargs)
        # Taken now: bitsandbytes may later repack a 4-bit weight for its CPU kernel, which cannot be read back.
        dense = self.dense_weight()
        self.base_identity = (weight_checksum(dense), weight_sketch(dense), self.quantized_by)

    def base_fingerprint(self) -> tuple:
        """(sha256, sketch, kind) of the dequantized weight, taken when LoLDU was added: the precision names the
        quantization, whose rounding the sketch carries."""
        return self.base_identity

    def merge_weights(self) -> None:
        """Refused: a reversible merge would keep a full-precision weight next to the quantized one."""
        raise ValueError(f"{self.loldu_name}: the base is quantized ({self.quantized_by}); a reversible merge would "
                         f"keep a full-precision copy next to it. Serve it unmerged, or merge for good with "
                         f"merge_loldu(model), which gives a full-precision nn.Linear")

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """Dequantized W0 + L diag(e) U (out x in) in the factors' dtype."""
        return loldu_merged_weight(self.dense_weight().to(self.L.dtype), self.L, self.U, self.delta_diagonal(),
                                   backend=self.backend)

    def to_base(self, merge: bool) -> nn.Module:
        """The quantized base module itself (merge=False), or a full-precision nn.Linear holding dequantized
        W0 + delta (merge=True, with a warning: it is no longer the quantized base)."""
        w_grad, b_grad = self.base_requires_grad
        if not merge:
            if self.bias is not None and self.bias.requires_grad != b_grad:
                self.bias.requires_grad_(b_grad)
            return self.base_layer
        merged = self.merged_weight()
        warn_caller(MERGE_ROUNDING)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=merged.device,
                           dtype=merged.dtype)
        linear.weight = nn.Parameter(merged, requires_grad=w_grad and merged.is_floating_point())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(merged.dtype).clone(), requires_grad=b_grad)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_width(x, -1, self.in_features, "last dim")
        y = self.base_layer(x)
        if self.serves_plain():
            return y
        e, rows = self.delta_diagonal(), None
        rows_here = batch_rows(self)
        if rows_here is not None:
            e, rows = self.batch_diagonals(e, x, rows_here)
        U = self.U
        dtype = shrink_dtype(U.dtype)
        p = self.side_dropout()
        side_input = F.dropout(x, p, training=True) if p else x  # (the base path reads x itself)
        t = F.linear(side_input.reshape(-1, self.in_features).to(dtype), U.to(dtype))
        side = side_term(t, e if rows is None else e[rows], self.L.T, y.dtype)
        return y + side.reshape(y.shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A new base weight loads into base_layer after this: _after_state_dict refactorizes then.
        self.__dict__["_reloading"] = (prefix + "base_layer.weight" in state_dict, prefix + "d" in state_dict)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, base={self.quantized_by}"
                + self._loldu_repr())


def _after_state_dict(layer: LoLDUQuantizedLinear, incompatible) -> None:
    """After load_state_dict: a base weight that came in gives new factors and a new fingerprint, as a
    LoLDULinear's does; a fresh adapter (no d in the state dict) starts again at e == 0."""
    base_loaded, adapter_loaded = layer.__dict__.pop("_reloading", (False, False))
    if not base_loaded:
        return
    dense = layer.dense_weight()
    layer.base_identity = (weight_checksum(dense), weight_sketch(dense), layer.quantized_by)
    d, s = layer.d.detach().clone(), layer.s.detach().clone()
    layer._refactorize(layer.factor_weight())
    if adapter_loaded:
        with torch.no_grad():
            layer.d.copy_(d)
            layer.s.copy_(s)
    else:
        layer.reset_loldu()
