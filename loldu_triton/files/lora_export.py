"""LoLDU adapters written as standard PEFT LoRA adapters, which every LoRA serving stack loads unchanged.

LoLDU's delta ``L diag(e) U`` is exactly rank r. With PEFT's ``delta = (lora_alpha / r) B A`` take lora_alpha = r,
``B = L`` (out x r) and ``A = diag(e) U`` (r x in). Layers of smaller rank than the largest are padded with zero
rows of A and zero columns of B, so one ``r`` fits all (no rank_pattern, which some servers ignore).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn
from safetensors.torch import save as save_safetensors

from ..core.fileformat import atomic_write, refuse_other_adapter
from ..layers.base import LoLDULayer
from ..layers.conv_embedding import LoLDUConv2d, LoLDUEmbedding
from ..model.targeting import adapter_layers, loldu_root

LORA_CONFIG_NAME = "adapter_config.json"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _why_not_exportable(layer: LoLDULayer) -> Optional[str]:
    """None when PEFT's LoRA layer for this base computes the same delta, else why not."""
    if isinstance(layer, LoLDUConv2d):
        # PEFT's lora_A copies kernel size, stride and padding only, and its lora_B is grouped differently.
        if layer.groups != 1:
            return f"groups={layer.groups}: PEFT's LoRA for grouped convolutions is not a per-group delta"
        if any(d != 1 for d in layer.dilation):
            return f"dilation={layer.dilation}: PEFT's lora_A has no dilation"
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r}: PEFT's lora_A pads with zeros"
    return None


def _lora_tensors(name: str, layer: LoLDULayer, e: torch.Tensor, r: int, dtype) -> Dict[str, torch.Tensor]:
    """PEFT's tensors for one layer, padded to rank ``r`` with zeros."""
    L, U = layer.L.detach().float().cpu(), layer.U.detach().float().cpu()
    e = e.detach().float().cpu()
    pad = r - layer.rank
    if isinstance(layer, LoLDUEmbedding):
        # PEFT: delta = (lora_embedding_B @ lora_embedding_A).T; ours is L diag(e) U (num x dim).
        A = torch.cat([e[:, None] * L.T, L.new_zeros(pad, L.shape[0])])
        B = torch.cat([U.T, U.new_zeros(U.shape[1], pad)], dim=1)
        keys = (f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B")
    else:
        A = torch.cat([e[:, None] * U, U.new_zeros(pad, U.shape[1])])
        B = torch.cat([L, L.new_zeros(L.shape[0], pad)], dim=1)
        if isinstance(layer, LoLDUConv2d):  # lora_A: a conv like the base's, lora_B: 1x1
            A, B = A.view(r, *layer.weight.shape[1:]), B.view(*B.shape, 1, 1)
        keys = (f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight")
    return {keys[0]: A.to(dtype).contiguous(), keys[1]: B.to(dtype).contiguous()}


def _target_modules(model: nn.Module, names):
    """The layer names as PEFT matches them (suffix match); a full-match regex where a name would also match
    another module of the model."""
    others = [n for n, _ in model.named_modules() if n and n not in names]
    if any(o.endswith("." + n) for o in others for n in names):
        return "(" + "|".join(re.escape(n) for n in names) + ")"
    return list(names)


def export_lora(model: nn.Module, directory, adapter_name: Optional[str] = None,
                dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write an adapter of ``model`` as a standard PEFT LoRA adapter in ``directory``; returns the directory.

    ``adapter_config.json`` (peft_type LORA, r, lora_alpha = r, target_modules, base_model_name_or_path when the
    model knows it) and ``adapter_model.safetensors`` with PEFT's keys
    (``base_model.model.<layer>.lora_A.weight`` / ``lora_B.weight``; ``lora_embedding_A`` / ``lora_embedding_B``
    for embeddings). ``peft.PeftModel.from_pretrained(base, directory)`` then computes what the LoLDU model
    computes, and so does any server that loads LoRA adapters. adapter_name=None exports the trainable adapter,
    a name that adapter (of the layers that have it). Layers PEFT's LoRA cannot express exactly (grouped or
    dilated convolutions, non-zero padding modes) are refused by name, before anything is written.

    The file is as large as a rank-r LoRA (r x (in + out) values a layer), not r + 1 values as LoLDU's own.
    A folder that holds another kind of adapter (a LoLDU adapter of either format, say) is refused unless
    ``overwrite=True``; a LoRA adapter there is replaced.
    """
    where = "export_lora"
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{where}: dtype must be a floating torch.dtype, got {dtype!r}")
    layers = adapter_layers(model, adapter_name, where)
    refused = {name: why for name, layer in layers if (why := _why_not_exportable(layer))}
    if refused:
        reasons = "; ".join(f"{name!r}: {why}" for name, why in refused.items())
        raise ValueError(f"{where}: PEFT's LoRA cannot express these layers exactly: {reasons}. Nothing was "
                         f"written")
    r = max(layer.rank for _, layer in layers)
    tensors = {}
    for name, layer in layers:
        d, s = layer.adapter_values(layer.active_adapter if adapter_name is None else adapter_name)
        e = layer.delta_diagonal_of(d.detach(), s.detach())
        if not torch.isfinite(e).all():
            raise ValueError(f"{where}: layer {name!r} has non-finite adapter values; nothing was written")
        tensors.update(_lora_tensors(name, layer, e, r, dtype))
    names = [name for name, _ in layers]
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": source or None,
        "r": r,
        "lora_alpha": r,  # scaling lora_alpha / r = 1: B A is the delta itself
        "target_modules": _target_modules(loldu_root(model), names),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    refuse_other_adapter(directory, ("lora",), where, overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / LORA_WEIGHTS_NAME, save_safetensors(tensors, metadata={"format": "pt"}))
    atomic_write(directory / LORA_CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return directory
