"""The base layer types LoLDU stands in for, and the LoLDU layer for each."""
from __future__ import annotations

from typing import Dict, Optional

import torch.nn as nn

from .base import LoLDULayer
from .conv_embedding import LoLDUConv2d, LoLDUEmbedding
from .linear import LoLDULinear

# The base layer type each LoLDU layer stands in for.
LOLDU_LAYERS: Dict[type, type] = {cls.base_class: cls for cls in (LoLDULinear, LoLDUConv2d, LoLDUEmbedding)}
BASE_TYPE_NAMES = tuple(base.__name__ for base in LOLDU_LAYERS)


def base_type(module: nn.Module) -> Optional[type]:
    """The supported base layer type ``module`` is (nn.Linear, nn.Conv2d, nn.Embedding), or None."""
    if isinstance(module, LoLDULayer):
        return module.base_class
    return next((base for base in LOLDU_LAYERS if isinstance(module, base)), None)
