"""loldu-triton: LoLDU parameter-efficient fine-tuning with fused Triton kernels and a PyTorch path.

The public names are those of ``__all__`` (the README's API table lists the same). The package is built in
layers whose imports run one way, bottom to top (docs/ARCHITECTURE.md): core (settings, formulas, the file
format), factors (LU factors, fingerprints, planner, quantization), kernels, ops (the autograd Function and the
functional API), layers, model (adding and managing adapters), files (saving, loading, LoRA export) and
integrations; the tools (CLI, demo, benchmarks, compile-check) are never imported by the library.
"""
from ._version import __version__
from .core.config import LoLDUConfig
from .core.settings import RankClampWarning
from .factors.factorize import ldu_factors
from .files.adapters import load_loldu, save_loldu
from .files.lora_export import export_lora
from .layers.base import LoLDULayer
from .layers.conv_embedding import LoLDUConv2d, LoLDUEmbedding
from .layers.linear import LoLDULinear
from .layers.parametrization import LoLDUParametrization
from .integrations.peft_model import LoLDUModel, get_loldu_model
from .model.adapt import (add_loldu, get_loldu_params, get_loldu_state_dict, mark_only_loldu_as_trainable,
                          print_trainable_parameters)
from .layers.quantized import LoLDUQuantizedLinear
from .model.manage import (adapter_batch, delete_adapter, disable_loldu, enable_loldu, get_active_adapter,
                           merge_loldu, remove_loldu, set_adapter, unmerge_loldu)
from .model.targeting import list_adapters, loldu_layers
from .ops.functional import loldu_linear, loldu_merged_weight

__all__ = [
    "__version__",
    # the reference code's names (minloldu)
    "LoLDUParametrization",
    "add_loldu",
    "get_loldu_params",
    "get_loldu_state_dict",
    "merge_loldu",
    "remove_loldu",
    "disable_loldu",
    "enable_loldu",
    # PEFT-style settings and model functions
    "LoLDUConfig",
    "RankClampWarning",
    "get_loldu_model",
    "LoLDUModel",
    "mark_only_loldu_as_trainable",
    "print_trainable_parameters",
    "loldu_layers",
    "unmerge_loldu",
    "list_adapters",
    "get_active_adapter",
    "set_adapter",
    "delete_adapter",
    "adapter_batch",
    # adapter files
    "save_loldu",
    "load_loldu",
    "export_lora",
    "LoLDUCheckpointCallback",
    # layers and the functional form
    "LoLDULayer",
    "LoLDULinear",
    "LoLDUConv2d",
    "LoLDUEmbedding",
    "LoLDUQuantizedLinear",
    "loldu_linear",
    "loldu_merged_weight",
    "ldu_factors",
]


def __getattr__(name):
    # LoLDUCheckpointCallback subclasses transformers.TrainerCallback: imported on first use only, so the
    # package itself never needs transformers.
    if name == "LoLDUCheckpointCallback":
        from .integrations.trainer import LoLDUCheckpointCallback

        return LoLDUCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
