"""The base layer types LoLDU stands in for, and the LoLDU layer for each (quantized bases included)."""
from __future__ import annotations

from typing import Dict, Optional

import torch.nn as nn

from ..factors.quantized_bases import quantized_kind
from .base import LoLDULayer
from .conv_embedding import LoLDUConv2d, LoLDUEmbedding
from .linear import LoLDULinear
from .quantized import LoLDUQuantizedLinear

# The base layer type each LoLDU layer stands in for.
LOLDU_LAYERS: Dict[type, type] = {cls.base_class: cls for cls in (LoLDULinear, LoLDUConv2d, LoLDUEmbedding)}
BASE_TYPE_NAMES = tuple(base.__name__ for base in LOLDU_LAYERS)


def base_type(module: nn.Module) -> Optional[type]:
    """The supported base layer type ``module`` is (nn.Linear, nn.Conv2d, nn.Embedding), or None."""
    if isinstance(module, LoLDULayer):
        return module.base_class
    return next((base for base in LOLDU_LAYERS if isinstance(module, base)), None)


def layer_class(module: nn.Module) -> type:
    """The LoLDU layer that stands in for ``module`` (a supported base type): LoLDUQuantizedLinear for a base
    that bitsandbytes or torchao quantized, else the one of its base type."""
    if quantized_kind(module) is not None:
        return LoLDUQuantizedLinear
    return LOLDU_LAYERS[base_type(module)]
