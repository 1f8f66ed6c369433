"""LoLDULinear: a drop-in nn.Linear, y = x W^T + b + ((x U^T) * e) L^T, with a cached no-grad shortcut."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..factors.planner import side_rows
from ..factors.quant import quantize_weight
from ..ops.functional import loldu_linear_rows_checked, resolve_backend
from .base import LoLDULayer
from .batch import batch_rows

# Checked on every call of the no-grad shortcut (LoLDULinear._inference), so looked up once.
_is_compiling = torch.compiler.is_compiling
_distributed_up = torch.distributed.is_initialized if torch.distributed.is_available() else (lambda: False)


class _ScaledU(NamedTuple):
    """LoLDULinear's inference cache (see LoLDULinear._scaled_u): diag(e) U and what it was computed from. One
    tuple, replaced whole, so threads never see half an entry."""

    d: torch.Tensor
    s: torch.Tensor
    d_version: int
    s_version: int
    d_ptr: int
    s_ptr: int
    U: torch.Tensor
    L: torch.Tensor
    scaled_u: torch.Tensor
    L_t: torch.Tensor
    dtype: torch.dtype
    device: torch.device
    device_type: str
    in_features: int
    side_rows: int  # up to this many rows the planner takes the side path (planner.side_rows)
    held: tuple


class LoLDULinear(LoLDULayer, nn.Linear):
    """``y = x W^T + b + ((x U^T) * e) L^T``: an nn.Linear (same ``weight``/``bias``, frozen) plus LoLDU.

    Trainable: ``d`` (rank values) and ``s`` (one scale), float32. The factors are non-persistent buffers
    recomputed from ``weight``, so a base checkpoint loads into this layer and then refactorizes it.
    ``dropout``: in training mode the rank-r path reads dropout(x) (PEFT's lora_dropout), the base path x.
    """

    base_class = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        rank: int,
        alpha: Optional[float] = None,
        init: str = "lu",
        init_seed: int = 0,
        backend: str = "auto",
        name: Optional[str] = None,
        dropout: float = 0.0,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._setup(rank, alpha, init, init_seed, backend, name, freeze=True, dropout=dropout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: Optional[float] = None, init: str = "lu",
                    init_seed: int = 0, backend: str = "auto", name: Optional[str] = None,
                    freeze: bool = True, *, dropout: float = 0.0) -> "LoLDULinear":
        """Wrap ``linear`` (see ``from_base``)."""
        return cls.from_base(linear, rank, alpha, init, init_seed, backend, name, freeze, dropout=dropout)

    def reset_parameters(self) -> None:
        if self.base_quantization is not None:
            raise ValueError(f"{self.loldu_name}: reset_parameters would redraw a quantized ({self.base_quantization}) "
                             f"base; build a new layer instead")
        nn.Linear.reset_parameters(self)
        if hasattr(self, "d"):  # nn.Linear.__init__ calls this before the adapter exists
            self._refactorize(self.weight)
            self.reset_loldu()

    def quantize_base(self, kind: str) -> None:
        """Keep W0 as weight-only quantized values ("int8", or "fp8" e4m3) with a float32 scale per output row.

        The factors stay those of the unquantized weight, so an adapter moves between the full and the
        quantized base. The unquantized weight is released once nothing else holds it."""
        if self.base_quantization is not None:
            raise ValueError(f"{self.loldu_name}: the base is already quantized ({self.base_quantization})")
        if kind == "fp8" and self.weight.is_cuda and torch.cuda.get_device_capability(self.weight.device) < (8, 9):
            raise ValueError(f"{self.loldu_name}: fp8 (e4m3) needs a GPU of compute capability 8.9 or newer")
        values, scale = quantize_weight(self.weight, kind, self.loldu_name)
        self.base_identity = self.base_fingerprint()
        self.weight = nn.Parameter(values, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.base_quantization = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.serves_plain():
            self._check_width(x, -1, self.in_features, "last dim")
            return F.linear(x, self.dense_weight(), self.bias)
        rows_here = batch_rows(self)
        dropout = self.side_dropout()
        if rows_here is None and not torch.is_grad_enabled() and not dropout:
            y = self._inference(x)
            if y is not None:
                return y
        elif self.__dict__.get("_scaled_u_entry") is not None:
            self.__dict__["_scaled_u_entry"] = None  # training: no U-sized cache held meanwhile
        e = self.delta_diagonal()
        rows = None
        if rows_here is not None:
            e, rows = self.batch_diagonals(e, x, rows_here)
        return loldu_linear_rows_checked(x, self.weight, self.bias, self.L, self.U, e, self.backend, rows,
                                         getattr(self, "weight_scale", None), self.loldu_name, dropout)

    def __getstate__(self):
        # Copies (deepcopy, pickle) start without the inference cache: their own d and s start new version
        # counters, which could meet the stored ones.
        state = super().__getstate__()
        state.pop("_scaled_u_entry", None)
        return state

    def _inference(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The output without autograd where the PyTorch side path runs: x W^T + b + (x (diag(e) U)^T) L^T, two
        small ops beyond nn.Linear's one (decode, M = 1, pays these per token). None where this shortcut does not
        apply: the general path then runs, with its checks and errors. Skipped under torch.compile (it traces
        the general path), autocast, a quantized base, float16 (x U^T needs float32 there), the Triton backend,
        and with torch.distributed up: FSDP and ZeRO gather parameters without bumping version counters."""
        if _is_compiling():  # before the cache: version counters are not for tracing
            return None
        entry = self._scaled_u()
        dims = x.dim()
        if (entry is None or x.dtype is not entry.dtype or dims == 0 or x.shape[-1] != entry.in_features
                or x.device != entry.device or _distributed_up() or torch.is_autocast_enabled(entry.device_type)):
            return None
        x2 = x if dims == 2 else x.reshape(-1, x.shape[-1])
        if x2.shape[0] > entry.side_rows:
            return None  # many rows: the general path merges W_eff once for the call
        y = F.linear(x2, self._parameters["weight"], self._parameters["bias"])
        y.addmm_(F.linear(x2, entry.scaled_u), entry.L_t)
        return y if dims == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    def _scaled_u(self) -> Optional["_ScaledU"]:
        """The inference cache: diag(e) U in the compute dtype (as many values as U), kept while d and s are
        unchanged (the same tensors, storages and version counters) and the factors are the same tensors.
        In-place ops (optimizers, copy_ under no_grad, load_state_dict, load_loldu) bump those counters; writes
        through ``.data`` bypass them, as they bypass autograd's own checks. Moving the layer (.to) and new
        factors (d0, s0: _refactorize) clear it; so does the next call that records autograd. None where the
        layer cannot take the shortcut."""
        params, buffers = self._parameters, self._buffers
        d, s = params["d"], params["s"]
        entry = self.__dict__.get("_scaled_u_entry")
        try:
            if (entry is not None and entry.d is d and entry.s is s and entry.d_version == d._version
                    and entry.s_version == s._version and entry.d_ptr == d.data_ptr()
                    and entry.s_ptr == s.data_ptr() and entry.U is buffers["U"] and entry.L is buffers["L"]):
                return entry
            return self._fill_scaled_u(d, s)
        except RuntimeError:  # inference tensors (made under torch.inference_mode) have no version counter
            return None

    def _fill_scaled_u(self, d, s) -> Optional["_ScaledU"]:
        U, L, weight = self.U, self.L, self.weight
        if (U.dtype is torch.float16 or weight.dtype is not U.dtype or self.base_quantization is not None
                or resolve_backend(self.backend, U.device) != "torch"):
            self.__dict__["_scaled_u_entry"] = None
            return None
        key = (d._version, s._version, d.data_ptr(), s.data_ptr())
        with torch.no_grad():
            scaled_u = (self.delta_diagonal_of(d, s)[:, None] * U).to(U.dtype)
        entry = _ScaledU(d, s, *key, U, L, scaled_u, L.T, U.dtype, U.device, U.device.type, U.shape[1],
                         side_rows(U.shape[1], L.shape[0], U.shape[0], U.element_size(), U.device.type, False),
                         # the detached d and s hold the storages: while the entry lives, no other tensor
                         # takes their address
                         (d.detach(), s.detach()))
        self.__dict__["_scaled_u_entry"] = entry
        return entry

    def extra_repr(self) -> str:
        quantized = f", base={self.base_quantization}" if self.base_quantization else ""
        return nn.Linear.extra_repr(self) + self._loldu_repr() + quantized
