"""The public API of the LoLDU reference code (minloldu), backed by the fused LoLDU layers, plus PEFT-style
targeting."""
from __future__ import annotations

import inspect
import re
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .config import LoLDUConfig, RankClampWarning, clamp_rank
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
    def _from_layer(cls, layer: nn.Module, rank, alpha, init, init_seed, factory: str):
        # As add_loldu(rank=...): a rank the weight cannot hold is lowered to its full rank, with a warning.
        name = f"{type(layer).__name__} weight"
        shape = (layer.weight.shape[0], layer.weight[0].numel())
        rank = clamp_rank(rank, shape, f"LoLDUParametrization.{factory}: {name}")
        return cls(layer.weight, rank, alpha, init, init_seed, name=name)

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank, alpha=None, init="lu", init_seed=0):
        """On the out_features x in_features weight. A rank larger than min(out, in) is lowered to it with a
        warning; rank="full" takes it without one."""
        return cls._from_layer(layer, rank, alpha, init, init_seed, "from_linear")

    @classmethod
    def from_conv2d(cls, layer: nn.Conv2d, rank, alpha=None, init="lu", init_seed=0):
        """On the weight viewed as out_channels x (in_channels / groups * kh * kw); rank as in from_linear."""
        return cls._from_layer(layer, rank, alpha, init, init_seed, "from_conv2d")

    @classmethod
    def from_embedding(cls, layer: nn.Embedding, rank, alpha=None, init="lu", init_seed=0):
        """On the num_embeddings x embedding_dim table; rank as in from_linear."""
        return cls._from_layer(layer, rank, alpha, init, init_seed, "from_embedding")

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
    if "forward" in vars(module) and not _accelerate_hooked(module):
        return ("its forward is replaced on the instance, which LoLDU would bypass (accelerate's hooks are "
                "carried over to the LoLDU layer; other replacements are not)")
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its out_proj weight directly, bypassing the layer's forward"
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides nn.{base.__name__}.forward, which LoLDU would bypass"
    return None


def _accelerate_hooked(module: nn.Module) -> bool:
    """Whether accelerate's add_hook_to_module wrapped the module's own forward (as device_map= leaves it)."""
    old = module.__dict__.get("_old_forward")
    return ("_hf_hook" in module.__dict__ and old is not None
            and getattr(old, "__func__", None) is type(module).forward and getattr(old, "__self__", None) is module)


def _offloaded(name: str, modules: Dict[str, nn.Module]) -> Optional[str]:
    """Why ``name`` cannot be adapted where accelerate offloaded its weight, else None. An offloaded weight is
    on the meta device until a hook (on the layer or on a block above it) loads it for one forward."""
    module = modules[name]
    weight = getattr(module, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.is_meta):
        return None
    parts = name.split(".")
    if not any("_hf_hook" in vars(modules.get(".".join(parts[:i]), object)) for i in range(len(parts) + 1)):
        return None  # plain deferred init (the meta device without accelerate): layers support that
    return ("its weight is offloaded by accelerate (on the meta device until a hook loads it for one forward); "
            "LoLDU needs the weight itself to factorize it, and keeps trainable values next to it. Load the model "
            "so that the layer stays on a device (a device_map, or max_memory with room for it, that puts it on a "
            "GPU or the CPU rather than 'disk' or an offloaded CPU), or leave it out of target_modules")


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered in ``model``: a module shared under several names stays shared.

    An accelerate hook on ``old`` (device_map= puts one on each layer it places) is attached to ``new``, so it
    goes on moving inputs, outputs and the layer's tensors (``new``'s factors and adapter too) to its device."""
    for parent in list(model.modules()):
        for key, child in parent._modules.items():
            if child is old:
                parent._modules[key] = new
    if _accelerate_hooked(old):
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, old._hf_hook)


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
        return _offloaded(name, modules) or _why_not_adaptable(name, modules[name], parents.get(name))

    if target_modules is None or target_modules == "all-linear":
        typed = [n for n, m in modules.items() if n and by_type(m)]
        offloaded = [n for n in typed if _offloaded(n, modules)]
        if offloaded:  # never left out silently: the user asked for every layer
            raise ValueError(f"add_loldu: cannot adapt {offloaded}: {_offloaded(offloaded[0], modules)}")
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
            warnings.warn(RankClampWarning(f"add_loldu: {name!r} {w.message.detail}"), stacklevel=3)
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
) -> nn.Module:
    """Replace the targeted layers of ``model`` with LoLDU layers, in place (and return the model).

    The settings come as a LoLDUConfig (``add_loldu(model, config)``), as keywords (``rank=`` and the
    others, the fields of LoLDUConfig), or as the reference code's ``loldu_config`` ({nn.Linear: {"weight":
    partial(LoLDUParametrization.from_linear, rank=r)}}, likewise nn.Conv2d with from_conv2d and nn.Embedding
    with from_embedding; it takes every layer of those types).

    ``target_modules``: None (every nn.Linear), "all-linear" (all but the output layer: a Hugging Face
    model's get_output_embeddings(), or a layer named ``lm_head``), a list of names (suffix match) or a regex
    (full match); names and regexes may also pick nn.Conv2d and nn.Embedding layers. On every route a rank
    larger than a layer can hold is lowered to its full rank with a warning; ``rank="full"`` asks for every
    layer's full rank, min(in, out) (the paper's ViT setting), without one. Layers that already have LoLDU
    are left as they are. Nothing is changed if any layer fails.

    base_quantization="int8" (or "fp8", e4m3) stores each adapted nn.Linear's frozen weight as weight-only
    quantized values with a scale per output row (see LoLDULinear.quantize_base); the factors come from the
    unquantized weight. Unlike get_loldu_model, add_loldu leaves requires_grad of the other parameters alone.
    """
    reference = None
    if isinstance(loldu_config, LoLDUConfig):
        keywords = dict(rank=rank, alpha=alpha, init=init, init_seed=init_seed, target_modules=target_modules,
                        backend=backend, base_quantization=base_quantization)
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
        config = LoLDUConfig.from_dict(dict(backend=backend, base_quantization=base_quantization), "add_loldu")
    else:
        config = LoLDUConfig.from_dict(dict(rank=rank, alpha=alpha, init=init, init_seed=init_seed,
                                            target_modules=target_modules, backend=backend,
                                            base_quantization=base_quantization), "add_loldu")
    if base_type(model) is not None:
        raise ValueError(f"add_loldu: the model itself is a {type(model).__name__}; use "
                         f"LoLDULinear.from_base(layer, rank) (or LoLDUConv2d / LoLDUEmbedding)")
    if reference is not None:
        targets, existing = _select_targets(model, None, lambda m: _config_factory(reference, m) is not None)
    else:
        targets, existing = _select_targets(model, config.target_modules)
    if existing:
        warnings.warn(f"add_loldu: {existing} already have LoLDU; left as they are (adapters never stack)",
                      stacklevel=2)

    built: Dict[str, Tuple[nn.Module, LoLDULayer]] = {}
    for name in targets:
        module = model.get_submodule(name)
        cls = LOLDU_LAYERS[base_type(module)]
        if reference is not None:
            spec = _call_factory(_config_factory(reference, module), module, name)
            if not isinstance(spec, LoLDUParametrization):
                raise TypeError(f"add_loldu: the factory for {name!r} must return a LoLDUParametrization")
            layer = cls.from_parametrization(module, spec, config.backend, name, freeze=False)
        else:
            shape = (module.weight.shape[0], module.weight[0].numel())
            rank_here = clamp_rank(config.rank, shape, f"add_loldu: {name!r}")
            layer = cls.from_base(module, rank_here, config.alpha, config.init, config.init_seed, config.backend,
                                  name, freeze=False)
        if config.base_quantization is not None:
            if not isinstance(layer, LoLDULinear):
                raise ValueError(f"add_loldu: base_quantization covers nn.Linear layers; {name!r} is a "
                                 f"{layer.base_class.__name__}")
            layer.quantize_base(config.base_quantization)
        built[name] = (module, layer)
    for module, layer in built.values():
        layer.freeze_base()
        _replace(model, module, layer)
    return model


def mark_only_loldu_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter of ``model`` except the LoLDU ones (d and s of every layer); returns the model."""
    loldu = {id(p) for p in get_loldu_params(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in loldu)
    return model


def get_loldu_model(model: nn.Module, config: LoLDUConfig) -> nn.Module:
    """PEFT's get_peft_model habit: add LoLDU as ``config`` says (see add_loldu), then freeze everything but
    the LoLDU parameters, and return the model (the same object, changed in place). If adding fails, nothing
    is changed, requires_grad included."""
    if not isinstance(config, LoLDUConfig):
        raise TypeError(f"get_loldu_model: config must be a LoLDUConfig, got {type(config).__name__}")
    add_loldu(model, config)
    return mark_only_loldu_as_trainable(model)


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


def _layers_or_error(model: nn.Module, where: str) -> List[Tuple[str, LoLDULayer]]:
    layers = loldu_layers(model)
    if not layers:
        raise ValueError(f"{where}: the model has no LoLDU layer")
    return layers


def _refuse_merged(layers, where: str) -> None:
    merged = [name for name, layer in layers if layer.loldu_merged]
    if merged:
        raise ValueError(f"{where}: {merged} are merged (merge_loldu(model, reversible=True)); call "
                         f"unmerge_loldu(model) first")


class _Switch:
    """What disable_loldu and enable_loldu return. The change is made by the call itself; used as a context
    manager, leaving the block (normally or by an exception) gives each layer its state from before the call."""

    def __init__(self, model: nn.Module, enabled: bool, where: str):
        layers = loldu_layers(model)
        _refuse_merged(layers, where)
        self.model = model
        self.before = [(layer, layer.loldu_enabled) for _, layer in layers]
        for layer, _ in self.before:
            layer.loldu_enabled = enabled

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc) -> bool:
        for layer, enabled in self.before:
            layer.loldu_enabled = enabled
        return False


def disable_loldu(model: nn.Module) -> _Switch:
    """Switch LoLDU off: the model computes exactly its base outputs, until ``enable_loldu(model)``.

    Also a context manager, as PEFT's ``disable_adapter()``: ``with disable_loldu(model): ...`` runs the base
    model inside the block, and leaving it restores the state from before (also after an exception)."""
    return _Switch(model, False, "disable_loldu")


def enable_loldu(model: nn.Module) -> _Switch:
    """Switch LoLDU back on after disable_loldu; as a context manager, only for the block."""
    return _Switch(model, True, "enable_loldu")


def _unwrap(model: nn.Module, merge: bool, where: str) -> None:
    layers = loldu_layers(model)
    if any(not name for name, _ in layers):
        raise ValueError(f"{where}: the model itself is a {type(model).__name__}; use its to_base(merge=...) "
                         f"method")
    bases = [(layer, layer.to_base(merge)) for _, layer in layers]  # every one built before any is swapped
    for layer, base in bases:
        _replace(model, layer, base)


def remove_loldu(model: nn.Module) -> None:
    """Plain base layers holding the untouched base weights (bit for bit); every adapter, the trained one and
    the named ones, is discarded."""
    _unwrap(model, merge=False, where="remove_loldu")


def merge_loldu(model: nn.Module, reversible: bool = False) -> None:
    """Merge the trainable adapter into the weights: W0 + L diag(e) U, one plain GEMM per layer.

    reversible=False (the reference code's merge): plain layers replace the LoLDU layers; nothing of LoLDU is
    left. It refuses while layers hold named adapters, which it would drop: save them
    (``save_loldu(model, dir, adapter_name=...)``) and delete them (``delete_adapter``) first.

    reversible=True: the LoLDU layers stay, with the merged weight in ``weight`` and the base weight itself
    kept aside, for serving; ``unmerge_loldu(model)`` puts the base back bit for bit to train again. While
    merged, the adapters cannot be switched, disabled or loaded into. Quantized bases are refused (the merged
    weight would be a full-precision copy next to them). All layers or none are merged.
    """
    where = "merge_loldu"
    if not isinstance(reversible, bool):
        raise ValueError(f"{where}: reversible must be True or False, got {reversible!r}")
    if reversible:
        layers = _layers_or_error(model, where)
        quantized = [name for name, layer in layers if layer.base_quantization and not layer.loldu_merged]
        if quantized:
            raise ValueError(f"{where}: {quantized} have a quantized base; a reversible merge would keep a "
                             f"full-precision copy next to it. Serve them unmerged (the kernels dequantize in the "
                             f"GEMM), or merge for good with merge_loldu(model)")
        for _, layer in layers:
            layer.merge_weights()
        return
    named = {name: list(layer.adapter_names) for name, layer in loldu_layers(model) if layer.adapter_names}
    if named:
        raise ValueError(f"{where}: layers hold named adapters that merging would drop: {named}. Save each "
                         f"(save_loldu(model, dir, adapter_name=name)) and delete it (delete_adapter(model, name)) "
                         f"first, or use merge_loldu(model, reversible=True), which keeps them")
    _unwrap(model, merge=True, where=where)


def unmerge_loldu(model: nn.Module) -> None:
    """Undo ``merge_loldu(model, reversible=True)``: each layer gets its base weight back (the same tensor,
    bit for bit) and its LoLDU path, so training can go on. Layers that are not merged are left as they are."""
    for _, layer in _layers_or_error(model, "unmerge_loldu"):
        layer.unmerge_weights()


def _check_adapter_name(name, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: adapter names are non-empty strings, got {name!r}")
    return name


def adapter_layers(model: nn.Module, adapter_name: Optional[str], where: str) -> List[Tuple[str, LoLDULayer]]:
    """(name, layer) of the LoLDU layers that hold ``adapter_name`` (None: every LoLDU layer, for its trainable
    adapter), for functions that write an adapter out; errors name ``where``."""
    layers = loldu_layers(model)
    if not layers:
        raise ValueError(f"{where}: the model has no LoLDU layer")
    if any(not name for name, _ in layers):
        raise ValueError(f"{where}: the model itself is a LoLDU layer; pass a module that contains it")
    if adapter_name is None:
        return layers
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"{where}: adapter_name must be None or a non-empty string, got {adapter_name!r}")
    layers = [(name, layer) for name, layer in layers
              if adapter_name == layer.active_adapter or adapter_name in layer.adapter_names]
    if not layers:
        raise ValueError(f"{where}: no layer has an adapter {adapter_name!r}; the model has {list_adapters(model)}")
    return layers


def list_adapters(model: nn.Module) -> List[str]:
    """The names of the model's adapters: the trainable one first, then the named (frozen) ones in the order
    they were loaded."""
    layers = loldu_layers(model)
    ordered = [layer.active_adapter for _, layer in layers] + [n for _, layer in layers for n in layer.adapter_names]
    return list(dict.fromkeys(ordered))


def get_active_adapter(model: nn.Module) -> str:
    """The name of the trainable adapter (the one in d and s): "default" unless set_adapter chose another."""
    active = {layer.active_adapter for _, layer in _layers_or_error(model, "get_active_adapter")}
    if len(active) != 1:
        raise ValueError(f"get_active_adapter: the layers disagree: {sorted(active)}; call set_adapter(model, name)")
    return active.pop()


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the trainable adapter of every LoLDU layer (PEFT's ``set_adapter``).

    Its values move into each layer's d and s, in place (the parameters stay the same objects: build the
    optimizer after switching, since its state belongs to the previous adapter), and the values d and s held
    are kept as a named adapter under the previous name, so nothing is lost and switching back is exact. A
    layer that the adapter does not cover starts it at init (e == 0, the base).
    """
    where = "set_adapter"
    _check_adapter_name(adapter_name, where)
    layers = _layers_or_error(model, where)
    _refuse_merged(layers, where)
    known = list_adapters(model)
    if adapter_name not in known:
        raise ValueError(f"{where}: no adapter {adapter_name!r}; the model has {known}")
    for _, layer in layers:
        layer.activate_adapter(adapter_name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Drop the named adapter ``adapter_name`` from every layer. The trainable adapter cannot be deleted:
    make another one trainable first (set_adapter)."""
    where = "delete_adapter"
    _check_adapter_name(adapter_name, where)
    layers = _layers_or_error(model, where)
    active = [name for name, layer in layers if layer.active_adapter == adapter_name]
    if active:
        raise ValueError(f"{where}: {adapter_name!r} is the trainable adapter (of {active}); make another one "
                         f"trainable first (set_adapter), or remove LoLDU (remove_loldu)")
    holders = [layer for _, layer in layers if adapter_name in layer.adapter_names]
    if not holders:
        raise ValueError(f"{where}: no adapter {adapter_name!r}; the model has {list_adapters(model)}")
    for layer in holders:
        layer.delete_named_adapter(adapter_name)


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

    A name is the trainable adapter's ("default" unless set_adapter chose another), one loaded with
    ``load_loldu(..., adapter_name=...)``, or None (the base model). Every adapter of a layer shares its L and U, so x U^T is computed once and only the
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
    _refuse_merged(layers, "adapter_batch")
    known = {None}.union(*({layer.active_adapter, *layer.adapter_names} for _, layer in layers))
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
