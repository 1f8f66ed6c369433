"""The public API of the LoLDU reference code (minloldu), backed by the fused LoLDU layers, plus PEFT-style
targeting."""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .config import check_backend, check_quantization, check_settings
from .layer import LOLDU_LAYERS, LoLDULayer, LoLDULinear, LoLDUMixin, batch_rows_scope


class LoLDUParametrization(LoLDUMixin, nn.Module):
    """A weight parametrization ``W -> W + L diag(e) U`` (usable with torch.nn.utils.parametrize), for a
    weight viewed as a matrix (out x everything else).

    ``add_loldu`` turns one made for an nn.Linear, nn.Conv2d or nn.Embedding into the matching LoLDU layer.
    """

    def __init__(self, weight: torch.Tensor, rank: int, alpha=None, init="lu", init_seed=0, name="weight"):
        nn.Module.__init__(self)
        self._init_loldu(weight.reshape(weight.shape[0], -1), rank, alpha, init, init_seed, name)

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int, alpha=None, init="lu", init_seed=0):
        return cls(layer.weight, rank, alpha, init, init_seed, name=f"{type(layer).__name__} weight")

    @classmethod
    def from_conv2d(cls, layer: nn.Conv2d, rank: int, alpha=None, init="lu", init_seed=0):
        """On the weight viewed as out_channels x (in_channels / groups * kh * kw)."""
        return cls(layer.weight, rank, alpha, init, init_seed, name=f"{type(layer).__name__} weight")

    @classmethod
    def from_embedding(cls, layer: nn.Embedding, rank: int, alpha=None, init="lu", init_seed=0):
        """On the num_embeddings x embedding_dim table."""
        return cls(layer.weight, rank, alpha, init, init_seed, name=f"{type(layer).__name__} weight")

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.loldu_enabled:
            return weight
        delta = (self.L.float() * self.loldu_scale()) @ self.U.float()
        return weight + delta.view_as(weight).to(weight.dtype)


def loldu_layers(model: nn.Module) -> List[Tuple[str, LoLDULayer]]:
    """(name, layer) of every LoLDU layer (LoLDULinear, LoLDUConv2d, LoLDUEmbedding) in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoLDULayer)]


def base_type(module: nn.Module) -> Optional[type]:
    """The supported base layer type ``module`` is (nn.Linear, nn.Conv2d, nn.Embedding), or None."""
    if isinstance(module, LoLDULayer):
        return module.base_class
    return next((base for base in LOLDU_LAYERS if isinstance(module, base)), None)


def _why_not_adaptable(name: str, module: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    """None when a LoLDU layer can stand in for this module, else the reason it cannot."""
    base = base_type(module)
    if base is None:
        return f"{type(module).__name__} is not an nn.Linear, nn.Conv2d or nn.Embedding"
    if isinstance(module, LoLDULayer):
        return None
    if parametrize.is_parametrized(module):
        return ("its weight is computed by a parametrization (weight_norm, spectral_norm, ...), which LoLDU "
                "would bypass; remove it first (torch.nn.utils.parametrize.remove_parametrizations)")
    if not isinstance(module._parameters.get("weight"), nn.Parameter):
        return ("its weight is not a plain parameter (the legacy torch.nn.utils.weight_norm recomputes it in a "
                "hook); remove that first (torch.nn.utils.remove_weight_norm)")
    if "forward" in vars(module):
        return ("its forward is replaced on the instance (an accelerate hook, say), which LoLDU would bypass; "
                "add LoLDU before dispatching the model to devices")
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its out_proj weight directly, bypassing the layer's forward"
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides nn.{base.__name__}.forward, which LoLDU would bypass"
    return None


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered in ``model``: a module shared under several names stays shared."""
    for parent in list(model.modules()):
        for key, child in parent._modules.items():
            if child is old:
                parent._modules[key] = new


def _select_targets(model, target_modules,
                    by_type=lambda m: isinstance(m, nn.Linear)) -> Tuple[List[str], List[str]]:
    """Names of the layers to adapt, and of targeted layers that already have LoLDU.

    None and "all-linear" take the layers ``by_type`` accepts (nn.Linear), leaving out with a warning those
    LoLDU cannot stand in for; names and regexes may also pick nn.Conv2d and nn.Embedding layers, as in PEFT,
    and naming a layer LoLDU cannot stand in for is an error."""
    # Every name, aliases included (a module registered twice answers to both); duplicates dropped at the end.
    modules = dict(model.named_modules(remove_duplicate=False))
    parents = {f"{p}.{c}" if p else c: m for p, m in modules.items() for c, _ in m.named_children()}

    def reason(name):
        return _why_not_adaptable(name, modules[name], parents.get(name))

    if target_modules is None or target_modules == "all-linear":
        typed = [n for n, m in modules.items() if n and by_type(m)]
        chosen = [n for n in typed if reason(n) is None]
        skipped = [n for n in typed if n not in chosen]
        if skipped:
            warnings.warn(f"add_loldu: left out {skipped}: " + "; ".join(reason(n) for n in skipped), stacklevel=3)
        if target_modules == "all-linear":  # as PEFT: not the output layer (Hugging Face's, else "lm_head")
            get_head = getattr(model, "get_output_embeddings", None)
            head = get_head() if callable(get_head) else None
            chosen = [n for n in chosen if modules[n] is not head and n.rpartition(".")[2] != "lm_head"]
    else:
        layers = [n for n, m in modules.items() if n and base_type(m) is not None]
        if isinstance(target_modules, str):
            chosen = [n for n in layers if re.fullmatch(target_modules, n)]
            if not chosen:
                raise ValueError(f"add_loldu: target_modules regex {target_modules!r} matches no nn.Linear, "
                                 f"nn.Conv2d or nn.Embedding layer")
        else:
            chosen = []
            for target in target_modules:
                hits = [n for n in layers if n == target or n.endswith("." + target)]
                if not hits:
                    raise ValueError(f"add_loldu: target_modules entry {target!r} matches no nn.Linear, "
                                     f"nn.Conv2d or nn.Embedding layer")
                chosen += [n for n in hits if n not in chosen]
        for n in chosen:
            if reason(n):
                raise ValueError(f"add_loldu: cannot adapt {n!r}: {reason(n)}")
    if not chosen:
        raise ValueError("add_loldu: the model has no layer to adapt")
    seen = set()
    chosen = [n for n in chosen if id(modules[n]) not in seen and not seen.add(id(modules[n]))]
    existing = [n for n in chosen if isinstance(modules[n], LoLDULayer)]
    return [n for n in chosen if n not in existing], existing


def _config_factory(config: Dict[type, Dict[str, Callable]], module: nn.Module) -> Optional[Callable]:
    """The factory of the most specific configured type that ``module`` is an instance of."""
    for cls in type(module).__mro__:
        if cls in config:
            entry = config[cls]
            if set(entry) != {"weight"}:
                raise ValueError(f"add_loldu: loldu_config entries must be {{'weight': factory}}, got {entry}")
            return entry["weight"]
    return None


def add_loldu(
    model: nn.Module,
    loldu_config: Optional[Dict[type, Dict[str, Callable]]] = None,
    *,
    rank: Union[None, int, str] = None,
    alpha: Optional[float] = None,
    init: str = "lu",
    init_seed: int = 0,
    target_modules: Union[None, str, Sequence[str]] = None,
    backend: str = "auto",
    base_quantization: Optional[str] = None,
) -> nn.Module:
    """Replace the targeted layers of ``model`` with LoLDU layers, in place (and return the model).

    Either the reference code's ``loldu_config`` ({nn.Linear: {"weight": partial(LoLDUParametrization
    .from_linear, rank=r)}}, likewise nn.Conv2d with from_conv2d and nn.Embedding with from_embedding) or
    ``rank=`` with ``target_modules``: None (every nn.Linear), "all-linear" (all but the output layer: a
    Hugging Face model's get_output_embeddings(), or a layer named ``lm_head``), a list of names (suffix
    match) or a regex (full match); names and regexes may also pick nn.Conv2d and nn.Embedding layers.
    A rank larger than a layer can hold is clamped to its full rank with a warning; ``rank="full"`` asks for
    every layer's full rank, min(in, out) (the paper's ViT setting), without one. Layers that already have
    LoLDU are left as they are. Nothing is changed if any layer fails.

    base_quantization="int8" (or "fp8", e4m3) stores each adapted nn.Linear's frozen weight as weight-only
    quantized values with a scale per output row (see LoLDULinear.quantize_base); the factors come from the
    unquantized weight.
    """
    if (loldu_config is None) == (rank is None):
        raise ValueError("add_loldu: pass either loldu_config or rank=, not both and not neither")
    if rank is not None:
        rank, alpha, init, init_seed = check_settings("add_loldu", rank, alpha, init, init_seed, allow_full=True)
    check_backend(backend, "add_loldu")
    check_quantization(base_quantization, "add_loldu")
    if base_type(model) is not None:
        raise ValueError(f"add_loldu: the model itself is a {type(model).__name__}; use "
                         f"LoLDULinear.from_base(layer, rank) (or LoLDUConv2d / LoLDUEmbedding)")
    if loldu_config is not None:
        for cls in loldu_config:
            if not (isinstance(cls, type) and any(issubclass(cls, base) for base in LOLDU_LAYERS)):
                raise ValueError(f"add_loldu: supported layers are nn.Linear, nn.Conv2d and nn.Embedding; "
                                 f"loldu_config names {cls}")
        targets, existing = _select_targets(model, None, lambda m: _config_factory(loldu_config, m) is not None)
    else:
        targets, existing = _select_targets(model, target_modules)
    if existing:
        warnings.warn(f"add_loldu: {existing} already have LoLDU; left as they are (adapters never stack)",
                      stacklevel=2)

    built: Dict[str, Tuple[nn.Module, LoLDULayer]] = {}
    for name in targets:
        module = model.get_submodule(name)
        cls = LOLDU_LAYERS[base_type(module)]
        if loldu_config is not None:
            try:
                spec = _config_factory(loldu_config, module)(module)
            except ValueError as err:
                raise ValueError(f"add_loldu: layer {name!r}: {err}") from err
            if not isinstance(spec, LoLDUParametrization):
                raise TypeError(f"add_loldu: the factory for {name!r} must return a LoLDUParametrization")
            layer = cls.from_parametrization(module, spec, backend, name, freeze=False)
        else:
            out_f = module.weight.shape[0]
            in_f = module.weight[0].numel()
            full = min(out_f, in_f)
            if rank != "full" and rank > full:
                warnings.warn(f"add_loldu: {name!r} ({out_f}x{in_f}) holds at most rank {full}; using {full} "
                              f"instead of {rank}", stacklevel=2)
            rank_here = full if rank == "full" else min(rank, full)
            layer = cls.from_base(module, rank_here, alpha, init, init_seed, backend, name, freeze=False)
        if base_quantization is not None:
            if not isinstance(layer, LoLDULinear):
                raise ValueError(f"add_loldu: base_quantization covers nn.Linear layers; {name!r} is a "
                                 f"{layer.base_class.__name__}")
            layer.quantize_base(base_quantization)
        built[name] = (module, layer)
    for module, layer in built.values():
        layer.freeze_base()
        _replace(model, module, layer)
    return model


def get_loldu_params(model: nn.Module, print_shapes: bool = False) -> List[nn.Parameter]:
    """The trainable LoLDU parameters (d and s of every LoLDU layer)."""
    params = []
    for name, layer in loldu_layers(model):
        for pname in ("d", "s"):
            p = getattr(layer, pname)
            if print_shapes:
                print(f"{name}.{pname}: {tuple(p.shape)}")
            params.append(p)
    return params


def get_loldu_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{name: tensor} of the LoLDU parameters only, with the keys of ``model.state_dict()``."""
    return {
        f"{name}.{p}" if name else p: getattr(layer, p).detach()
        for name, layer in loldu_layers(model)
        for p in ("d", "s")
    }


def _set_enabled(model: nn.Module, enabled: bool) -> None:
    for _, layer in loldu_layers(model):
        layer.loldu_enabled = enabled


def disable_loldu(model: nn.Module) -> None:
    """The model computes exactly its base outputs until ``enable_loldu``."""
    _set_enabled(model, False)


def enable_loldu(model: nn.Module) -> None:
    _set_enabled(model, True)


def _unwrap(model: nn.Module, merge: bool) -> None:
    layers = loldu_layers(model)
    if any(not name for name, _ in layers):
        raise ValueError(f"the model itself is a {type(model).__name__}; use its to_base(merge=...) method")
    for _, layer in layers:
        _replace(model, layer, layer.to_base(merge))


def remove_loldu(model: nn.Module) -> None:
    """Plain base layers holding the untouched base weights (the trained adapter is discarded)."""
    _unwrap(model, merge=False)


def merge_loldu(model: nn.Module) -> None:
    """Plain base layers holding W0 + L diag(e) U (no LoLDU parameters left)."""
    _unwrap(model, merge=True)


def print_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """Prints and returns (trainable, total) parameter counts, like PEFT's."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


@contextmanager
def adapter_batch(model: nn.Module, names: Sequence[Optional[str]]) -> Iterator[nn.Module]:
    """Run one batch in which element i (the input's first dimension) uses adapter ``names[i]``.

    A name is "default" (the trainable adapter), one loaded with ``load_loldu(..., adapter_name=...)``, or None
    (the base model). Every adapter of a layer shares its L and U, so x U^T is computed once and only the
    diagonal is gathered per row. A layer an adapter does not cover runs as its base for that adapter's rows.
    Leaving the context restores the model as it was.
    """
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise ValueError(f"adapter_batch: names must be a sequence with one adapter name (or None) per batch "
                         f"element, got {type(names).__name__} {names!r}")
    names = list(names)  # (a generator is read once, here)
    layers = loldu_layers(model)
    if not layers:
        raise ValueError("adapter_batch: the model has no LoLDU layer")
    for name, layer in layers:
        if not isinstance(layer, LoLDULinear):
            raise ValueError(f"adapter_batch: layer {name!r} is a {type(layer).__name__}; mixed-adapter batches "
                             f"support LoLDULinear layers only")
    known = {None, "default"}.union(*(layer.adapter_names for _, layer in layers))
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise ValueError(f"adapter_batch: each name must be a string or None, got {bad[0]!r}")
    unknown = sorted({n for n in names if n not in known})
    if unknown:
        raise ValueError(f"adapter_batch: unknown adapters {unknown}; the model has "
                         f"{sorted(k for k in known if k is not None)}")
    rows = {layer: torch.tensor([layer.batch_table_row(n) for n in names], dtype=torch.int64,
                                device=layer.weight.device) for _, layer in layers}
    with batch_rows_scope(rows):
        yield model
