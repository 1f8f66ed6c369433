"""LoLDULayer: what the LoLDU layers share. Each wraps a base layer (sharing its frozen weight and bias, no
copy), keeps the base's fingerprint, merges and unmerges, and gives the plain base layer back."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from ..core.config import LoLDUConfig
from ..core.settings import QUANTIZED_DTYPES, check_backend, check_dropout
from ..factors.fingerprint import weight_checksum, weight_sketch
from ..factors.quant import dequantize
from ..ops.functional import loldu_merged_weight
from .state import LoLDUMixin

# What accelerate's add_hook_to_module puts on a module instance.
_ACCELERATE_HOOK = ("forward", "_old_forward", "_hf_hook")


def _own_copy(value):
    """A module attribute as a new module of another class may hold it: its own containers, shared tensors."""
    return copy.copy(value) if isinstance(value, (dict, set, list)) else value


class LoLDULayer(LoLDUMixin):
    """What the LoLDU layers share: they wrap a base layer, sharing its frozen weight and bias (no copy)."""

    base_class: type = nn.Module

    @classmethod
    def from_base(
        cls,
        module: nn.Module,
        rank: int,
        alpha: Optional[float] = None,
        init: str = "lu",
        init_seed: int = 0,
        backend: str = "auto",
        name: Optional[str] = None,
        freeze: bool = True,
        *,
        dropout: float = 0.0,
    ):
        """Wrap ``module`` (a ``base_class``), keeping all its attributes and sharing its weight and bias.

        ``freeze=False`` leaves their requires_grad untouched until ``freeze_base()``, so a caller can build
        several layers and commit only when all succeeded. ``dropout``: see the ``dropout`` attribute.
        """
        self = cls._shell(module)
        self._setup(rank, alpha, init, init_seed, backend, name, freeze, dropout=dropout)
        return self

    @classmethod
    def from_parametrization(cls, module: nn.Module, parametrization: LoLDUMixin, backend="auto", name=None,
                             freeze=True, *, dropout: float = 0.0):
        """Wrap ``module`` with the factors and values of a LoLDUParametrization of its weight."""
        self = cls._shell(module)
        p = parametrization
        self._setup(p.rank, p.alpha, p.init, p.init_seed, backend, name, freeze, source=p, dropout=dropout)
        return self

    @classmethod
    def _shell(cls, module: nn.Module):
        self = cls.__new__(cls)
        # Same attributes (stride, padding_idx, hooks, ...) and the same parameter objects; own containers. Not
        # an accelerate hook's forward wrapper, which is bound to ``module``: api._replace attaches the hook anew.
        self.__dict__.update({k: _own_copy(v) for k, v in module.__dict__.items() if k not in _ACCELERATE_HOOK})
        return self

    def weight2d(self) -> torch.Tensor:
        """The weight viewed as the matrix LoLDU factors: out x everything else."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def _setup(self, rank, alpha, init, init_seed, backend, name, freeze, source=None, dropout=0.0):
        if "_base_state" not in self.__dict__:  # (wrapping a LoLDU layer again keeps its base's record)
            # What the base layer itself holds, so that to_base() gives back exactly that.
            self._base_state = (set(self.__dict__), set(self._parameters), set(self._buffers))
        out_f, in_f = self.weight2d().shape
        name = name or f"{type(self).__name__}({out_f}x{in_f})"
        self.backend = check_backend(backend, name)
        self._loldu_dropout = self._checked_dropout(dropout, name)
        self._check_supported(name)
        self.base_requires_grad = (self.weight.requires_grad, self.bias is not None and self.bias.requires_grad)
        self._init_loldu(self.factor_weight(), rank, alpha, init, init_seed, name, source)
        if freeze:
            self.freeze_base()

    def _check_supported(self, name: str) -> None:
        """Raise for base-layer options LoLDU cannot honour."""

    # A plain attribute (torch.compile guards it), set through the ``dropout`` property, which checks it.
    _loldu_dropout = 0.0
    input_dropout = True  # whether the layer's input can be dropped (not an embedding's indices)

    @property
    def dropout(self) -> float:
        """The probability of dropping an input of the rank-r path in training mode (PEFT's lora_dropout): that
        path reads dropout(x), the base path x itself. No effect in eval mode or at 0."""
        return self._loldu_dropout

    @dropout.setter
    def dropout(self, p) -> None:
        self._loldu_dropout = self._checked_dropout(p, self.loldu_name)

    def _checked_dropout(self, p, name: str) -> float:
        p = check_dropout(p, name)
        if p and not self.input_dropout:
            raise ValueError(f"{name}: dropout must be 0 for a {type(self).__name__}: its input is indices, "
                             f"not features to drop")
        return p

    def side_dropout(self) -> float:
        """The dropout this forward applies: ``dropout`` in training mode, else 0."""
        return self._loldu_dropout if self.training else 0.0

    def freeze_base(self) -> None:
        """requires_grad=False on the base weight and bias (to_base() gives their previous flags back)."""
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    base_quantization: Optional[str] = None  # "int8" / "fp8" once quantize_base() ran
    # The kind of a base another library quantized (factors.quantized_bases), for LoLDUQuantizedLinear.
    quantized_by: Optional[str] = None
    # The identity of the unquantized base, kept when quantizing it: (sha256, sketch, dtype name).
    base_identity: Optional[tuple] = None

    def base_fingerprint(self) -> tuple:
        """(sha256, weight_sketch, precision) of the base weight: of the unquantized one where the layer
        quantized it; the precision names the dtype (or quantization) whose rounding the sketch carries."""
        if self.base_identity is not None:
            return self.base_identity
        if self.loldu_merged:  # (never quantized: merge_weights refuses those)
            weight = self.base_weight()
            return (weight_checksum(weight), weight_sketch(weight.reshape(weight.shape[0], -1)),
                    str(weight.dtype).replace("torch.", ""))
        if self.weight.is_meta:
            raise ValueError(f"{self.loldu_name}: the base weight is on the meta device; load real weights first")
        precision = self.base_quantization or str(self.weight.dtype).replace("torch.", "")
        return weight_checksum(self.weight), weight_sketch(self.factor_weight()), precision

    def loldu_settings(self) -> LoLDUConfig:
        """This layer's settings as a LoLDUConfig (rank and alpha as the layer holds them)."""
        return LoLDUConfig(rank=self.rank, alpha=self.alpha, init=self.init, init_seed=self.init_seed,
                           base_quantization=self.base_quantization, backend=self.backend, dropout=self.dropout)

    # The layer's state is two independent flags, enabled and merged (plus the adapter names, in state.py);
    # model/manage.py holds the transitions. Merged, ``weight`` is what the flags say to serve: W0 + delta when
    # enabled, W0 when disabled; the other tensor waits in __dict__["_premerge"].
    # Plain attributes, which torch.compile guards (a key missing from __dict__ it does not).
    _loldu_on = True
    _loldu_merged = False

    @property
    def loldu_enabled(self) -> bool:
        """Whether the adapter acts: False serves the base W0, merged or not."""
        return self._loldu_on

    @loldu_enabled.setter
    def loldu_enabled(self, enabled: bool) -> None:
        enabled = bool(enabled)
        if self.loldu_merged and enabled != self.loldu_enabled:
            self.weight, self.__dict__["_premerge"] = self.__dict__["_premerge"], self.weight
        self._loldu_on = enabled

    @property
    def loldu_merged(self) -> bool:
        """Whether merge_weights() holds W0 + delta ready (until unmerge_weights())."""
        return self._loldu_merged

    def base_weight(self) -> torch.Tensor:
        """The base weight tensor W0 itself, merged or not."""
        if self.loldu_merged and self.loldu_enabled:
            return self.__dict__["_premerge"]
        return self.weight

    def serves_plain(self) -> bool:
        """Whether forward is the base layer's on ``weight``: disabled, or merged."""
        return not self.loldu_enabled or self.loldu_merged

    @torch.no_grad()
    def merge_weights(self) -> None:
        """Serve with W0 + L diag(e) U in one plain GEMM (no rank-r path), keeping the base weight itself
        aside: unmerge_weights() puts that same tensor back, bit for bit, and training can go on. The enabled
        flag is left as it is (disabled, the base is served). A layer already merged stays as it is."""
        if self.loldu_merged:
            return
        if self.base_quantization is not None:
            raise ValueError(f"{self.loldu_name}: the base is quantized ({self.base_quantization}); a merged weight "
                             f"would be a full-precision copy next to it. Serve it unmerged (the kernels "
                             f"dequantize in the GEMM), or merge for good with merge_loldu(model)")
        merged = nn.Parameter(self.merged_weight(), requires_grad=False)
        if self.loldu_enabled:
            self.__dict__["_premerge"] = self.weight
            self.weight = merged
        else:
            self.__dict__["_premerge"] = merged
        self._loldu_merged = True

    def unmerge_weights(self) -> None:
        """Undo merge_weights(): the base weight (the same tensor) comes back; enabled stays as it is."""
        if not self.loldu_merged:
            return
        base = self.base_weight()
        del self.__dict__["_premerge"]
        self._loldu_merged = False
        self.weight = base

    def factor_weight(self) -> torch.Tensor:
        """The 2-D weight the factors come from: the weight, or a quantized one dequantized (its unquantized
        weight is gone)."""
        return self.dense_weight().reshape(self.weight.shape[0], -1)

    def dense_weight(self) -> torch.Tensor:
        """W0 in the compute dtype: the weight itself, or the quantized one dequantized."""
        if self.base_quantization is None:
            return self.weight
        return dequantize(self.weight2d(), self.weight_scale, self.L.dtype).view(self.weight.shape)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + L diag(e) U in the weight's shape and the compute dtype."""
        merged = loldu_merged_weight(self.weight2d(), self.L, self.U, self.delta_diagonal(), backend=self.backend,
                             weight_scale=getattr(self, "weight_scale", None))
        return merged.view(self.weight.shape)

    def merged_weight_held(self) -> torch.Tensor:
        """The W0 + delta that merge_weights() computed."""
        return self.weight if self.loldu_enabled else self.__dict__["_premerge"]

    def to_base(self, merge: bool) -> nn.Module:
        """The plain base layer: the base weight itself (merge=False) or W0 + delta (merge=True), also from a
        layer that merge_weights() merged."""
        base = self.base_class.__new__(self.base_class)
        attrs, params, buffers = self._base_state
        base.__dict__.update({k: _own_copy(v) for k, v in self.__dict__.items() if k in attrs})
        for store, keep in (("_parameters", params), ("_buffers", buffers)):
            for key in set(getattr(base, store)) - keep:
                del getattr(base, store)[key]
        base._non_persistent_buffers_set &= buffers
        w_grad, b_grad = self.base_requires_grad
        if merge:
            merged = self.merged_weight_held() if self.loldu_merged else self.merged_weight()
            base.weight = nn.Parameter(merged.detach(), requires_grad=w_grad)
        elif self.loldu_merged:
            base.weight = self.base_weight()
        elif self.base_quantization is not None:  # the dequantized base: the unquantized one is gone
            base.weight = nn.Parameter(self.dense_weight().detach().clone(), requires_grad=w_grad)
        else:
            base.weight = self.weight
        base.weight.requires_grad_(w_grad)
        if self.bias is not None:
            self.bias.requires_grad_(b_grad)
        return base

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        incoming = state_dict.get(prefix + "weight")
        if self.loldu_merged and incoming is not None:
            raise ValueError(f"{self.loldu_name}: the layer is merged (merge_loldu(..., reversible=True)); "
                             f"unmerge_loldu(model) before loading a state dict into it")
        if self.base_quantization is not None and incoming is not None and incoming.dtype != self.weight.dtype:
            raise ValueError(f"{self.loldu_name}: holds a quantized ({self.base_quantization}) base; a "
                             f"{incoming.dtype} weight cannot be loaded into it. Load the full-precision "
                             f"checkpoint before add_loldu(..., base_quantization=...)")
        if self.base_quantization is None and incoming is not None and incoming.dtype in QUANTIZED_DTYPES:
            raise ValueError(f"{self.loldu_name}: the checkpoint holds a quantized ({incoming.dtype}) weight and "
                             f"this layer's base is not quantized; its codes would be read as weights. Use "
                             f"add_loldu(..., base_quantization=...) with the same kind before loading it")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if incoming is not None:
            # A new base weight: its factors change, and a fresh adapter must again start at e == 0. A quantized
            # checkpoint has no unquantized weight: its factors come from the dequantized one.
            self.base_identity = None
            self._refactorize(self.factor_weight())
            if prefix + "d" not in state_dict:
                self.reset_loldu()

    def follow_pivots(self, pivots) -> None:
        """Refactorize the base weight in the elimination order ``pivots`` (an adapter's, trained on another
        copy of this base: a quantized one, or the full-precision one), back at init."""
        self._refactorize(self.factor_weight(), pivots)
        self.reset_loldu()

    def batch_table_row(self, name: Optional[str]) -> int:
        """The row of the per-batch table for an adapter name: 0 is "no adapter" (None, or an adapter this layer
        lacks), 1 the trainable adapter, then the named ones."""
        if name == self.active_adapter:
            return 1
        return 2 + self.adapter_names.index(name) if name in self.adapter_names else 0

    def batch_diagonals(self, e: torch.Tensor, x: torch.Tensor, rows_here: torch.Tensor):
        """Within adapter_batch: (table of e: none, the trainable adapter, the named ones; the table row of each
        row of x flattened to (M, in))."""
        if x.dim() < 2 or x.shape[0] != rows_here.shape[0]:
            raise ValueError(f"{self.loldu_name}: adapter_batch has {rows_here.shape[0]} names but the "
                             f"input of shape {tuple(x.shape)} has {x.shape[0] if x.dim() else 0} rows")
        named = getattr(self, "adapter_table", None)
        named = named if named is not None else e.new_empty(0, self.rank)
        table = torch.cat([torch.zeros_like(e)[None], e[None], named])
        return table, rows_here.repeat_interleave(x[0].numel() // self.in_features)

    def _check_width(self, x: torch.Tensor, dim: int, expected: int, what: str) -> None:
        if x.dim() < -dim or x.shape[dim] != expected:
            size = x.shape[dim] if x.dim() >= -dim else None
            raise ValueError(f"{self.loldu_name}: input of shape {tuple(x.shape)} has {what} {size}, "
                             f"expected {expected}")

    def _loldu_repr(self) -> str:
        state = (", merged" if self.loldu_merged else "") + ("" if self.loldu_enabled else ", disabled")
        dropout = f", dropout={self.dropout:g}" if self.dropout else ""
        return f", rank={self.rank}, alpha={self.alpha:g}, init={self.init!r}" + dropout + state
