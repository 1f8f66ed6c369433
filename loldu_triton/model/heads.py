"""modules_to_save: which modules of a model train in full next to the adapter (SavedModule), and their part in
the model-wide verbs (switching adapters, deleting one, merging and removing)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch.nn as nn

from ..layers.base import LoLDULayer
from ..layers.saved import SavedModule
from .targeting import loldu_root, name_matches, replace_module

# The heads PEFT trains for task_type="SEQ_CLS" when present (Hugging Face's classifier names).
SEQ_CLS_HEADS = ("classifier", "score")


def saved_modules(model: nn.Module) -> List[Tuple[str, SavedModule]]:
    return [(name, m) for name, m in loldu_root(model).named_modules() if isinstance(m, SavedModule)]


def saved_names(model: nn.Module, modules_to_save, task_type, where: str) -> List[str]:
    """The names of the modules to wrap: each entry of ``modules_to_save`` (suffix match) must pick one; with
    task_type "SEQ_CLS", the classifier heads that exist are added. Never a LoLDU layer, never inside another."""
    modules = dict(model.named_modules())
    wanted: List[str] = []
    entries = [(n, True) for n in modules_to_save or ()]
    if task_type == "SEQ_CLS":
        entries += [(n, False) for n in SEQ_CLS_HEADS if n not in (modules_to_save or ())]
    for entry, required in entries:
        hits = [n for n, m in modules.items() if n and name_matches(n, [entry])
                and not isinstance(m, SavedModule) and ".modules_to_save." not in f".{n}."
                and ".original_module" not in f".{n}."]
        if not hits and required and not any(name_matches(n, [entry]) for n, _ in saved_modules(model)):
            raise ValueError(f"{where}: modules_to_save entry {entry!r} matches no module of the model")
        wanted += [n for n in hits if n not in wanted]
    for name in wanted:
        if isinstance(modules[name], LoLDULayer) or any(isinstance(m, LoLDULayer) for m in modules[name].modules()):
            raise ValueError(f"{where}: {name!r} is in modules_to_save but has LoLDU layers; a module either "
                             f"trains in full or gets LoLDU (leave it out of target_modules)")
    nested = [n for n in wanted if any(n.startswith(other + ".") for other in wanted)]
    if nested:
        raise ValueError(f"{where}: modules_to_save {nested} lie inside other modules_to_save")
    return wanted


def wrap_saved(model: nn.Module, names: Sequence[str], adapter_name: str) -> List[Tuple[nn.Module, nn.Module]]:
    """(module, its SavedModule) for each name, built but not yet put in place (see replace_module)."""
    return [(model.get_submodule(n), SavedModule(model.get_submodule(n), adapter_name)) for n in names]


def install_saved(model: nn.Module, built) -> None:
    for module, wrapper in built:
        replace_module(model, module, wrapper)


def activate_saved(model: nn.Module, adapter_name: str) -> None:
    for _, module in saved_modules(model):
        module.activate(adapter_name)


def delete_saved(model: nn.Module, adapter_name: str) -> None:
    for _, module in saved_modules(model):
        if adapter_name in module.modules_to_save:
            del module.modules_to_save[adapter_name]


def unwrap_saved(model: nn.Module, trained: bool) -> None:
    """Plain modules back in place: the trainable adapter's copy (``trained``, as merging keeps the fine-tune)
    or the untouched original (as removing LoLDU gives the base back)."""
    for _, module in saved_modules(model):
        keep = module.running_module() if trained else module.original_module
        replace_module(model, module, keep)
