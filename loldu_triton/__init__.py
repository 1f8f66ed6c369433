"""loldu-triton: LoLDU parameter-efficient fine-tuning with fused Triton kernels and a PyTorch path."""
from ._version import __version__
from .adapters import load_loldu, save_loldu
from .api import (
    LoLDUParametrization,
    adapter_batch,
    add_loldu,
    base_type,
    disable_loldu,
    enable_loldu,
    get_loldu_params,
    get_loldu_state_dict,
    loldu_layers,
    merge_loldu,
    print_trainable_parameters,
    remove_loldu,
)
from .config import INITS
from .factorize import LDUFactors, ldu_factors
from .functional import loldu_linear, loldu_merge
from .layer import LOLDU_LAYERS, LoLDUConv2d, LoLDUEmbedding, LoLDULayer, LoLDULinear

__all__ = [
    "__version__",
    "INITS",
    "LDUFactors",
    "LOLDU_LAYERS",
    "LoLDUConv2d",
    "LoLDUEmbedding",
    "LoLDULayer",
    "LoLDULinear",
    "LoLDUParametrization",
    "adapter_batch",
    "add_loldu",
    "base_type",
    "disable_loldu",
    "enable_loldu",
    "get_loldu_params",
    "get_loldu_state_dict",
    "ldu_factors",
    "load_loldu",
    "loldu_layers",
    "loldu_linear",
    "loldu_merge",
    "merge_loldu",
    "print_trainable_parameters",
    "remove_loldu",
    "save_loldu",
]
