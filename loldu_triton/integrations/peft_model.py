"""LoLDUModel: PEFT's PeftModel habits around a model with LoLDU (get_loldu_model returns one).

Forward, ``generate`` and every attribute reach the wrapped model unchanged; the methods are PEFT's, with PEFT's
meaning. Saving never loses the fine-tune: ``save_pretrained`` (the wrapper's, and the wrapped Hugging Face
model's own) writes the adapter file (d, s and modules_to_save), or the merged model when asked; a
``Trainer``, which saves a model that is not its own kind as a state dict, finds the adapter's settings in it
(``get_extra_state``): the wrapper's state dict is the adapter (what trains) and its settings, so a
Trainer's checkpoints are small, resume, and ``LoLDUModel.from_pretrained`` reads them back."""
from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path
from typing import Dict, Iterator, Optional, Union

import torch
import torch.nn as nn

from ..core.config import LoLDUConfig
from ..core.fileformat import ADAPTER_NAME
from ..core.settings import check_adapter_name, exact_names
from ..files.adapters import load_loldu, save_loldu
from ..model.adapt import add_loldu, mark_only_loldu_as_trainable, print_trainable_parameters
from ..model.heads import saved_modules
from ..model.manage import (delete_adapter, disable_loldu, get_active_adapter, merge_loldu, remove_loldu,
                            set_adapter, unmerge_loldu)
from ..model.targeting import list_adapters, loldu_layers
from .peft_state import STATE_FORMAT, keep_adapter_only, layer_settings, merged_state_dict, read_extra_state

TRAINER_WEIGHTS = "model.safetensors"  # what transformers.Trainer writes for a model that is not its own kind
_CLASSES: Dict[type, type] = {}


def wrapper_class(model_class: type) -> type:
    """LoLDUModel with the forward signature of ``model_class`` (a Trainer reads the label and input names
    from it); one class per wrapped class."""
    cls = _CLASSES.get(model_class)
    if cls is None:
        def forward(self, *args, **kwargs):
            return self.base_model(*args, **kwargs)

        forward.__signature__ = inspect.signature(model_class.forward)
        forward.__doc__ = model_class.forward.__doc__
        cls = type("LoLDUModel", (LoLDUModel,), {"forward": forward, "__module__": __name__,
                                                "__qualname__": "LoLDUModel"})
        cls = _CLASSES.setdefault(model_class, cls)  # (two threads: both get the first one stored)
    return cls


def rebuild(model_class: type) -> "LoLDUModel":
    """Unpickling: an empty wrapper of the right class, whose state pickle then restores."""
    return nn.Module.__new__(wrapper_class(model_class))


class LoLDUModel(nn.Module):
    """A model with LoLDU, with PEFT's PeftModel methods. Build it with ``get_loldu_model(model, config)`` or
    ``LoLDUModel.from_pretrained(model, directory)``. The library's functions take it too, and name layers as
    in the wrapped model."""

    is_loldu_wrapper = True

    def __new__(cls, model=None, *args, **kwargs):
        if cls is LoLDUModel and isinstance(model, nn.Module):
            cls = wrapper_class(type(model))
        return super().__new__(cls)

    def __init__(self, model: nn.Module, config: Optional[LoLDUConfig], adapter_name: str = "default"):
        super().__init__()
        if isinstance(model, LoLDUModel):
            raise ValueError("LoLDUModel: the model is already a LoLDUModel")
        self.base_model = model
        check_adapter_name(adapter_name, "LoLDUModel")
        self.peft_config = {} if config is None else {adapter_name: config}
        self.register_state_dict_post_hook(keep_adapter_only)
        if callable(getattr(type(model), "save_pretrained", None)):
            # The wrapped model's own save_pretrained would write the base with d and s as unexpected keys,
            # which from_pretrained drops: it saves what this wrapper saves.
            model.__dict__["save_pretrained"] = self.save_pretrained

    def __reduce_ex__(self, protocol):
        return rebuild, (type(self.base_model),), self.__getstate__()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("base_model", "peft_config"):
                raise
            return getattr(self.base_model, name)

    # --- PEFT's methods ---------------------------------------------------------------------------------------

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its LoLDU layers)."""
        return self.base_model

    @property
    def active_adapter(self) -> str:
        """The trainable adapter's name."""
        return get_active_adapter(self.base_model)

    @property
    def active_adapters(self):
        """[active_adapter], as PEFT's list."""
        return [self.active_adapter]

    def get_nb_trainable_parameters(self):
        """(trainable, all) parameter counts."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """Prints the trainable and all parameter counts, as PEFT's."""
        print_trainable_parameters(self)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the trainable adapter (see set_adapter)."""
        set_adapter(self.base_model, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop the named adapter ``adapter_name`` (see delete_adapter)."""
        delete_adapter(self.base_model, adapter_name)
        self.peft_config.pop(adapter_name, None)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Runs the base model inside the block (modules_to_save their original module)."""
        with disable_loldu(self.base_model):
            yield

    def merge_adapter(self) -> None:
        """Merge for serving, reversibly (merge_loldu(model, reversible=True))."""
        merge_loldu(self.base_model, reversible=True)

    def unmerge_adapter(self) -> None:
        """Undo merge_adapter: the base weights back, bit for bit."""
        unmerge_loldu(self.base_model)

    def merge_and_unload(self) -> nn.Module:
        """The plain model with W0 + delta in each adapted layer and the trained modules_to_save."""
        return self._unwrapped(merge_loldu(self.base_model))

    def unload(self) -> nn.Module:
        """The plain base model, bit for bit (modules_to_save their original module)."""
        return self._unwrapped(remove_loldu(self.base_model))

    def _unwrapped(self, model: nn.Module) -> nn.Module:
        model.__dict__.pop("save_pretrained", None)
        return model

    def load_adapter(self, model_id, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """Load an adapter directory (save_pretrained's) as ``adapter_name``: into the trainable adapter when that
        is its name (frozen unless ``is_trainable``), else as a named, frozen adapter."""
        check_adapter_name(adapter_name, "load_adapter")
        trainable = adapter_name == self.active_adapter
        before = {name for name, _ in loldu_layers(self)}
        load_loldu(self.base_model, model_id, adapter_name=None if trainable else adapter_name)
        if not trainable:  # layers it added start the trainable adapter at init: that adapter trains what it did
            for name, layer in loldu_layers(self):
                if name not in before:
                    layer.d.requires_grad_(False)
                    layer.s.requires_grad_(False)
        config = adapter_config(model_id)
        if config is not None:
            self.peft_config[adapter_name] = config
        if trainable:
            for param in mark_only_loldu_as_trainable(self.base_model).parameters():
                param.requires_grad_(param.requires_grad and is_trainable)

    def save_pretrained(self, save_directory, selected_adapters=None, merged: bool = False,
                        is_main_process: bool = True, overwrite: bool = False, state_dict=None,
                        safe_serialization: bool = True, **others) -> None:
        """Write the trainable adapter (and each of ``selected_adapters``, into a subfolder of its name) as this
        library's adapter file, modules_to_save included; ``merged=True`` writes the merged model instead, with
        the wrapped Hugging Face model's own save_pretrained (W0 + delta in each layer, a plain checkpoint that
        ``from_pretrained`` of the model class reads). A ``state_dict`` (a Trainer passes one) is not used: the
        adapter is read from the model; the file is safetensors either way. Other arguments of transformers'
        save_pretrained (push_to_hub, ...) are refused rather than dropped."""
        save = getattr(type(self.base_model), "save_pretrained", None)
        if not loldu_layers(self) and save is not None:  # merged for good or removed: a plain model now
            return save(self.base_model, save_directory, is_main_process=is_main_process, state_dict=state_dict,
                        **others)
        if others:
            raise TypeError(f"save_pretrained: {sorted(others)} are not supported by LoLDUModel.save_pretrained")
        if not is_main_process:
            return
        directory = Path(save_directory)
        if merged:
            if save is None:
                raise ValueError(f"save_pretrained(merged=True): the wrapped {type(self.base_model).__name__} has no "
                                 f"save_pretrained; use merge_and_unload() and torch.save")
            save(self.base_model, directory, state_dict=merged_state_dict(self.base_model))
            return
        named = [n for n in selected_adapters or () if n != self.active_adapter]
        unknown = sorted(set(named) - set(list_adapters(self)))
        if unknown:  # before anything is written
            raise ValueError(f"save_pretrained: no adapters {unknown}; the model has {list_adapters(self)}")
        save_loldu(self.base_model, directory, overwrite=overwrite)
        for name in named:
            save_loldu(self.base_model, directory / name, adapter_name=name, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default",
                        is_trainable: bool = False) -> "LoLDUModel":
        """``model`` (a plain base) with the adapter in ``model_id``: a folder of save_pretrained's, or a
        Trainer's output (its model.safetensors), as the trainable adapter ``adapter_name``. Frozen and in eval
        mode unless ``is_trainable``."""
        check_adapter_name(adapter_name, "LoLDUModel.from_pretrained")
        directory = Path(model_id)
        if not (directory / ADAPTER_NAME).exists() and (directory / TRAINER_WEIGHTS).exists():
            if adapter_name != "default":
                raise ValueError(f"LoLDUModel.from_pretrained: {directory} is a Trainer's state dict, which loads "
                                 f"as the adapters it holds; load it with adapter_name='default'")
            wrapped = from_trainer_weights(model, directory / TRAINER_WEIGHTS)
        elif adapter_name == "default":
            wrapped = LoLDUModel(load_loldu(model, directory), adapter_config(directory), adapter_name)
        else:  # the layers' trainable adapter is "default" until set_adapter names it
            load_loldu(model, directory, adapter_name=adapter_name)
            delete_adapter(set_adapter(model, adapter_name), "default")
            wrapped = LoLDUModel(model, adapter_config(directory), adapter_name)
        config = wrapped.peft_config.get(adapter_name)
        for _, layer in loldu_layers(model):
            if config is not None and layer.input_dropout:  # (a training setting: acts only in training mode)
                layer.dropout = config.dropout
        mark_only_loldu_as_trainable(model)
        if not is_trainable:
            model.requires_grad_(False)
            wrapped.eval()
        return wrapped

    # --- state dicts: what trains, with the settings (a Trainer's checkpoints) --------------------------------

    def adapter_state_keys(self) -> set:
        """The keys of ``state_dict()``: d and s of each layer, each modules_to_save copy, the settings."""
        keys = {"_extra_state"}
        for name, _ in loldu_layers(self):
            keys |= {f"base_model.{name}.d", f"base_model.{name}.s"}
        for name, module in saved_modules(self):
            keys |= {f"base_model.{name}.modules_to_save.{k}" for k in module.modules_to_save.state_dict()}
        return keys

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, for ``state_dict()``'s keys: the adapter's must all be there under ``strict``; the
        frozen base's may be (a full state dict loads too). The settings must be this model's."""
        missing = sorted(self.adapter_state_keys() - set(state_dict))
        if strict and missing:
            raise RuntimeError(f"LoLDUModel.load_state_dict: the state dict lacks {missing}; nothing was loaded")
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict and result.unexpected_keys:
            raise RuntimeError(f"LoLDUModel.load_state_dict: unexpected keys {result.unexpected_keys}")
        return type(result)(missing, result.unexpected_keys)

    def get_extra_state(self) -> torch.Tensor:
        """The settings and pivot rows (the base's fingerprint) of each layer, as bytes: a Trainer's safetensors
        file holds only tensors, and this is what rebuilds the layers (LoLDUModel.from_pretrained)."""
        layers = loldu_layers(self)
        active = self.active_adapter if layers else "default"  # (merged for good or removed: no layer left)
        text = json.dumps({"format": STATE_FORMAT, "active_adapter": active,
                           "peft_config": {k: v.to_dict() for k, v in self.peft_config.items()},
                           "layers": {name: {"settings": layer_settings(layer), "pivots": layer.pivots.tolist()}
                                      for name, layer in layers},
                           "modules_to_save": [name for name, _ in saved_modules(self)]})
        return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """Loading a state dict: each layer's settings and base (pivot rows) must be this model's, or the values
        would load into layers of other meaning."""
        saved = read_extra_state(state, "LoLDUModel.load_state_dict")
        mine = {name: layer for name, layer in loldu_layers(self)}
        if set(saved["layers"]) != set(mine):
            raise ValueError(f"LoLDUModel.load_state_dict: the state dict has LoLDU layers {sorted(saved['layers'])}, "
                             f"this model {sorted(mine)}")
        for name, layer in mine.items():
            theirs = saved["layers"][name]
            if theirs["settings"] != layer_settings(layer):
                raise ValueError(f"LoLDUModel.load_state_dict: layer {name!r} has settings {layer_settings(layer)}, "
                                 f"the state dict {theirs['settings']}")
            if theirs["pivots"] != layer.pivots.tolist():
                raise ValueError(f"LoLDUModel.load_state_dict: layer {name!r} has a different base weight than the "
                                 f"state dict was trained on (its LU pivots differ)")


def from_trainer_weights(model: nn.Module, path: Path) -> LoLDUModel:
    """A LoLDUModel from a Trainer's safetensors state dict of one (d, s, modules_to_save, the settings)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    if "_extra_state" not in state:
        raise ValueError(f"LoLDUModel.from_pretrained: {path} holds no LoLDU adapter (neither {ADAPTER_NAME} nor a "
                         f"Trainer's state dict of a LoLDUModel)")
    settings = read_extra_state(state["_extra_state"], f"LoLDUModel.from_pretrained: {path}")
    configs = {k: LoLDUConfig.from_dict(v) for k, v in settings["peft_config"].items()}
    groups: Dict[str, list] = {}  # layers of the same settings, added in one call each
    for name, layer in settings["layers"].items():
        groups.setdefault(json.dumps(layer["settings"], sort_keys=True), []).append(name)
    heads = settings["modules_to_save"] or None
    with contextlib.ExitStack() as undo:
        undo.callback(model.__dict__.pop, "save_pretrained", None)  # a refusal leaves the model as it was given
        undo.callback(remove_loldu, model)
        for key, names in groups.items():
            add_loldu(model, LoLDUConfig(**json.loads(key), target_modules=exact_names(names),
                                         modules_to_save=heads))
            heads = None
        wrapped = LoLDUModel(model, None, settings["active_adapter"])
        wrapped.peft_config = configs
        wrapped.load_state_dict(state, strict=True)  # (the base's weights stay the given model's)
        undo.pop_all()
    return wrapped


def adapter_config(directory) -> Optional[LoLDUConfig]:
    """The LoLDUConfig stored with an adapter; None for a file whose layers have different settings."""
    try:
        return LoLDUConfig.from_pretrained(directory)
    except ValueError:
        return None


def get_loldu_model(model: nn.Module, config: Union[LoLDUConfig, dict], progress: Optional[bool] = None) -> LoLDUModel:
    """PEFT's get_peft_model: add LoLDU as ``config`` (a LoLDUConfig, or a dict of its fields, PEFT's names
    included) says, freeze everything but the adapter (d, s and modules_to_save; all of it with
    inference_mode=True), and return a LoLDUModel around the model (changed in place). If adding fails, nothing
    is changed, requires_grad included. ``progress``: as add_loldu's."""
    if isinstance(config, dict):
        config = LoLDUConfig.from_dict(config, "get_loldu_model")
    if not isinstance(config, LoLDUConfig):
        raise TypeError(f"get_loldu_model: config must be a LoLDUConfig or a dict, got {type(config).__name__}")
    if isinstance(model, LoLDUModel):
        raise ValueError("get_loldu_model: the model is already a LoLDUModel; add another adapter with "
                         "load_adapter")
    present = [name for name, _ in loldu_layers(model)]
    if present:
        raise ValueError(f"get_loldu_model: the model already has LoLDU layers {present}, whose settings the config "
                         f"would not describe; remove_loldu(model) first, or wrap it as it is with "
                         f"LoLDUModel(model, None)")
    add_loldu(model, config, progress=progress)
    mark_only_loldu_as_trainable(model)
    if config.inference_mode:
        model.requires_grad_(False)
    return LoLDUModel(model, config, get_active_adapter(model))
