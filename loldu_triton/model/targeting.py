"""Which layers of a model can take LoLDU and which a call targets, and putting a layer in another's place
(accelerate's hooks carried over). Shared by every function that changes or reads a model."""
from __future__ import annotations

import re
import sys
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..core.settings import check_adapter_name, progress_delay, warn_caller
from ..factors.quantized_bases import logical_shape, quantized_kind, why_not_dequantizable
from ..layers.base import LoLDULayer
from ..layers.registry import base_type
from ..layers.saved import SavedModule


def loldu_root(model: nn.Module) -> nn.Module:
    """The model whose module names adapter files and the functions use: the wrapped one of a LoLDUModel (so
    that an adapter saved through the wrapper loads onto the plain base, and back)."""
    return model.get_base_model() if getattr(type(model), "is_loldu_wrapper", False) else model


# Seconds a loop over layers runs before its progress bar appears (when asked for explicitly: at once).
PROGRESS_DELAY = 2.0


def layer_progress(model: nn.Module, names: List[str], where: str, progress) -> Iterator[str]:
    """``names`` one by one, with a progress bar on stderr that names the layer and its shape (tqdm). progress:
    None shows it, where the loop takes over PROGRESS_DELAY seconds, when stderr is a terminal and
    LOLDU_PROGRESS is not 0; True (or LOLDU_PROGRESS=1) always, False never (core.settings.progress_delay)."""
    delay = progress_delay(progress, PROGRESS_DELAY)
    if delay is None or not names:
        yield from names
        return
    from tqdm.auto import tqdm

    modules = dict(model.named_modules())
    with tqdm(total=len(names), desc=where, unit="layer", delay=delay,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for name in names:
            module = modules.get(name)
            weight = getattr(module, "weight", None)
            shape = "x".join(str(n) for n in logical_shape(module)) if isinstance(weight, torch.Tensor) else "?"
            bar.set_postfix_str(f"{name} ({shape})", refresh=delay == 0.0)
            yield name
            bar.update(1)


def loldu_layers(model: nn.Module) -> List[Tuple[str, LoLDULayer]]:
    """(name, layer) of every LoLDU layer (LoLDULinear, LoLDUConv2d, LoLDUEmbedding) in ``model`` (names as in
    loldu_root(model))."""
    return [(name, m) for name, m in loldu_root(model).named_modules() if isinstance(m, LoLDULayer)]


def model_float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The floating dtype that holds most of the model's own weights (LoLDU's d and s and quantized codes not
    counted): the dtype a full-precision layer merged from a quantized base must compute in to fit the model."""
    sizes: Dict[torch.dtype, int] = {}
    adapter = {id(p) for _, layer in loldu_layers(model) for p in (layer.d, layer.s)}
    for p in model.parameters():
        if p.is_floating_point() and p.dtype.itemsize > 1 and id(p) not in adapter:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get) if sizes else None


def why_not_adaptable(name: str, module: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    """None when a LoLDU layer can stand in for this module, else the reason it cannot."""
    base = base_type(module)
    if base is None:
        return f"{type(module).__name__} is not an nn.Linear, nn.Conv2d or nn.Embedding"
    if isinstance(module, LoLDULayer):
        return None
    kind = quantized_kind(module)
    if kind is not None:  # its own forward runs (LoLDUQuantizedLinear keeps it as base_layer)
        if "forward" in vars(module) and not accelerate_hooked(module):
            return "its forward is replaced on the instance, which LoLDU would bypass"
        return why_not_dequantizable(module, kind)
    if parametrize.is_parametrized(module):
        return ("its weight is computed by a parametrization (weight_norm, spectral_norm, ...), which LoLDU "
                "would bypass; remove it first (torch.nn.utils.parametrize.remove_parametrizations)")
    if not isinstance(module._parameters.get("weight"), nn.Parameter):
        return ("its weight is not a plain parameter (the legacy torch.nn.utils.weight_norm recomputes it in a "
                "hook); remove that first (torch.nn.utils.remove_weight_norm)")
    if "forward" in vars(module) and not accelerate_hooked(module):
        return ("its forward is replaced on the instance, which LoLDU would bypass (accelerate's hooks are "
                "carried over to the LoLDU layer; other replacements are not)")
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its out_proj weight directly, bypassing the layer's forward"
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides nn.{base.__name__}.forward, which LoLDU would bypass"
    return None


def accelerate_hooked(module: nn.Module) -> bool:
    """Whether accelerate's add_hook_to_module wrapped the module's own forward (as device_map= leaves it)."""
    old = module.__dict__.get("_old_forward")
    return ("_hf_hook" in module.__dict__ and old is not None
            and getattr(old, "__func__", None) is type(module).forward and getattr(old, "__self__", None) is module)


def offloaded_reason(name: str, modules: Dict[str, nn.Module]) -> Optional[str]:
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


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered in ``model``: a module shared under several names stays shared.

    An accelerate hook on ``old`` (device_map= puts one on each layer it places) is attached to ``new``, so it
    goes on moving inputs, outputs and the layer's tensors (``new``'s factors and adapter too) to its device."""
    for parent in list(model.modules()):
        for key, child in parent._modules.items():
            if child is old:
                parent._modules[key] = new
    if accelerate_hooked(old):
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, old._hf_hook)


def name_matches(name: str, spec) -> bool:
    """Whether module ``name`` is picked by ``spec``: a regex (full match) or a list of names (suffix match), as
    target_modules, exclude_modules and modules_to_save read them."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == n or name.endswith("." + n) for n in spec)


def select_targets(model, target_modules,
                    by_type=lambda m: isinstance(m, nn.Linear), exclude=None) -> Tuple[List[str], List[str]]:
    """Names of the layers to adapt, and of targeted layers that already have LoLDU.

    None and "all-linear" take the layers ``by_type`` accepts (nn.Linear), leaving out with a warning those
    LoLDU cannot stand in for; names and regexes may also pick nn.Conv2d and nn.Embedding layers, as in PEFT,
    and naming a layer LoLDU cannot stand in for is an error."""
    # Every name, aliases included (a module registered twice answers to both); duplicates dropped at the end.
    modules = dict(model.named_modules(remove_duplicate=False))
    parents = {f"{p}.{c}" if p else c: m for p, m in modules.items() for c, _ in m.named_children()}
    # A module of modules_to_save trains in full (its original and its copies): never a target.
    heads = [n for n, m in modules.items() if isinstance(m, SavedModule)]
    modules = {n: m for n, m in modules.items() if not any(n == h or n.startswith(h + ".") for h in heads)}

    def reason(name):
        return offloaded_reason(name, modules) or why_not_adaptable(name, modules[name], parents.get(name))

    def excluded(name):  # (left out before any check: an excluded layer need not be adaptable)
        return exclude is not None and name_matches(name, exclude)

    if target_modules is None or target_modules == "all-linear":
        typed = [n for n, m in modules.items() if n and by_type(m) and not excluded(n)]
        offloaded = [n for n in typed if offloaded_reason(n, modules)]
        if offloaded:  # never left out silently: the user asked for every layer
            raise ValueError(f"add_loldu: cannot adapt {offloaded}: {offloaded_reason(offloaded[0], modules)}")
        chosen = [n for n in typed if reason(n) is None]
        skipped = [n for n in typed if n not in chosen]
        if skipped:
            warn_caller(f"add_loldu: left out {skipped}: " + "; ".join(reason(n) for n in skipped))
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
                hits = [n for n in layers if name_matches(n, [target])]
                if not hits:
                    inside = [h for h in heads if name_matches(h, [target])]
                    raise ValueError(f"add_loldu: target_modules entry {target!r} matches no nn.Linear, "
                                     f"nn.Conv2d or nn.Embedding layer"
                                     + (f" outside modules_to_save {inside} (they train in full)" if inside else ""))
                chosen += [n for n in hits if n not in chosen]
        chosen = [n for n in chosen if not excluded(n)]
        for n in chosen:
            if reason(n):
                raise ValueError(f"add_loldu: cannot adapt {n!r}: {reason(n)}")
    if not chosen:
        raise ValueError("add_loldu: the model has no layer to adapt"
                         + (f" (exclude_modules={exclude!r} left none)" if exclude is not None else ""))
    seen = set()
    chosen = [n for n in chosen if id(modules[n]) not in seen and not seen.add(id(modules[n]))]
    existing = [n for n in chosen if isinstance(modules[n], LoLDULayer)]
    return [n for n in chosen if n not in existing], existing


def layers_or_error(model: nn.Module, where: str) -> List[Tuple[str, LoLDULayer]]:
    """loldu_layers(model), or an error naming ``where`` when there is none."""
    layers = loldu_layers(model)
    if not layers:
        raise ValueError(f"{where}: the model has no LoLDU layer")
    return layers


def refuse_merged(layers, where: str) -> None:
    merged = [name for name, layer in layers if layer.loldu_merged]
    if merged:
        raise ValueError(f"{where}: {merged} are merged (merge_loldu(model, reversible=True)); call "
                         f"unmerge_loldu(model) first")


def adapter_layers(model: nn.Module, adapter_name: Optional[str], where: str) -> List[Tuple[str, LoLDULayer]]:
    """(name, layer) of the LoLDU layers that hold ``adapter_name`` (None: every LoLDU layer, for its trainable
    adapter), for functions that write an adapter out; errors name ``where``."""
    layers = layers_or_error(model, where)
    if any(not name for name, _ in layers):
        raise ValueError(f"{where}: the model itself is a LoLDU layer; pass a module that contains it")
    if adapter_name is None:
        return layers
    check_adapter_name(adapter_name, where)
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
