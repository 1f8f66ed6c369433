"""Drop-in nn.Linear, nn.Conv2d and nn.Embedding layers that train only a diagonal between frozen LDU factors
of their weight (viewed as a matrix: out x in, out x (in * kh * kw), num_embeddings x dim)."""
from __future__ import annotations

import contextlib
import contextvars
import copy
import threading
import warnings
from typing import Dict, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LoLDUConfig, check_backend, check_quantization, check_settings
from .factorize import initial_diagonal, ldu_factors, warn_if_rank_deficient, weight_checksum, weight_sketch
from .functional import _loldu_linear, loldu_merge
from .planner import side_rows
from .quant import QUANTIZED_DTYPES, dequantize, quantize_weight

# Adapter tensors kept in float32 whatever the layer's dtype: the trained ones and their initial values.
_FLOAT32_STATE = ("d", "s", "d0", "s0")
_FACTOR_BUFFERS = ("L", "U", "pivots", "pivot_values", "d0", "s0")
# What accelerate's add_hook_to_module puts on a module instance.
_ACCELERATE_HOOK = ("forward", "_old_forward", "_hf_hook")
# Named (frozen) adapters, one row each: their d and s, and e = s * d - s0 * d0, which adapter_batch reads.
_NAMED_BUFFERS = ("adapter_d", "adapter_s", "adapter_table")
# The per-row adapter choice of adapter_batch, {layer: table row per batch element}. A context variable, not
# layer state: each thread (and asyncio task) sees only the batches it entered itself.
_BATCH_ROWS: contextvars.ContextVar[Dict[nn.Module, torch.Tensor]] = contextvars.ContextVar("loldu_batch_rows",
                                                                                            default={})
# Checked on every call of the no-grad shortcut (LoLDULinear._inference), so looked up once.
_is_compiling = torch.compiler.is_compiling
_distributed_up = torch.distributed.is_initialized if torch.distributed.is_available() else (lambda: False)
# How many adapter_batch contexts are open in any thread. While none is, forward skips the lookup, which
# torch.compile cannot trace.
_open_batches = [0]
_open_batches_lock = threading.Lock()


@contextlib.contextmanager
def batch_rows_scope(rows: Dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Within the block, in this thread or task only, ``layer`` uses ``rows[layer]`` per batch element."""
    with _open_batches_lock:
        _open_batches[0] += 1
    token = _BATCH_ROWS.set({**_BATCH_ROWS.get(), **rows})
    try:
        yield
    finally:
        _BATCH_ROWS.reset(token)
        with _open_batches_lock:
            _open_batches[0] -= 1


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

    def _refactorize(self, weight2d: torch.Tensor) -> None:
        """(Re)compute the frozen factors and the initial diagonal from the base weight."""
        if getattr(self, "adapter_names", ()):  # they were trained on the old factors
            warnings.warn(f"{self.loldu_name}: the base weight changed; named adapters {list(self.adapter_names)} "
                          f"were trained on the old one and are dropped", stacklevel=3)
            self._clear_named_adapters()
        dev, dtype, rank = weight2d.device, weight2d.dtype, self.rank
        if weight2d.is_meta:  # deferred init: shapes only; loading real weights (load_state_dict) factorizes
            out_f, in_f = weight2d.shape
            factors = dict(L=torch.empty(out_f, rank), U=torch.empty(rank, in_f), D=torch.empty(rank),
                           pivots=torch.empty(rank, dtype=torch.int64), d0=torch.empty(rank))
        else:
            ldu = ldu_factors(weight2d, rank, self.loldu_name)
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
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.loldu_name}: adapter names are non-empty strings, got {name!r}")
        if name == self.active_adapter:
            raise ValueError(f"{self.loldu_name}: {name!r} is the trainable adapter; its values are d and s")
        d = torch.as_tensor(d).detach().to(self.d.device, torch.float32).reshape(-1)
        s = torch.as_tensor(self.s0 if s is None else s).detach().to(self.d.device, torch.float32).reshape(-1)
        if d.numel() != self.rank or s.numel() != 1:
            raise ValueError(f"{self.loldu_name}: adapter {name!r} needs {self.rank} values of d and one of s, got "
                             f"{d.numel()} and {s.numel()}")
        if not (torch.isfinite(d).all() and torch.isfinite(s).all()):
            raise ValueError(f"{self.loldu_name}: adapter {name!r} has non-finite values")
        row = {"adapter_d": d, "adapter_s": s, "adapter_table": self.scale_of(d, s)}
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

    def loldu_scale(self) -> torch.Tensor:
        """e = s * d - s0 * d0 (float32, r values) of the trainable adapter."""
        return self.scale_of(self.d, self.s)

    def scale_of(self, d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """e of an adapter with values d, s on this layer's factors."""
        return s * d - self.s0 * self.d0

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
        if stash is not None:  # the base weight set aside by merge_weights() goes wherever the layer goes
            with torch.no_grad():
                stash[0].data = fn(stash[0])
        for name, before in keep.items():
            current = getattr(self, name)
            if current.dtype != before.dtype:
                restored = before.to(current.device)
                if isinstance(current, nn.Parameter):
                    current.data = restored
                else:
                    self._buffers[name] = restored
        return self


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
    ):
        """Wrap ``module`` (a ``base_class``), keeping all its attributes and sharing its weight and bias.

        ``freeze=False`` leaves their requires_grad untouched until ``freeze_base()``, so a caller can build
        several layers and commit only when all succeeded.
        """
        self = cls._shell(module)
        self._setup(rank, alpha, init, init_seed, backend, name, freeze)
        return self

    @classmethod
    def from_parametrization(cls, module: nn.Module, parametrization: LoLDUMixin, backend="auto", name=None,
                             freeze=True):
        """Wrap ``module`` with the factors and values of a LoLDUParametrization of its weight."""
        self = cls._shell(module)
        p = parametrization
        self._setup(p.rank, p.alpha, p.init, p.init_seed, backend, name, freeze, source=p)
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

    def _setup(self, rank, alpha, init, init_seed, backend, name, freeze, source=None):
        if "_base_state" not in self.__dict__:  # (wrapping a LoLDU layer again keeps its base's record)
            # What the base layer itself holds, so that to_base() gives back exactly that.
            self._base_state = (set(self.__dict__), set(self._parameters), set(self._buffers))
        out_f, in_f = self.weight2d().shape
        name = name or f"{type(self).__name__}({out_f}x{in_f})"
        self.backend = check_backend(backend, name)
        self._check_supported(name)
        self.base_requires_grad = (self.weight.requires_grad, self.bias is not None and self.bias.requires_grad)
        self._init_loldu(self.factor_weight(), rank, alpha, init, init_seed, name, source)
        if freeze:
            self.freeze_base()

    def _check_supported(self, name: str) -> None:
        """Raise for base-layer options LoLDU cannot honour."""

    def freeze_base(self) -> None:
        """requires_grad=False on the base weight and bias (to_base() gives their previous flags back)."""
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    base_quantization: Optional[str] = None  # "int8" / "fp8" once quantize_base() ran
    # The identity of the unquantized base, kept when quantizing it: (sha256, sketch, dtype name).
    base_identity: Optional[tuple] = None

    def base_fingerprint(self) -> tuple:
        """(sha256, weight_sketch, precision) of the base weight: of the unquantized one where the layer
        quantized it; the precision names the dtype (or quantization) whose rounding the sketch carries."""
        if self.base_identity is not None:
            return self.base_identity
        if self.loldu_merged:  # (never quantized: merge_weights refuses those)
            weight = self.__dict__["_premerge"][0]
            return (weight_checksum(weight), weight_sketch(weight.reshape(weight.shape[0], -1)),
                    str(weight.dtype).replace("torch.", ""))
        if self.weight.is_meta:
            raise ValueError(f"{self.loldu_name}: the base weight is on the meta device; load real weights first")
        precision = self.base_quantization or str(self.weight.dtype).replace("torch.", "")
        return weight_checksum(self.weight), weight_sketch(self.factor_weight()), precision

    def loldu_settings(self) -> LoLDUConfig:
        """This layer's settings as a LoLDUConfig (rank and alpha as the layer holds them)."""
        return LoLDUConfig(rank=self.rank, alpha=self.alpha, init=self.init, init_seed=self.init_seed,
                           base_quantization=self.base_quantization, backend=self.backend)

    @property
    def loldu_merged(self) -> bool:
        """Whether merge_weights() put W0 + delta into ``weight`` (until unmerge_weights())."""
        return "_premerge" in self.__dict__

    @torch.no_grad()
    def merge_weights(self) -> None:
        """Serve with ``weight`` = W0 + L diag(e) U (one plain GEMM, no rank-r path), keeping the base weight
        itself aside: unmerge_weights() puts that same tensor back, so the base is restored bit for bit and
        training can go on. A layer already merged stays as it is."""
        if self.loldu_merged:
            return
        if self.base_quantization is not None:
            raise ValueError(f"{self.loldu_name}: the base is quantized ({self.base_quantization}); a merged weight "
                             f"would be a full-precision copy next to it. Serve it unmerged (the kernels "
                             f"dequantize in the GEMM), or merge for good with merge_loldu(model)")
        merged = nn.Parameter(self.merged_weight(), requires_grad=False)
        self.__dict__["_premerge"] = (self.weight, self.loldu_enabled)
        self.weight = merged
        self.loldu_enabled = False  # forward's plain path, now on the merged weight

    def unmerge_weights(self) -> None:
        """Undo merge_weights(): the base weight (the same tensor) and the enabled state come back."""
        if not self.loldu_merged:
            return
        weight, enabled = self.__dict__.pop("_premerge")
        self.weight = weight
        self.loldu_enabled = enabled

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
        merged = loldu_merge(self.weight2d(), self.L, self.U, self.loldu_scale(), backend=self.backend,
                             weight_scale=getattr(self, "weight_scale", None))
        return merged.view(self.weight.shape)

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
            merged = self.weight if self.loldu_merged else self.merged_weight()
            base.weight = nn.Parameter(merged.detach(), requires_grad=w_grad)
        elif self.loldu_merged:
            base.weight = self.__dict__["_premerge"][0]
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

    def _check_width(self, x: torch.Tensor, dim: int, expected: int, what: str) -> None:
        if x.dim() < -dim or x.shape[dim] != expected:
            size = x.shape[dim] if x.dim() >= -dim else None
            raise ValueError(f"{self.loldu_name}: input of shape {tuple(x.shape)} has {what} {size}, "
                             f"expected {expected}")

    def _loldu_repr(self) -> str:
        state = ", merged" if self.loldu_merged else "" if self.loldu_enabled else ", disabled"
        return f", rank={self.rank}, alpha={self.alpha:g}, init={self.init!r}" + state


class LoLDULinear(LoLDULayer, nn.Linear):
    """``y = x W^T + b + ((x U^T) * e) L^T``: an nn.Linear (same ``weight``/``bias``, frozen) plus LoLDU.

    Trainable: ``d`` (rank values) and ``s`` (one scale), float32. The factors are non-persistent buffers
    recomputed from ``weight``, so a base checkpoint loads into this layer and then refactorizes it.
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
    ):
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._setup(rank, alpha, init, init_seed, backend, name, freeze=True)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: Optional[float] = None, init: str = "lu",
                    init_seed: int = 0, backend: str = "auto", name: Optional[str] = None,
                    freeze: bool = True) -> "LoLDULinear":
        """Wrap ``linear`` (see ``from_base``)."""
        return cls.from_base(linear, rank, alpha, init, init_seed, backend, name, freeze)

    def reset_parameters(self) -> None:
        if self.base_quantization is not None:
            raise ValueError(f"{self.loldu_name}: reset_parameters would redraw a quantized ({self.base_quantization}) "
                             f"base; build a new layer instead")
        nn.Linear.reset_parameters(self)
        if hasattr(self, "d"):  # nn.Linear.__init__ calls this before the adapter exists
            self._refactorize(self.weight)
            self.reset_loldu()

    def batch_table_row(self, name: Optional[str]) -> int:
        """The row of the per-batch table for an adapter name: 0 is "no adapter" (None, or an adapter this layer
        lacks), 1 the trainable adapter, then the named ones."""
        if name == self.active_adapter:
            return 1
        return 2 + self.adapter_names.index(name) if name in self.adapter_names else 0

    def quantize_base(self, kind: str) -> None:
        """Keep W0 as weight-only quantized values ("int8", or "fp8" e4m3) with a float32 scale per output row.

        The factors stay those of the unquantized weight, so an adapter moves between the full and the
        quantized base. The unquantized weight is released once nothing else holds it."""
        if self.base_quantization is not None:
            raise ValueError(f"{self.loldu_name}: the base is already quantized ({self.base_quantization})")
        check_quantization(kind, self.loldu_name)
        if kind is None:
            raise ValueError(f"{self.loldu_name}: quantize_base needs a kind, 'int8' or 'fp8'")
        if kind == "fp8" and self.weight.is_cuda and torch.cuda.get_device_capability(self.weight.device) < (8, 9):
            raise ValueError(f"{self.loldu_name}: fp8 (e4m3) needs a GPU of compute capability 8.9 or newer")
        values, scale = quantize_weight(self.weight, kind, self.loldu_name)
        self.base_identity = self.base_fingerprint()
        self.weight = nn.Parameter(values, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.base_quantization = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.loldu_enabled:
            self._check_width(x, -1, self.in_features, "last dim")
            return F.linear(x, self.dense_weight(), self.bias)
        batch_rows = _BATCH_ROWS.get().get(self) if _open_batches[0] else None
        if batch_rows is None and not torch.is_grad_enabled():
            y = self._inference(x)
            if y is not None:
                return y
        elif self.__dict__.get("_scaled_u_entry") is not None:
            self.__dict__["_scaled_u_entry"] = None  # training: no U-sized cache held meanwhile
        e = self.loldu_scale()
        rows = None
        if batch_rows is not None:
            if x.dim() < 2 or x.shape[0] != batch_rows.shape[0]:
                raise ValueError(f"{self.loldu_name}: adapter_batch has {batch_rows.shape[0]} names but the "
                                 f"input of shape {tuple(x.shape)} has {x.shape[0] if x.dim() else 0} rows")
            named = getattr(self, "adapter_table", None)
            named = named if named is not None else e.new_empty(0, self.rank)
            e = torch.cat([torch.zeros_like(e)[None], e[None], named])
            rows = batch_rows.repeat_interleave(x[0].numel() // self.in_features)
        return _loldu_linear(x, self.weight, self.bias, self.L, self.U, e, self.backend, rows,
                             getattr(self, "weight_scale", None), self.loldu_name)

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
                or not (self.backend == "torch" or (self.backend == "auto" and U.device.type != "cuda"))):
            self.__dict__["_scaled_u_entry"] = None
            return None
        key = (d._version, s._version, d.data_ptr(), s.data_ptr())
        with torch.no_grad():
            scaled_u = (self.scale_of(d, s)[:, None] * U).to(U.dtype)
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


class LoLDUConv2d(LoLDULayer, nn.Conv2d):
    """An nn.Conv2d whose weight, viewed as out x (in/groups * kh * kw), gets LoLDU.

    The forward convolves with W0 + L diag(e) U built in float32 for each call: for convolutions the rows of
    the GEMM (batch x output positions) far outnumber the weight's, which is where merging is the cheaper
    route (see loldu_triton.planner). The delta is kernel-sized, never activation-sized.
    """

    base_class = nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_width(x, -3, self.in_channels, "channel dim")
        if not self.loldu_enabled:
            return self._conv_forward(x, self.weight, self.bias)
        weight = loldu_merge(self.weight2d(), self.L, self.U, self.loldu_scale(), backend="torch")
        return self._conv_forward(x, weight.view_as(self.weight), self.bias)

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + self._loldu_repr()


class LoLDUEmbedding(LoLDULayer, nn.Embedding):
    """An nn.Embedding with LoLDU on its table: ``y = W0[i] + (L[i] * e) U``, no table-sized delta."""

    base_class = nn.Embedding
    bias = None  # an embedding has none; the shared LoLDULayer code asks

    def _adjust_factors(self) -> None:
        # As in nn.Embedding, the padding row never changes: its row of L diag(e) U is zero.
        if self.padding_idx is not None and not self.L.is_meta:
            L = self.L.clone()  # (the factors may be shared with the parametrization they came from)
            L[self.padding_idx] = 0
            self.register_buffer("L", L, persistent=False)

    def _check_supported(self, name: str) -> None:
        if self.max_norm is not None:
            raise ValueError(f"{name}: nn.Embedding with max_norm renormalizes its weight in place, which LoLDU "
                             f"never modifies; use max_norm=None")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        base = F.embedding(idx, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)
        if not self.loldu_enabled:
            return base
        rows = F.embedding(idx, self.L)
        return base + (rows * self.loldu_scale()).to(base.dtype) @ self.U

    def extra_repr(self) -> str:
        return nn.Embedding.extra_repr(self) + self._loldu_repr()


# The base layer type each LoLDU layer stands in for.
LOLDU_LAYERS: Dict[type, type] = {cls.base_class: cls for cls in (LoLDULinear, LoLDUConv2d, LoLDUEmbedding)}
