"""Adding LoLDU to a model (add_loldu) and reading its trainable part."""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..core.config import LoLDUConfig
from ..core.settings import RankClampWarning, check_progress, clamp_rank, warn_caller
from ..factors.quantized_bases import logical_shape, quantized_kind
from ..layers.base import LoLDULayer
from ..layers.linear import LoLDULinear
from ..layers.parametrization import LoLDUParametrization
from ..layers.registry import LOLDU_LAYERS, base_type, layer_class
from .heads import install_saved, saved_modules, saved_names, wrap_saved
from .targeting import layer_progress, loldu_layers, loldu_root, replace_module, select_targets


def _config_factory(config: Dict[type, Dict[str, Callable]], module: nn.Module) -> Optional[Callable]:
    """The factory of the most specific configured type that ``module`` is an instance of."""
    for cls in type(module).__mro__:
        if cls in config:
            entry = config[cls]
            if set(entry) != {"weight"}:
                raise ValueError(f"add_loldu: loldu_config entries must be {{'weight': factory}}, got {entry}")
            return entry["weight"]
    return None


def _call_factory(factory: Callable, module: nn.Module, name: str):
    """A loldu_config factory's result for ``module``; its rank-clamp warning is told again with the layer's
    name, as the rank= route words it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RankClampWarning)
        try:
            spec = factory(module)
        except ValueError as err:
            raise ValueError(f"add_loldu: layer {name!r}: {err}") from err
    for w in caught:
        if issubclass(w.category, RankClampWarning):
            warn_caller(RankClampWarning(f"add_loldu: {name!r} {w.message.detail}"))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return spec


def add_loldu(
    model: nn.Module,
    loldu_config: Union[None, LoLDUConfig, Dict[type, Dict[str, Callable]]] = None,
    *,
    rank: Union[None, int, str] = None,
    alpha: Optional[float] = None,
    init: str = "lu",
    init_seed: int = 0,
    target_modules: Union[None, str, Sequence[str]] = None,
    backend: str = "auto",
    base_quantization: Optional[str] = None,
    dropout: float = 0.0,
    exclude_modules: Union[None, str, Sequence[str]] = None,
    modules_to_save: Optional[Sequence[str]] = None,
    progress: Optional[bool] = None,
) -> nn.Module:
    """Replace the targeted layers of ``model`` with LoLDU layers, in place (and return the model).

    The settings come as a LoLDUConfig (``add_loldu(model, config)``), as keywords (``rank=`` and the
    others, the fields of LoLDUConfig), or as the reference code's ``loldu_config`` ({nn.Linear: {"weight":
    partial(LoLDUParametrization.from_linear, rank=r)}}, likewise nn.Conv2d with from_conv2d and nn.Embedding
    with from_embedding; it takes every layer of those types).

    ``target_modules``: None (every nn.Linear), "all-linear" (all but the output layer: a Hugging Face
    model's get_output_embeddings(), or a layer named ``lm_head``), a list of names (suffix match) or a regex
    (full match); names and regexes may also pick nn.Conv2d and nn.Embedding layers; ``exclude_modules``
    (names or a regex) takes layers out again. ``modules_to_save`` names modules (a classifier head) that
    train in full, one copy per adapter, saved with it (layers.saved.SavedModule). On every route a rank
    larger than a layer can hold is lowered to its full rank with a warning; ``rank="full"`` asks for every
    layer's full rank, min(in, out) (the paper's ViT setting), without one. Layers that already have LoLDU
    are left as they are. Nothing is changed if any layer fails.

    base_quantization="int8" (or "fp8", e4m3) stores each adapted nn.Linear's frozen weight as weight-only
    quantized values with a scale per output row (see LoLDULinear.quantize_base); the factors come from the
    unquantized weight. ``dropout`` (PEFT's lora_dropout): in training mode each layer's rank-r path reads
    dropout(x); nn.Embedding layers refuse dropout > 0 (their input is indices). Unlike get_loldu_model,
    add_loldu leaves requires_grad of the other parameters alone.

    Layers that bitsandbytes (Linear4bit: nf4, fp4; Linear8bitLt) or torchao (int8/int4 weight-only) quantized
    get LoLDUQuantizedLinear: their own forward computes the base, the factors come from the dequantized weight.

    ``progress``: a progress bar on stderr naming each layer (None: when stderr is a terminal and the work takes
    over 2 s, unless the environment sets LOLDU_PROGRESS=0; True: always; False: never).
    """
    check_progress(progress, "add_loldu")
    reference = None
    if isinstance(loldu_config, LoLDUConfig):
        keywords = dict(rank=rank, alpha=alpha, init=init, init_seed=init_seed, target_modules=target_modules,
                        backend=backend, base_quantization=base_quantization, dropout=dropout,
                        exclude_modules=exclude_modules, modules_to_save=modules_to_save)
        defaults = {k: p.default for k, p in inspect.signature(add_loldu).parameters.items() if k in keywords}
        given = [k for k, v in keywords.items() if not (v is defaults[k] or v == defaults[k])]
        if given:
            raise ValueError(f"add_loldu: pass the settings in the LoLDUConfig or as keywords, not both "
                             f"(got {sorted(given)} next to a LoLDUConfig)")
        config = loldu_config
    elif loldu_config is not None and rank is not None or loldu_config is None and rank is None:
        raise ValueError("add_loldu: pass either loldu_config or rank= (or a LoLDUConfig), not both and not "
                         "neither")
    elif loldu_config is not None:
        if not isinstance(loldu_config, dict):
            raise ValueError(f"add_loldu: loldu_config must be a LoLDUConfig or the reference code's dict "
                             f"{{nn.Linear: {{'weight': factory}}}}, got {type(loldu_config).__name__}")
        for cls in loldu_config:
            if not (isinstance(cls, type) and any(issubclass(cls, base) for base in LOLDU_LAYERS)):
                raise ValueError(f"add_loldu: supported layers are nn.Linear, nn.Conv2d and nn.Embedding; "
                                 f"loldu_config names {cls}")
        reference = loldu_config
        # (rank and the other settings come from the factories; these two apply on this route too)
        config = LoLDUConfig.from_dict(dict(backend=backend, base_quantization=base_quantization, dropout=dropout),
                                       "add_loldu")
    else:
        config = LoLDUConfig.from_dict(dict(rank=rank, alpha=alpha, init=init, init_seed=init_seed,
                                            target_modules=target_modules, backend=backend,
                                            base_quantization=base_quantization, dropout=dropout,
                                            exclude_modules=exclude_modules, modules_to_save=modules_to_save),
                                       "add_loldu")
    returned, model = model, loldu_root(model)
    if base_type(model) is not None:
        raise ValueError(f"add_loldu: the model itself is a {type(model).__name__}; use "
                         f"LoLDULinear.from_base(layer, rank) (or LoLDUConv2d / LoLDUEmbedding)")
    heads = saved_names(model, config.modules_to_save, config.task_type, "add_loldu")
    if reference is not None:
        targets, existing = select_targets(model, None, lambda m: _config_factory(reference, m) is not None)
    else:
        targets, existing = select_targets(model, config.target_modules, exclude=config.exclude_modules)
    overlap = [n for n in heads if any(n == t or t.startswith(n + ".") or n.startswith(t + ".") for t in targets)]
    if overlap and config.target_modules in (None, "all-linear"):  # as PEFT: modules_to_save win
        targets = [t for t in targets if not any(t == n or t.startswith(n + ".") or n.startswith(t + ".")
                                                 for n in overlap)]
    elif overlap:
        raise ValueError(f"add_loldu: {overlap} are both targeted by LoLDU and in modules_to_save; a module "
                         f"either trains in full or gets LoLDU (add it to exclude_modules)")
    if not targets and not existing:
        raise ValueError(f"add_loldu: the model has no layer to adapt outside modules_to_save {heads}")
    if existing:
        warn_caller(f"add_loldu: {existing} already have LoLDU; left as they are (adapters never stack)")
    no_dropout = [n for n in targets if not layer_class(model.get_submodule(n)).input_dropout]
    if config.dropout and no_dropout:
        raise ValueError(f"add_loldu: dropout={config.dropout:g} drops input features, and {no_dropout} are "
                         f"nn.Embedding layers (their input is indices): target them apart with dropout=0")

    built: Dict[str, Tuple[nn.Module, LoLDULayer]] = {}
    for name in layer_progress(model, targets, "add_loldu", progress):
        module = model.get_submodule(name)
        cls = layer_class(module)
        if reference is not None and quantized_kind(module) is not None:
            raise ValueError(f"add_loldu: {name!r} is quantized ({quantized_kind(module)}); the reference code's "
                             f"loldu_config factories read a plain weight. Use rank= or a LoLDUConfig")
        if reference is not None:
            spec = _call_factory(_config_factory(reference, module), module, name)
            if not isinstance(spec, LoLDUParametrization):
                raise TypeError(f"add_loldu: the factory for {name!r} must return a LoLDUParametrization")
            layer = cls.from_parametrization(module, spec, config.backend, name, freeze=False, dropout=config.dropout)
        else:
            shape = logical_shape(module)
            shape = (shape[0], math.prod(shape[1:]))
            rank_here = clamp_rank(config.rank, shape, f"add_loldu: {name!r}")
            layer = cls.from_base(module, rank_here, config.alpha, config.init, config.init_seed, config.backend,
                                  name, freeze=False, dropout=config.dropout)
        if config.base_quantization is not None:
            if layer.quantized_by is not None:
                raise ValueError(f"add_loldu: {name!r} is already quantized ({layer.quantized_by}); "
                                 f"base_quantization={config.base_quantization!r} would quantize it again. Leave "
                                 f"base_quantization=None for a quantized model")
            if not isinstance(layer, LoLDULinear):
                raise ValueError(f"add_loldu: base_quantization covers nn.Linear layers; {name!r} is a "
                                 f"{layer.base_class.__name__}")
            layer.quantize_base(config.base_quantization)
        built[name] = (module, layer)
    adapter = next((layer.active_adapter for _, layer in loldu_layers(model)), "default")
    saved = wrap_saved(model, heads, adapter)
    for module, layer in built.values():
        layer.freeze_base()
        replace_module(model, module, layer)
    install_saved(model, saved)
    return returned


def mark_only_loldu_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter of ``model`` except the LoLDU ones (d and s of every layer, and the trainable
    adapter's copy of each module in modules_to_save); returns the model."""
    loldu = {id(p) for p in get_loldu_params(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in loldu)
    return model


def get_loldu_params(model: nn.Module, print_shapes: bool = False) -> List[nn.Parameter]:
    """The trainable LoLDU parameters: d and s of every LoLDU layer, then the parameters of the trainable
    adapter's copy of each module in modules_to_save (they train in full)."""
    params = []
    for name, layer in loldu_layers(model):
        for pname in ("d", "s"):
            p = getattr(layer, pname)
            if print_shapes:
                print(f"{name}.{pname}: {tuple(p.shape)}")
            params.append(p)
    for name, module in saved_modules(model):
        copy = module.modules_to_save[module.active_adapter] if module.active_adapter in module.modules_to_save \
            else None
        for pname, p in (copy.named_parameters() if copy is not None else ()):
            if print_shapes:
                print(f"{name}.modules_to_save.{module.active_adapter}.{pname}: {tuple(p.shape)}")
            params.append(p)
    return params


def get_loldu_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{name: tensor} of the LoLDU parameters only, with the keys of ``model.state_dict()``."""
    return {
        f"{name}.{p}" if name else p: getattr(layer, p).detach()
        for name, layer in loldu_layers(model)
        for p in ("d", "s")
    }


def print_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """Prints and returns (trainable, total) parameter counts, like PEFT's."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total
