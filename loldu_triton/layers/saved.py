"""SavedModule: a module named in modules_to_save (a classifier head, say), trained in full next to the adapter.

As PEFT's ModulesToSaveWrapper: the original module stays untouched; each adapter has its own trainable copy, and
the wrapper runs the copy of the trainable adapter (the original while LoLDU is disabled, or when the trainable
adapter has no copy)."""
from __future__ import annotations

import copy
from typing import Optional

import torch.nn as nn

from ..core.settings import check_adapter_name


class SavedModule(nn.Module):
    """Runs ``modules_to_save[active_adapter]``, or ``original_module`` when disabled or when that adapter has no
    copy. Attributes it does not have (``out_features``, ``weight``, ...) are the running module's."""

    def __init__(self, original_module: nn.Module, adapter_name: str = "default", with_copy: bool = True):
        super().__init__()
        if isinstance(original_module, SavedModule):
            raise ValueError("SavedModule: the module is already saved with the adapter")
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = check_adapter_name(adapter_name, "SavedModule")
        self.loldu_enabled = True
        if with_copy:  # (False: a named adapter's head loaded next to a trainable adapter that has none)
            self.add_copy(adapter_name)

    def add_copy(self, adapter_name: str, source: Optional[nn.Module] = None) -> nn.Module:
        """A new copy for ``adapter_name`` (of ``source``, else of the original module); trainable when it is
        the trainable adapter's, frozen otherwise."""
        check_adapter_name(adapter_name, "SavedModule")
        new = copy.deepcopy(self.original_module if source is None else source)
        new.requires_grad_(adapter_name == self.active_adapter)
        self.modules_to_save[adapter_name] = new
        return new

    def running_module(self) -> nn.Module:
        if self.loldu_enabled and self.active_adapter in self.modules_to_save:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    def activate(self, adapter_name: str) -> None:
        """Make ``adapter_name``'s copy the one that runs and trains (a copy of the original when it has none)."""
        if adapter_name not in self.modules_to_save:
            self.add_copy(adapter_name)
        self.active_adapter = adapter_name
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name)

    def forward(self, *args, **kwargs):
        return self.running_module()(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("original_module", "modules_to_save", "active_adapter",
                                                 "loldu_enabled"):
                raise  # (also while copying or unpickling, before these exist)
            return getattr(self.running_module(), name)
