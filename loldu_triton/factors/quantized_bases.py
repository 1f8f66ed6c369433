"""Layers quantized by other libraries: bitsandbytes ``Linear4bit`` (nf4, fp4, with or without double quant)
and ``Linear8bitLt``, and ``nn.Linear`` layers whose weight torchao quantized (int8 or int4 weight-only).

This module is the one place that knows them: which kind a layer is, its logical (out, in) shape, and its
weight dequantized. It recognises them by class and module name, never importing bitsandbytes or torchao
(both optional); dequantizing calls the library that made the layer, which is then imported already.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

# The kinds (also the "precision" an adapter file records for such a base; their roundoffs are in
# core.settings.ROUNDOFF).
BNB_KINDS = ("bnb-nf4", "bnb-fp4", "bnb-int8")
TORCHAO_KINDS = ("torchao-int8", "torchao-int4")
QUANTIZED_BASE_KINDS = BNB_KINDS + TORCHAO_KINDS


def _library_classes(module: nn.Module, library: str):
    return {c.__name__ for c in type(module).__mro__ if c.__module__.split(".")[0] == library}


def _torchao_weight_kind(weight) -> Optional[str]:
    """'torchao-int8' / 'torchao-int4' for a torchao weight tensor, '' for another torchao tensor, None else."""
    cls = type(weight)
    if cls.__module__.split(".")[0] != "torchao":
        return None
    name = cls.__name__.lower()
    return "torchao-int8" if name.startswith("int8") else "torchao-int4" if name.startswith("int4") else ""


def quantized_kind(module: nn.Module) -> Optional[str]:
    """The kind of quantized base ``module`` is (one of QUANTIZED_BASE_KINDS), '' for a quantized layer LoLDU
    does not know, or None for a layer that is not quantized by bitsandbytes or torchao."""
    if not isinstance(module, nn.Module):
        return None
    bnb = _library_classes(module, "bitsandbytes")
    weight = module._parameters.get("weight") if isinstance(module, nn.Module) else None
    if "Linear4bit" in bnb:
        quant_type = getattr(weight, "quant_type", None)
        return f"bnb-{quant_type}" if quant_type in ("nf4", "fp4") else ""
    if "Linear8bitLt" in bnb:
        return "bnb-int8"
    if bnb:
        return ""
    return _torchao_weight_kind(weight) if isinstance(module, nn.Linear) else None


def logical_shape(module: nn.Module) -> Tuple[int, ...]:
    """The shape of the weight a layer multiplies by: (out, in) for a quantized base (bitsandbytes packs 4-bit
    weights into a column of bytes), the weight's own shape otherwise."""
    if quantized_kind(module) or getattr(module, "quantized_by", None):  # (or LoLDU's layer around one)
        return (int(module.out_features), int(module.in_features))
    return tuple(module.weight.shape)


def _int8_row_scales(module: nn.Module):
    """Linear8bitLt's row scales: on its weight until the first forward, which moves them to its state."""
    scales = getattr(module.weight, "SCB", None)
    return scales if scales is not None else getattr(getattr(module, "state", None), "SCB", None)


def why_not_dequantizable(module: nn.Module, kind: str) -> Optional[str]:
    """None when ``dequantized_weight`` can read this quantized base, else the reason it cannot."""
    weight = module._parameters.get("weight")
    if not kind:
        what = type(weight).__name__ if _torchao_weight_kind(weight) == "" else type(module).__name__
        return (f"it is quantized ({what}) in a way LoLDU does not read; supported: bitsandbytes Linear4bit "
                f"(nf4, fp4) and Linear8bitLt, torchao int8 and int4 weight-only")
    if weight is None:
        return "it has no weight"
    if weight.is_meta:
        return ("its quantized weight is on the meta device; load real weights before adding LoLDU (LoLDU "
                "factorizes the dequantized weight)")
    if kind in ("bnb-nf4", "bnb-fp4") and (getattr(weight, "quant_state", None) is None
                                           or not getattr(weight, "bnb_quantized", True)):
        return ("its 4-bit weight is not quantized yet (bitsandbytes quantizes it when the layer is moved to a "
                "device: .to('cpu') or .cuda()); do that first")
    if kind in ("bnb-nf4", "bnb-fp4") and getattr(weight.quant_state, "packing_format_for_cpu", False):
        return ("bitsandbytes repacked its 4-bit weight for its CPU inference kernel (a forward in eval mode "
                "without gradients, on a CPU with AVX512-BF16), and that format cannot be dequantized exactly; "
                "add LoLDU before such a forward, or reload the model")
    if kind == "bnb-int8" and (weight.dtype != torch.int8 or _int8_row_scales(module) is None):
        return ("its 8-bit weight is not quantized yet (bitsandbytes quantizes it when the layer is moved to a "
                "device: .to('cpu') or .cuda()); do that first")
    return None


def dequantized_weight(module: nn.Module, kind: str) -> torch.Tensor:
    """W0 (out x in) of a quantized base as its library dequantizes it, on the weight's device, in the dtype
    the library gives (the base's original dtype for 4-bit, float32 for 8-bit)."""
    reason = why_not_dequantizable(module, kind)
    if reason:
        raise ValueError(f"{type(module).__name__}({logical_shape(module)}): {reason}")
    weight = module.weight
    with torch.no_grad():
        if kind in ("bnb-nf4", "bnb-fp4"):
            import bitsandbytes.functional as bnb_f

            dense = bnb_f.dequantize_4bit(weight.data, weight.quant_state)
        elif kind == "bnb-int8":
            import bitsandbytes.functional as bnb_f

            dense = bnb_f.int8_vectorwise_dequant(weight.data, _int8_row_scales(module))
        else:
            dense = weight.dequantize()
    out_f, in_f = logical_shape(module)
    return dense.reshape(out_f, in_f)


def compute_dtype(module: nn.Module, kind: str) -> torch.dtype:
    """The dtype LoLDU's factors take next to a quantized base: the one the base computes in (bitsandbytes
    4-bit: its compute_dtype, else the weight's original dtype; 8-bit: its bias's, else float32; torchao: the
    weight's logical dtype)."""
    if kind in ("bnb-nf4", "bnb-fp4"):
        chosen = getattr(module, "compute_dtype", None) or getattr(module.weight.quant_state, "dtype", None)
    elif kind == "bnb-int8":
        chosen = module.bias.dtype if getattr(module, "bias", None) is not None else torch.float32
    else:
        chosen = module.weight.dtype
    return chosen if isinstance(chosen, torch.dtype) and chosen.is_floating_point else torch.float32
