"""LoLDUConfig: the settings of a LoLDU adapter in one object, each field checked (by core.settings) when set."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from .fileformat import read_common_settings
from .settings import FIELD_CHECKS, PEFT_ALIASES, check_fields, exact_names, translate_peft_names


@dataclass
class LoLDUConfig:
    """The settings of a LoLDU adapter, as PEFT's LoraConfig gathers LoRA's.

    - rank: the number of pivots per layer (an int, or "full": each layer's min(out, in)); a rank a layer
      cannot hold is lowered to its full rank with a warning.
    - alpha: e's initial scale is alpha / rank; None means alpha = rank (scale 1, the paper's setting).
    - init: the initial diagonal, one of INITS; init_seed seeds the random ones.
    - target_modules: None (every nn.Linear), "all-linear" (all but the output layer), a list of layer names
      (suffix match; kept as a tuple) or a regex (full match); names and regexes may pick nn.Conv2d and
      nn.Embedding too.
    - base_quantization: None, "int8" or "fp8": keep each adapted nn.Linear's frozen weight quantized.
    - backend: "auto", "torch" or "triton" (a runtime choice; adapter files do not record it).
    - dropout: PEFT's lora_dropout, on the rank-r path's input only, in training mode (a float in [0, 1);
      adapter files record it with the other settings).
    - exclude_modules: layer names (suffix match) or a regex (full match) that target_modules must not take.
    - modules_to_save: modules (a classifier head, say; names match by suffix) that train in full and are saved
      with the adapter, one copy per adapter, as PEFT's. task_type="SEQ_CLS" adds "classifier" and "score".
    - task_type (PEFT's), bias ("none" only: LoLDU trains no bias) and inference_mode (get_loldu_model freezes
      the adapter too) complete PEFT's names.

    PEFT's LoraConfig names are accepted where they mean the same (``r`` for rank, ``lora_dropout`` for
    dropout); those with no LoLDU meaning (``lora_alpha``, ``use_dora``, ...) are refused with what LoLDU
    has instead. Every field is checked when set, at construction and after it: a config that exists is a
    valid one.
    """

    rank: Union[int, str] = 8
    alpha: Optional[float] = None
    init: str = "lu"
    init_seed: int = 0
    target_modules: Union[None, str, Sequence[str]] = None
    base_quantization: Optional[str] = None
    backend: str = "auto"
    dropout: float = 0.0
    exclude_modules: Union[None, str, Sequence[str]] = None
    modules_to_save: Optional[Sequence[str]] = None
    task_type: Optional[str] = None
    bias: str = "none"
    inference_mode: bool = False

    def __setattr__(self, name, value):
        name = PEFT_ALIASES.get(name, name)
        check = FIELD_CHECKS.get(name)
        if check is None:
            raise AttributeError(f"LoLDUConfig has no field {name!r}; fields: {sorted(FIELD_CHECKS)}")
        object.__setattr__(self, name, check(value, "LoLDUConfig"))

    # PEFT's names read (and set, see __setattr__) the same fields, as a PEFT script does.
    r = property(lambda self: self.rank, doc="PEFT's name for rank.")
    lora_dropout = property(lambda self: self.dropout, doc="PEFT's name for dropout.")

    def to_dict(self) -> dict:
        """The fields as plain JSON values (new lists for the name lists)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in ((name, getattr(self, name)) for name in FIELD_CHECKS)}

    @classmethod
    def from_dict(cls, data, where: str = "LoLDUConfig.from_dict") -> "LoLDUConfig":
        """A config from ``to_dict``'s output. Missing fields take their defaults; unknown fields and invalid
        values are errors that name ``where`` (a file, say) and the field."""
        return cls(**check_fields(data, where))

    @classmethod
    def from_pretrained(cls, directory) -> "LoLDUConfig":
        """The config an adapter directory (written by save_loldu) was trained with: add_loldu with it on the
        same base adapts the same layers with the same settings: target_modules is a regex that selects exactly
        the layers the file holds. The file is checked as load_loldu checks it."""
        settings, layer_names, saved_names = read_common_settings(directory)
        return cls(**{**settings, "target_modules": exact_names(layer_names), "modules_to_save": saved_names or None})


_FIELDS_INIT = LoLDUConfig.__init__


def _init_with_peft_names(self, *args, **kwargs):
    _FIELDS_INIT(self, *args, **translate_peft_names(kwargs, "LoLDUConfig"))


_init_with_peft_names.__signature__ = inspect.signature(_FIELDS_INIT)
_init_with_peft_names.__doc__ = _FIELDS_INIT.__doc__
LoLDUConfig.__init__ = _init_with_peft_names
