"""What a LoLDUModel's state dict holds (the adapter and its settings, for a Trainer's checkpoints) and the
merged state dict its save_pretrained(merged=True) writes."""
from __future__ import annotations

import json
from typing import Dict

import torch
import torch.nn as nn

from ..core.fileformat import LAYER_FIELDS
from ..core.settings import check_fields
from ..model.heads import saved_modules
from ..model.targeting import loldu_layers, model_float_dtype

STATE_FORMAT = "loldu-triton-model"


def layer_settings(layer) -> dict:
    """What rebuilds a layer's adapter: the LoLDUConfig fields an adapter file records per layer, and dropout."""
    settings = layer.loldu_settings().to_dict()
    return {k: settings[k] for k in LAYER_FIELDS + ("dropout",)}


def keep_adapter_only(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """state_dict() of a LoLDUModel: what trains and the settings. The frozen base is the base model's (and its
    tied weights would stop a Trainer's safetensors save)."""
    keep = {prefix + k for k in module.adapter_state_keys()}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
        del state_dict[key]


def read_extra_state(state, where: str) -> dict:
    try:
        data = json.loads(bytes(state.to("cpu", torch.uint8).tolist()).decode())
    except (AttributeError, TypeError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: the LoLDU state is not readable ({err})") from None
    if (not isinstance(data, dict) or data.get("format") != STATE_FORMAT
            or not all(isinstance(data.get(k), dict) for k in ("peft_config", "layers"))
            or not isinstance(data.get("modules_to_save"), list) or not isinstance(data.get("active_adapter"), str)):
        raise ValueError(f"{where}: not a LoLDUModel state (or one of an older version)")
    for name, fields in data["peft_config"].items():
        check_fields(fields, f"{where}: adapter {name!r}")
    for name, layer in data["layers"].items():
        if (not isinstance(layer, dict) or not isinstance(layer.get("settings"), dict)
                or not isinstance(layer.get("pivots"), list)
                or set(layer["settings"]) != set(LAYER_FIELDS + ("dropout",))):
            raise ValueError(f"{where}: layer {name!r} lacks its settings or pivots")
        check_fields(layer["settings"], f"{where}: layer {name!r}")
    if not all(isinstance(n, str) and n for n in data["modules_to_save"]):
        raise ValueError(f"{where}: modules_to_save must be module names")
    return data


def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict of the plain model that merge_and_unload would give, without changing ``model``: W0 + delta
    in each LoLDU layer, the trainable copy of each module in modules_to_save, and no LoLDU keys."""
    layers = loldu_layers(model)
    names = {}  # every name of each LoLDU layer (one module registered twice: T5's shared embedding)
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    replaced = {}
    dtype = model_float_dtype(model)
    for name, layer in layers:
        plain = layer.to_base(merge=True)
        if getattr(layer, "quantized_by", None) and dtype is not None:  # as merge_loldu: in the model's dtype
            plain.to(dtype)
        replaced.update({alias: plain for alias in names[id(layer)]})
    replaced.update({name: module.running_module() for name, module in saved_modules(model)})
    adapted = {layer.weight.data_ptr(): name for name, layer in layers}
    if len(adapted) < len(layers):
        shared = [name for name, layer in layers if adapted[layer.weight.data_ptr()] != name]
        raise ValueError(f"save_pretrained(merged=True): {shared} share a tied weight with other adapted layers, "
                         f"each with its own delta; one merged checkpoint cannot hold both. Save the adapter")
    state = {}
    for key, value in model.state_dict().items():
        if next((n for n in replaced if key.startswith(n + ".")), None) is None:
            if value.data_ptr() in adapted:
                raise ValueError(f"save_pretrained(merged=True): {key!r} shares its tensor with the adapted layer "
                                 f"{adapted[value.data_ptr()]!r} (tied weights) but computes with W0; a merged "
                                 f"checkpoint ties them again. Save the adapter, or use merge_and_unload() and "
                                 f"untie before saving")
            state[key] = value
    for name, module in replaced.items():
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return state
