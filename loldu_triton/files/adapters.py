"""Saving an adapter of a model (save_loldu) and loading one into a model (load_loldu): the model side of the
adapter file format (core.fileformat), with the checks of a base weight against the adapter's fingerprint."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .._version import __version__
from ..core.config import LoLDUConfig
from ..core.fileformat import (ADAPTER_NAME, COMMON_FIELDS, LAYER_FIELDS, PIVOT_VALUE_RTOL, SAVED_PREFIX,
                               atomic_write, read_adapter, refuse_other_adapter, remove_legacy, serialize)
from ..core.settings import check_adapter_name, check_progress, warn_caller
from ..factors.fingerprint import sketch_gap, sketch_tolerance
from ..factors.quantized_bases import QUANTIZED_BASE_KINDS, logical_shape
from ..layers.base import LoLDULayer
from ..layers.registry import base_type, layer_class
from ..layers.saved import SavedModule
from ..model.heads import saved_modules
from ..model.targeting import (adapter_layers, layer_progress, loldu_layers, loldu_root, offloaded_reason,
                               refuse_merged, replace_module, why_not_adaptable)


def layer_record(layer: LoLDULayer, sha256: str, precision: str) -> dict:
    """One layer's entry in the file's config: its settings (LoLDUConfig fields), type, shape and base."""
    settings = layer.loldu_settings().to_dict()
    return {**{k: settings[k] for k in LAYER_FIELDS}, "type": layer.base_class.__name__,
            "weight_shape": list(logical_shape(layer)), "base": {"sha256": sha256, "precision": precision}}


def common_config(layers) -> Optional[LoLDUConfig]:
    """The one LoLDUConfig from which add_loldu rebuilds exactly these layers, or None when there is none (the
    layers were adapted with different settings)."""
    ranks = [layer.rank for _, layer in layers]
    fulls = [min(logical_shape(layer)[0], math.prod(logical_shape(layer)[1:])) for _, layer in layers]
    top = max(ranks)
    if len(set(ranks)) > 1 and ranks == fulls:
        rank = "full"
    elif all(r == min(top, f) for r, f in zip(ranks, fulls)):
        rank = top  # each layer holds it, or was lowered to its full rank
    else:
        return None
    alphas = {layer.alpha for _, layer in layers}
    if len(alphas) == 1:
        alpha = alphas.pop()
    elif all(layer.alpha == layer.rank for _, layer in layers):
        alpha = None
    else:
        return None
    settings = {(layer.init, layer.init_seed, layer.base_quantization, layer.dropout) for _, layer in layers}
    if len(settings) != 1:
        return None
    init, init_seed, quantization, dropout = settings.pop()
    return LoLDUConfig(rank=rank, alpha=alpha, init=init, init_seed=init_seed, base_quantization=quantization,
                       target_modules=[name for name, _ in layers], dropout=dropout)


def save_loldu(model: nn.Module, directory, adapter_name: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write one adapter of the model to ``directory`` (created if needed); returns the directory.

    adapter_name=None saves the trainable adapter; a name saves that adapter (trainable or named) of every
    layer that has it. Either way the file loads back as it was saved: ``load_loldu(base, directory)`` makes it
    the trainable adapter, ``load_loldu(base, directory, adapter_name=name)`` a named one, with the same d and s
    bit for bit. The adapter goes into one file, replaced atomically: an interrupted save leaves the previous
    adapter as it was. Non-finite values are refused before anything is written. A folder that holds another
    kind of adapter (a PEFT LoRA adapter, say) is refused unless ``overwrite=True``; a LoLDU adapter of either
    format is replaced."""
    layers = adapter_layers(model, adapter_name, "save_loldu")
    records, tensors = {}, {}
    for name, layer in layers:
        sha256, sketch, precision = layer.base_fingerprint()  # (first: refuses a base still on the meta device)
        d, s = layer.adapter_values(layer.active_adapter if adapter_name is None else adapter_name)
        d, s = d.detach().to("cpu", torch.float32), s.detach().to("cpu", torch.float32).reshape(1)
        if not (torch.isfinite(d).all() and torch.isfinite(s).all()):
            raise ValueError(f"save_loldu: layer {name!r} has non-finite adapter values (d or s holds NaN or Inf); "
                             f"nothing was written")
        records[name] = layer_record(layer, sha256, precision)
        tensors[f"{name}.d"] = d.contiguous()
        tensors[f"{name}.s"] = s
        tensors[f"{name}.pivots"] = layer.pivots.detach().to("cpu", torch.int32)
        tensors[f"{name}.sketch"] = sketch
    adapter = layers[0][1].active_adapter if adapter_name is None else adapter_name
    heads = {}
    for name, module in saved_modules(model):
        if adapter in module.modules_to_save:
            copy = module.modules_to_save[adapter]
            state = {k: v.detach().to("cpu").contiguous() for k, v in copy.state_dict().items()}
            bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                raise ValueError(f"save_loldu: module {name!r} (modules_to_save) has non-finite values in {bad}; "
                                 f"nothing was written")
            heads[name] = {"type": type(copy).__name__, "keys": list(state)}
            tensors.update({f"{SAVED_PREFIX}{name}:{k}": v for k, v in state.items()})
    common = common_config(layers)
    # The top level is the common LoLDUConfig (rank null when the layers differ; backend is a runtime choice).
    fields = {k: v for k, v in common.to_dict().items() if k in COMMON_FIELDS} if common else {"rank": None}
    config = {"library_version": __version__, **fields, "layers": records}
    if heads:
        config["modules_to_save"] = heads
    data = serialize(tensors, json.dumps(config, separators=(",", ":")), version=3 if heads else 2)
    directory = Path(directory)
    refuse_other_adapter(directory, ("loldu", "loldu-first"), "save_loldu", overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / ADAPTER_NAME, data)
    remove_legacy(directory)
    return directory


def follows_pivots(layer: LoLDULayer, saved: dict, named: bool) -> bool:
    """Whether ``layer`` takes the adapter's elimination order rather than its own: the pivots differ and one
    side is a base another library quantized (its rounding can reorder near-equal pivots), and no other adapter
    of the layer depends on its factors. The fingerprint (sketch) then vouches for the base alone."""
    here = layer.quantized_by or str(layer.weight.dtype).replace("torch.", "")
    quantized = here in QUANTIZED_BASE_KINDS or saved["base"].get("precision") in QUANTIZED_BASE_KINDS
    return (quantized and "sketch" in saved and not named and not layer.adapter_names
            and layer.pivots.tolist() != saved["pivots"])


def check_base(name: str, layer: LoLDULayer, saved: dict, path: Path, follow: bool = False) -> None:
    if not follow and layer.pivots.tolist() != saved["pivots"]:
        raise ValueError(f"load_loldu: layer {name!r} has a different base weight than the adapter in {path} "
                         f"was trained on (its LU pivots differ)")
    sha256, sketch, precision = layer.base_fingerprint()
    base = saved["base"]
    if sha256 == base["sha256"]:
        return
    if "sketch" in saved:
        gap = sketch_gap(sketch, saved["sketch"])
        tol = sketch_tolerance(precision, base["precision"])
        there = base["precision"]
    else:  # first format: pivot values only
        ref = torch.tensor(base["pivot_values"], dtype=torch.float64)
        gap = float((layer.pivot_values.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        tol, there = PIVOT_VALUE_RTOL, base.get("dtype", "?")
    if not gap <= tol:
        raise ValueError(f"load_loldu: layer {name!r} has a different base weight than the adapter in {path} "
                         f"was trained on (its fingerprint differs by {gap:.2e} relative, more than a cast "
                         f"between {there} and {precision} explains: {tol:.1e})")
    warn_caller(f"load_loldu: layer {name!r}: base weight is not byte-identical to the one the adapter was "
                f"trained on ({there} there, {precision} here; fingerprints agree to {gap:.1e}); loading")


def load_loldu(model: nn.Module, directory, adapter_name: Optional[str] = None,
               progress: Optional[bool] = None) -> nn.Module:
    """Load an adapter written by ``save_loldu`` into ``model`` (a plain base model, or one with LoLDU).

    Layers without LoLDU get it; every check (files, layer names and shapes, base-weight fingerprints) runs
    before anything changes, so on an error the model is left exactly as it was.

    adapter_name=None (or the trainable adapter's name: "default" unless set_adapter chose another) loads into
    the trainable adapter (d and s, in place), as save_loldu(adapter_name=None) saves it. Any other name stores a frozen named adapter next to it, for ``adapter_batch`` and
    ``set_adapter``; named adapters share the layer's factors, so their rank, alpha and init must be the
    layer's (a layer without LoLDU gets it with the adapter's settings, at init).

    Like add_loldu, it leaves requires_grad of the other parameters alone: ``mark_only_loldu_as_trainable``
    freezes them.

    Between a base that bitsandbytes or torchao quantized and the full-precision one (either way), the layer
    takes the adapter's pivot order (its factors then differ only by the quantization's rounding), and loading
    warns that the base is not byte-identical. ``progress``: as add_loldu's.
    """
    check_adapter_name(adapter_name, "load_loldu", allow_none=True)
    check_progress(progress, "load_loldu")
    returned, model = model, loldu_root(model)
    refuse_merged(loldu_layers(model), "load_loldu")
    directory = Path(directory)
    layers, tensors, saved = read_adapter(directory)

    plan = []  # (name, module now, layer to hold the values, whether it replaces the module)
    modules = dict(model.named_modules())
    for name in layer_progress(model, list(layers), "load_loldu", progress):
        spec = layers[name]
        module = modules.get(name)
        base = base_type(module) if module is not None else None
        if base is None or base.__name__ != spec["type"]:
            found = "nothing" if module is None else type(module).__name__
            raise ValueError(f"load_loldu: the adapter in {directory} has layer {name!r}, but the model has "
                             f"{found} there (an nn.{spec['type']} is needed)")
        if list(logical_shape(module)) != spec["weight_shape"]:
            raise ValueError(f"load_loldu: layer {name!r} has a weight of shape {list(logical_shape(module))}, the "
                             f"adapter expects {spec['weight_shape']}")
        settings = (spec["rank"], spec["alpha"], spec["init"], spec["init_seed"])
        named = adapter_name is not None and adapter_name != getattr(module, "active_adapter", "default")
        current = None
        if isinstance(module, LoLDULayer):
            current = (module.rank, module.alpha, module.init, module.init_seed)
        if current == settings:
            target, replaces = module, False
        elif named and current is not None:
            raise ValueError(f"load_loldu: layer {name!r} has LoLDU with (rank, alpha, init, init_seed) = "
                             f"{current}, adapter {adapter_name!r} was trained with {settings}; named adapters "
                             f"share the layer's factors and initial diagonal")
        elif current is not None and getattr(module, "adapter_names", ()):
            raise ValueError(f"load_loldu: layer {name!r} has named adapters {list(module.adapter_names)} on "
                             f"LoLDU with (rank, alpha, init, init_seed) = {current}; the adapter needs "
                             f"{settings}, which would drop them. Remove LoLDU from the model first")
        elif current is not None and module.base_quantization is not None:
            raise ValueError(f"load_loldu: layer {name!r} has a quantized ({module.base_quantization}) base with "
                             f"LoLDU at (rank, alpha, init, init_seed) = {current}; the adapter in {directory} "
                             f"needs {settings}, whose factors would come from the dequantized weight, not the "
                             f"one it was trained on. Add LoLDU with the adapter's settings to the full-precision "
                             f"base (LoLDUConfig.from_pretrained, base_quantization included), then load")
        else:
            reason = offloaded_reason(name, modules) or why_not_adaptable(name, module, modules[name.rpartition(".")[0]])
            if reason:
                raise ValueError(f"load_loldu: cannot adapt {name!r}: {reason}")
            if module.weight.is_meta:
                raise ValueError(f"load_loldu: layer {name!r} is on the meta device; load its real weights first")
            backend = getattr(module, "backend", "auto")
            target = layer_class(module).from_base(module, spec["rank"], spec["alpha"], spec["init"],
                                                  spec["init_seed"], backend, name, freeze=False)
            if isinstance(module, LoLDULayer):
                target.base_requires_grad = module.base_requires_grad
            replaces = True
        follow = follows_pivots(target, spec, named and not replaces)  # (a new layer: no adapter shares it)
        if follow and replaces:  # a new layer, not in the model yet
            target.follow_pivots(spec["pivots"])
        check_base(name, target, spec, directory, follow)
        plan.append((name, module, target, replaces, named, follow and not replaces))

    heads = plan_saved(model, saved, modules, directory)
    others = [n for n, _ in loldu_layers(model) if n not in layers]
    if others and not all(entry[4] for entry in plan):
        warn_caller(f"load_loldu: {others} have LoLDU but are not in the adapter; left as they are")
    for name, module, target, replaces, named, refactorize in plan:
        if refactorize:  # a layer of the model: changed only now that every check passed
            target.follow_pivots(layers[name]["pivots"])
        d, s = tensors[f"{name}.d"].to(target.d.device), tensors[f"{name}.s"].to(target.d.device)
        if named:
            target.set_named_adapter(adapter_name, d, s)
        else:
            with torch.no_grad():
                target.d.copy_(d)
                target.s.copy_(s)
        if replaces:
            target.freeze_base()
            replace_module(model, module, target)
    active = next((layer.active_adapter for _, layer in loldu_layers(model)), "default")
    name = active if adapter_name is None else adapter_name
    for module, state in heads:
        if not isinstance(module, SavedModule):
            wrapper = SavedModule(module, active, with_copy=name == active)
            replace_module(model, module, wrapper)
            module = wrapper
        copy = module.modules_to_save[name] if name in module.modules_to_save else module.add_copy(name)
        copy.load_state_dict(state)
    return returned


def plan_saved(model: nn.Module, saved: dict, modules: dict, directory: Path) -> list:
    """(module, state dict to load) for each of the file's modules_to_save, checked against the model."""
    plan = []
    for name, record in saved.items():
        module = modules.get(name)
        original = module.original_module if isinstance(module, SavedModule) else module
        if original is None or type(original).__name__ != record["type"]:
            found = "nothing" if original is None else type(original).__name__
            raise ValueError(f"load_loldu: the adapter in {directory} saves module {name!r} (a {record['type']}), "
                             f"but the model has {found} there")
        expected = original.state_dict()
        if set(expected) != set(record["state"]):
            raise ValueError(f"load_loldu: module {name!r} holds {sorted(expected)}, the adapter in {directory} "
                             f"saves {sorted(record['state'])}")
        state = {}
        for key, value in record["state"].items():
            if value.shape != expected[key].shape:
                raise ValueError(f"load_loldu: module {name!r}: {key} has shape {tuple(expected[key].shape)} in the "
                                 f"model, {tuple(value.shape)} in the adapter in {directory}")
            if value.dtype != expected[key].dtype:
                warn_caller(f"load_loldu: module {name!r}: {key} is {value.dtype} in the adapter, "
                            f"{expected[key].dtype} in the model; cast")
            state[key] = value.to(expected[key].device, expected[key].dtype)
        plan.append((module, state))
    return plan
