"""loldu-triton: LoLDU parameter-efficient fine-tuning with fused Triton kernels and a PyTorch path."""
from ._version import __version__
from .adapters import load_loldu, save_loldu
from .api import (
    LoLDUParametrization,
    adapter_batch,
    add_loldu,
    base_type,
    delete_adapter,
    disable_loldu,
    enable_loldu,
    get_active_adapter,
    get_loldu_model,
    get_loldu_params,
    get_loldu_state_dict,
    list_adapters,
    loldu_layers,
    mark_only_loldu_as_trainable,
    merge_loldu,
    print_trainable_parameters,
    remove_loldu,
    set_adapter,
    unmerge_loldu,
)
from .config import INITS, LoLDUConfig, RankClampWarning
from .factorize import LDUFactors, ldu_factors
from .functional import loldu_linear, loldu_merge
from .layer import LOLDU_LAYERS, LoLDUConv2d, LoLDUEmbedding, LoLDULayer, LoLDULinear
from .lora_export import export_lora

__all__ = [
    "__version__",
    "INITS",
    "LDUFactors",
    "LOLDU_LAYERS",
    "LoLDUConfig",
    "LoLDUConv2d",
    "LoLDUEmbedding",
    "LoLDULayer",
    "LoLDULinear",
    "LoLDUParametrization",
    "RankClampWarning",
    "adapter_batch",
    "add_loldu",
    "base_type",
    "delete_adapter",
    "disable_loldu",
    "enable_loldu",
    "export_lora",
    "get_active_adapter",
    "get_loldu_model",
    "get_loldu_params",
    "get_loldu_state_dict",
    "ldu_factors",
    "list_adapters",
    "load_loldu",
    "loldu_layers",
    "loldu_linear",
    "loldu_merge",
    "mark_only_loldu_as_trainable",
    "merge_loldu",
    "print_trainable_parameters",
    "remove_loldu",
    "save_loldu",
    "set_adapter",
    "unmerge_loldu",
]


def __getattr__(name):
    # LoLDUCheckpointCallback subclasses transformers.TrainerCallback: imported on first use only, so the
    # package itself never needs transformers.
    if name == "LoLDUCheckpointCallback":
        from .trainer import LoLDUCheckpointCallback

        return LoLDUCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
