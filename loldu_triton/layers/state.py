"""The adapter state of one 2-D weight, shared by the LoLDU layers and the parametrization: frozen factors L
and U, the trained diagonal d and scale s, their initial values d0 and s0, and the named (frozen) adapters
that share the factors."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..core.formulas import delta_diagonal
from ..core.settings import check_adapter_name, check_settings, warn_caller
from ..factors.factorize import initial_diagonal, ldu_factors, warn_if_rank_deficient

# Adapter tensors kept in float32 whatever the layer's dtype: the trained ones and their initial values.
_FLOAT32_STATE = ("d", "s", "d0", "s0")
_FACTOR_BUFFERS = ("L", "U", "pivots", "pivot_values", "d0", "s0")
# Named (frozen) adapters, one row each: their d and s, and e (delta_diagonal), which adapter_batch reads.
_NAMED_BUFFERS = ("adapter_d", "adapter_s", "adapter_table")


class LoLDUMixin:
    """The adapter state of one 2-D weight: frozen factors L, U, the trained diagonal d and scale s.

    e = s * d - s0 * d0 is the change of the diagonal since init, so the layer equals its base exactly at init.
    """

    def _init_loldu(self, weight2d, rank, alpha, init, init_seed, name, source=None):
        rank, alpha, init, init_seed = check_settings(name, rank, alpha, init, init_seed, tuple(weight2d.shape))
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.init = init
        self.init_seed = init_seed
        self.loldu_name = name
        self.loldu_enabled = True
        self.d = nn.Parameter(torch.empty(self.rank, dtype=torch.float32, device=weight2d.device))
        # shape (1,), not a scalar: FSDP2's fully_shard refuses 0-dim parameters
        self.s = nn.Parameter(torch.empty(1, dtype=torch.float32, device=weight2d.device))
        if source is None:
            self._refactorize(weight2d)
            self.reset_loldu()
        else:  # take over the factors and values of another adapter of the same weight
            for buf in _FACTOR_BUFFERS:
                self.register_buffer(buf, getattr(source, buf), persistent=False)
            self._adjust_factors()
            with torch.no_grad():
                self.d.copy_(source.d)
                self.s.copy_(source.s)

    def _refactorize(self, weight2d: torch.Tensor, pivots=None) -> None:
        """(Re)compute the frozen factors and the initial diagonal from the base weight (in the elimination
        order ``pivots`` where given, see ldu_factors)."""
        if getattr(self, "adapter_names", ()):  # they were trained on the old factors
            warn_caller(f"{self.loldu_name}: the base weight changed; named adapters {list(self.adapter_names)} "
                        f"were trained on the old one and are dropped")
            self._clear_named_adapters()
        dev, dtype, rank = weight2d.device, weight2d.dtype, self.rank
        if weight2d.is_meta:  # deferred init: shapes only; loading real weights (load_state_dict) factorizes
            out_f, in_f = weight2d.shape
            factors = dict(L=torch.empty(out_f, rank), U=torch.empty(rank, in_f), D=torch.empty(rank),
                           pivots=torch.empty(rank, dtype=torch.int64), d0=torch.empty(rank))
        else:
            # L and U come in the layer's dtype, rounded once from float64 as before
            ldu = ldu_factors(weight2d, rank, self.loldu_name, pivots,
                              dtype if dtype.is_floating_point else torch.float64)
            warn_if_rank_deficient(ldu, self.loldu_name)
            factors = dict(L=ldu.L, U=ldu.U, D=ldu.D, pivots=ldu.pivots,
                           d0=initial_diagonal(ldu.D, self.init, self.init_seed, self.loldu_name))
        self.register_buffer("L", factors["L"].to(dev, dtype), persistent=False)
        self.register_buffer("U", factors["U"].to(dev, dtype), persistent=False)
        self.register_buffer("pivots", factors["pivots"].to(dev), persistent=False)
        self.register_buffer("pivot_values", factors["D"].to(dev, torch.float32), persistent=False)
        self.register_buffer("d0", factors["d0"].to(dev, torch.float32), persistent=False)
        self.register_buffer("s0", torch.full((1,), self.alpha / self.rank, device=dev), persistent=False)
        self.__dict__.pop("_scaled_u_entry", None)  # computed from the old factors
        self._adjust_factors()

    def _adjust_factors(self) -> None:
        """Layer-specific changes to freshly set factors (none by default)."""

    @torch.no_grad()
    def reset_loldu(self) -> None:
        """Back to init: d = d0, s = s0 (the layer then equals its base exactly)."""
        self.d.copy_(self.d0)
        self.s.copy_(self.s0)

    # Named adapters: frozen (d, s) pairs kept next to the trainable one (``active_adapter``), sharing its
    # factors. Stored as d and s, not e: moving one into d and s (activate_adapter) or to a file is then exact.
    adapter_names: tuple = ()
    active_adapter: str = "default"

    def set_named_adapter(self, name: str, d: torch.Tensor, s: Optional[torch.Tensor] = None) -> None:
        """Store (or replace) the frozen adapter ``name``: its diagonal ``d`` (rank values) and scale ``s`` (one
        value; default s0). Its e = s * d - s0 * d0 is what adapter_batch reads."""
        check_adapter_name(name, self.loldu_name)
        if name == self.active_adapter:
            raise ValueError(f"{self.loldu_name}: {name!r} is the trainable adapter; its values are d and s")
        d = torch.as_tensor(d).detach().to(self.d.device, torch.float32).reshape(-1)
        s = torch.as_tensor(self.s0 if s is None else s).detach().to(self.d.device, torch.float32).reshape(-1)
        if d.numel() != self.rank or s.numel() != 1:
            raise ValueError(f"{self.loldu_name}: adapter {name!r} needs {self.rank} values of d and one of s, got "
                             f"{d.numel()} and {s.numel()}")
        if not (torch.isfinite(d).all() and torch.isfinite(s).all()):
            raise ValueError(f"{self.loldu_name}: adapter {name!r} has non-finite values")
        row = {"adapter_d": d, "adapter_s": s, "adapter_table": self.delta_diagonal_of(d, s)}
        names = list(self.adapter_names)
        for key, value in row.items():
            table = getattr(self, key, None) if names else None
            if name in names:
                table = table.clone()
                table[names.index(name)] = value
            else:
                table = value[None] if table is None else torch.cat([table, value[None]])
            self.register_buffer(key, table, persistent=False)
        if name not in names:
            self.adapter_names = tuple(names + [name])

    def adapter_values(self, name: str):
        """(d, s) of adapter ``name`` of this layer: the trainable one's parameters, or a named one's copies."""
        if name == self.active_adapter:
            return self.d, self.s
        if name not in self.adapter_names:
            raise KeyError(name)
        i = self.adapter_names.index(name)
        return self.adapter_d[i].clone(), self.adapter_s[i].clone()

    def delete_named_adapter(self, name: str) -> None:
        """Drop the frozen adapter ``name`` of this layer."""
        names = list(self.adapter_names)
        i = names.index(name)
        keep = [j for j in range(len(names)) if j != i]
        if not keep:
            self._clear_named_adapters()
            return
        for key in _NAMED_BUFFERS:
            self.register_buffer(key, getattr(self, key)[keep], persistent=False)
        self.adapter_names = tuple(names[:i] + names[i + 1:])

    def _clear_named_adapters(self) -> None:
        self.adapter_names = ()
        for key in _NAMED_BUFFERS:
            self._buffers.pop(key, None)

    @torch.no_grad()
    def activate_adapter(self, name: str) -> None:
        """Make adapter ``name`` the trainable one: its values move into d and s (in place: the parameters stay
        the same objects), and the values d and s held are stored under the previous active name. A name this
        layer does not have starts at init (e == 0: the base)."""
        if name == self.active_adapter:
            return
        if name in self.adapter_names:
            d, s = self.adapter_values(name)
            self.delete_named_adapter(name)
        else:
            d, s = self.d0.clone(), self.s0.clone()
        previous, before = self.active_adapter, (self.d.detach().clone(), self.s.detach().clone())
        self.active_adapter = name
        self.set_named_adapter(previous, *before)
        self.d.copy_(d)
        self.s.copy_(s)
        self.d.grad = self.s.grad = None  # gradients of the adapter that was trainable

    def delta_diagonal(self) -> torch.Tensor:
        """e = s * d - s0 * d0 (float32, r values) of the trainable adapter: the diagonal of its delta
        L diag(e) U."""
        return self.delta_diagonal_of(self.d, self.s)

    def delta_diagonal_of(self, d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """e of an adapter with values d, s on this layer's factors."""
        return delta_diagonal(d, s, self.d0, self.s0)

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) must not round the adapter state, nor touch a quantized base; only the device
        # of those follows.
        kept = _FLOAT32_STATE + _NAMED_BUFFERS + ("weight_scale",)
        if getattr(self, "base_quantization", None):
            kept += ("weight",)
        keep = {name: getattr(self, name).detach() for name in kept if getattr(self, name, None) is not None}
        super()._apply(fn, recurse)
        # d and s may have moved through .data, which leaves version counters as they were
        self.__dict__.pop("_scaled_u_entry", None)
        stash = self.__dict__.get("_premerge")
        if stash is not None:  # the weight set aside by merge_weights() goes wherever the layer goes
            with torch.no_grad():
                stash.data = fn(stash)
        for name, before in keep.items():
            current = getattr(self, name)
            if current.dtype != before.dtype:
                restored = before.to(current.device)
                if isinstance(current, nn.Parameter):
                    current.data = restored
                else:
                    self._buffers[name] = restored
        return self
