"""LoLDULinear: a drop-in nn.Linear that trains only a diagonal between frozen LDU factors of its weight."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .factorize import initial_diagonal, ldu_factors, warn_if_rank_deficient
from .functional import loldu_linear, loldu_merge

# Adapter tensors kept in float32 whatever the layer's dtype: the trained ones and their initial values.
_FLOAT32_STATE = ("d", "s", "d0", "s0")
_FACTOR_BUFFERS = ("L", "U", "pivots", "pivot_values", "d0", "s0")


class LoLDUMixin:
    """The adapter state of one 2-D weight: frozen factors L, U, the trained diagonal d and scale s.

    e = s * d - s0 * d0 is the change of the diagonal since init, so the layer equals its base exactly at init.
    """

    def _init_loldu(self, weight2d, rank, alpha, init, init_seed, name, source=None):
        self.rank = int(rank)
        self.alpha = float(self.rank if alpha is None else alpha)
        self.init = init
        self.init_seed = int(init_seed)
        self.loldu_name = name
        self.loldu_enabled = True
        self.d = nn.Parameter(torch.empty(self.rank, dtype=torch.float32, device=weight2d.device))
        self.s = nn.Parameter(torch.empty((), dtype=torch.float32, device=weight2d.device))
        if source is None:
            self._refactorize(weight2d)
            self.reset_loldu()
        else:  # take over the factors and values of another adapter of the same weight
            for buf in _FACTOR_BUFFERS:
                self.register_buffer(buf, getattr(source, buf), persistent=False)
            with torch.no_grad():
                self.d.copy_(source.d)
                self.s.copy_(source.s)

    def _refactorize(self, weight2d: torch.Tensor) -> None:
        """(Re)compute the frozen factors and the initial diagonal from the base weight."""
        factors = ldu_factors(weight2d, self.rank, self.loldu_name)
        warn_if_rank_deficient(factors, self.loldu_name)
        dev, dtype = weight2d.device, weight2d.dtype
        d0 = initial_diagonal(factors.D, self.init, self.init_seed, self.loldu_name)
        self.register_buffer("L", factors.L.to(dev, dtype), persistent=False)
        self.register_buffer("U", factors.U.to(dev, dtype), persistent=False)
        self.register_buffer("pivots", factors.pivots.to(dev), persistent=False)
        self.register_buffer("pivot_values", factors.D.to(dev, torch.float32), persistent=False)
        self.register_buffer("d0", d0.to(dev), persistent=False)
        self.register_buffer("s0", torch.tensor(self.alpha / self.rank, device=dev), persistent=False)

    @torch.no_grad()
    def reset_loldu(self) -> None:
        """Back to init: d = d0, s = s0 (the layer then equals its base exactly)."""
        self.d.copy_(self.d0)
        self.s.copy_(self.s0)

    def loldu_scale(self) -> torch.Tensor:
        """e = s * d - s0 * d0 (float32, r values)."""
        return self.s * self.d - self.s0 * self.d0

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) must not round the adapter state; only its device follows.
        keep = {name: getattr(self, name).detach() for name in _FLOAT32_STATE}
        super()._apply(fn, recurse)
        for name, before in keep.items():
            current = getattr(self, name)
            if current.dtype != torch.float32:
                restored = before.to(current.device)
                if isinstance(current, nn.Parameter):
                    current.data = restored
                else:
                    self._buffers[name] = restored
        return self


class LoLDULinear(LoLDUMixin, nn.Linear):
    """``y = x W^T + b + ((x U^T) * e) L^T``: an nn.Linear (same ``weight``/``bias``, frozen) plus LoLDU.

    Trainable: ``d`` (rank values) and ``s`` (one scale), float32. The factors are non-persistent buffers
    recomputed from ``weight``, so a base checkpoint loads into this layer and then refactorizes it.
    """

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
    ):
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._setup(rank, alpha, init, init_seed, backend, name, freeze=True)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: Optional[float] = None,
        init: str = "lu",
        init_seed: int = 0,
        backend: str = "auto",
        name: Optional[str] = None,
        freeze: bool = True,
    ) -> "LoLDULinear":
        """Wrap ``linear``, sharing its weight and bias tensors (no copy).

        ``freeze=False`` leaves their requires_grad untouched until ``freeze_base()``, so a caller can build
        several layers and commit only when all succeeded.
        """
        self = cls._shell(linear)
        self._setup(rank, alpha, init, init_seed, backend, name, freeze)
        return self

    @classmethod
    def from_parametrization(cls, linear: nn.Linear, parametrization: LoLDUMixin, backend="auto", name=None,
                             freeze=True) -> "LoLDULinear":
        """Wrap ``linear`` with the factors and values of a LoLDUParametrization of its weight."""
        self = cls._shell(linear)
        p = parametrization
        self._setup(p.rank, p.alpha, p.init, p.init_seed, backend, name, freeze, source=p)
        return self

    @classmethod
    def _shell(cls, linear: nn.Linear) -> "LoLDULinear":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        return self

    def _setup(self, rank, alpha, init, init_seed, backend, name, freeze, source=None):
        name = name or f"LoLDULinear(in={self.in_features}, out={self.out_features})"
        limit = min(self.in_features, self.out_features)
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= limit:
            raise ValueError(
                f"{name}: rank must be an int in [1, min(in, out)] = [1, {limit}] for weight "
                f"{self.out_features}x{self.in_features}, got {rank!r}"
            )
        self.backend = backend
        self.base_requires_grad = (self.weight.requires_grad, self.bias is not None and self.bias.requires_grad)
        self._init_loldu(self.weight, rank, alpha, init, init_seed, name, source)
        if freeze:
            self.freeze_base()

    def freeze_base(self) -> None:
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        if hasattr(self, "d"):  # nn.Linear.__init__ calls this before the adapter exists
            self._refactorize(self.weight)
            self.reset_loldu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.loldu_enabled:
            if x.shape[-1] != self.in_features:
                raise ValueError(
                    f"{self.loldu_name}: input of shape {tuple(x.shape)} has last dim {x.shape[-1]}, "
                    f"expected {self.in_features}"
                )
            return F.linear(x, self.weight, self.bias)
        return loldu_linear(
            x, self.weight, self.bias, self.L, self.U, self.loldu_scale(), self.backend, name=self.loldu_name
        )

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + L diag(e) U in the weight's dtype."""
        return loldu_merge(self.weight, self.L, self.U, self.loldu_scale(), backend=self.backend)

    def to_linear(self, merge: bool) -> nn.Linear:
        """A plain nn.Linear: the base weight itself (merge=False) or W0 + delta (merge=True)."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        w_grad, b_grad = self.base_requires_grad
        linear.weight = nn.Parameter(self.merged_weight(), requires_grad=w_grad) if merge else self.weight
        linear.weight.requires_grad_(w_grad)
        linear.bias = self.bias
        if self.bias is not None:
            self.bias.requires_grad_(b_grad)
        return linear

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight" in state_dict:
            # A new base weight: its factors change, and a fresh adapter must again start at e == 0.
            self._refactorize(self.weight)
            if prefix + "d" not in state_dict:
                self.reset_loldu()

    def extra_repr(self) -> str:
        return (
            f"{nn.Linear.extra_repr(self)}, rank={self.rank}, alpha={self.alpha:g}, init={self.init!r}"
            + ("" if self.loldu_enabled else ", disabled")
        )
