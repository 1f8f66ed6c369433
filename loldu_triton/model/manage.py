"""Switching, merging and managing the adapters of a model that has LoLDU: enable/disable, merge/unmerge/remove,
named adapters (list, set, delete), and many adapters in one batch."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from ..core.settings import check_adapter_name
from ..layers.batch import COMPILED_BATCH, batch_rows_scope
from ..layers.linear import LoLDULinear
from .heads import activate_saved, delete_saved, saved_modules, unwrap_saved
from ..layers.quantized import LoLDUQuantizedLinear
from .targeting import layers_or_error, list_adapters, loldu_layers, model_float_dtype, refuse_merged, replace_module


# The state rules (README, "Guarantees"): each layer has two independent flags, enabled and merged, and its
# adapter names (the trainable one, the named ones). Every verb below is one transition of them; a verb that
# makes no sense in a state raises before changing anything.


class _Switch:
    """What disable_loldu and enable_loldu return. The call makes the change; used as a context manager, the
    block restores on exit each layer's enabled flag from before the change (also after an exception). Entered
    again (the same object in a second block), it makes its change again and restores again."""

    def __init__(self, model: nn.Module, enabled: bool):
        self.model, self.enabled = model, enabled
        self.pending = self._apply()  # the state from before the call, for the first block
        self.open = []  # one list of (layer, enabled before) per block now open

    def _apply(self):
        # (modules_to_save switch with the layers: disabled, they run their original module)
        switched = loldu_layers(self.model) + saved_modules(self.model)
        before = [(layer, layer.loldu_enabled) for _, layer in switched]
        for layer, _ in before:
            layer.loldu_enabled = self.enabled
        return before

    def __enter__(self) -> nn.Module:
        if self.pending is not None:
            before, self.pending = self.pending, None
            self._apply()
        else:
            before = self._apply()
        for layer, _ in before:
            layer.__dict__["_loldu_blocks"] = layer.__dict__.get("_loldu_blocks", 0) + 1
        self.open.append(before)
        return self.model

    def __exit__(self, *exc) -> bool:
        if not self.open:
            raise RuntimeError("disable_loldu/enable_loldu: __exit__ without a matching __enter__")
        for layer, enabled in self.open.pop():
            layer.loldu_enabled = enabled
            layer.__dict__["_loldu_blocks"] -= 1
        return False


def disable_loldu(model: nn.Module) -> _Switch:
    """Switch LoLDU off: the model computes exactly its base outputs (merged or not), until
    ``enable_loldu(model)``.

    Also a context manager, as PEFT's ``disable_adapter()``: ``with disable_loldu(model): ...`` runs the base
    model inside the block, and leaving it restores the state from before (also after an exception)."""
    return _Switch(model, False)


def enable_loldu(model: nn.Module) -> _Switch:
    """Switch LoLDU back on after disable_loldu; as a context manager, only for the block."""
    return _Switch(model, True)


def loldu_state(model: nn.Module) -> dict:
    """{layer name: (enabled, merged, trainable adapter, named adapters)}: the whole state the verbs change."""
    return {name: (layer.loldu_enabled, layer.loldu_merged, layer.active_adapter, tuple(layer.adapter_names))
            for name, layer in loldu_layers(model)}


def _unwrap(model: nn.Module, merge: bool, where: str) -> None:
    layers = loldu_layers(model)
    if any(not name for name, _ in layers):
        raise ValueError(f"{where}: the model itself is a {type(model).__name__}; use its to_base(merge=...) "
                         f"method")
    bases = [(layer, layer.to_base(merge)) for _, layer in layers]  # every one built before any is swapped
    dtype = model_float_dtype(model) if merge else None
    for layer, base in bases:
        if dtype is not None and isinstance(layer, LoLDUQuantizedLinear):  # its factors' dtype may not be the model's
            base.to(dtype)
    for layer, base in bases:
        replace_module(model, layer, base)


def remove_loldu(model: nn.Module) -> nn.Module:
    """Plain base layers holding the untouched base weights (bit for bit); every adapter, the trained one and
    the named ones, is discarded, and modules_to_save get their original module back. Returns the model
    (changed in place)."""
    _unwrap(model, merge=False, where="remove_loldu")
    unwrap_saved(model, trained=False)
    return model


def merge_loldu(model: nn.Module, reversible: bool = False) -> nn.Module:
    """Merge the trainable adapter into the weights: W0 + L diag(e) U, one plain GEMM per layer.

    reversible=False (the reference code's merge): plain layers replace the LoLDU layers; nothing of LoLDU is
    left (modules_to_save keep the trainable adapter's copy, the fine-tuned head). It refuses while layers hold named adapters, which it would drop: save them
    (``save_loldu(model, dir, adapter_name=...)``) and delete them (``delete_adapter``) first.

    reversible=True: the LoLDU layers stay, with the merged weight in ``weight`` and the base weight itself
    kept aside, for serving; ``unmerge_loldu(model)`` puts the base back bit for bit to train again. While
    merged, the adapters cannot be switched (set_adapter), loaded into or batched; disable_loldu serves the
    base, and merging leaves the enabled flag as it is. Quantized bases are refused (the merged
    weight would be a full-precision copy next to them). All layers or none are merged.

    Returns the model (changed in place), so ``model = merge_loldu(model)`` works as PEFT's merge_and_unload.
    """
    where = "merge_loldu"
    if not isinstance(reversible, bool):
        raise ValueError(f"{where}: reversible must be True or False, got {reversible!r}")
    if reversible:
        layers = layers_or_error(model, where)
        quantized = [name for name, layer in layers
                     if (layer.base_quantization or layer.quantized_by) and not layer.loldu_merged]
        if quantized:
            raise ValueError(f"{where}: {quantized} have a quantized base; a reversible merge would keep a "
                             f"full-precision copy next to it. Serve them unmerged (the kernels dequantize in the "
                             f"GEMM), or merge for good with merge_loldu(model)")
        for _, layer in layers:
            layer.merge_weights()
        return model
    layers = loldu_layers(model)
    blocked = [name for name, layer in layers if layer.__dict__.get("_loldu_blocks", 0)]
    if blocked:
        raise ValueError(f"{where}: {blocked} are inside a `with disable_loldu/enable_loldu` block, which could not "
                         f"restore layers merged for good; merge after the block, or use "
                         f"merge_loldu(model, reversible=True)")
    disabled = [name for name, layer in layers if not layer.loldu_enabled]
    if disabled:
        raise ValueError(f"{where}: {disabled} are disabled (disable_loldu), and plain layers cannot stay so: "
                         f"enable_loldu(model) first to merge the adapter, or remove_loldu(model) for the base")
    named = {name: list(layer.adapter_names) for name, layer in layers if layer.adapter_names}
    if named:
        raise ValueError(f"{where}: layers hold named adapters that merging would drop: {named}. Save each "
                         f"(save_loldu(model, dir, adapter_name=name)) and delete it (delete_adapter(model, name)) "
                         f"first, or use merge_loldu(model, reversible=True), which keeps them")
    _unwrap(model, merge=True, where=where)
    unwrap_saved(model, trained=True)
    return model


def unmerge_loldu(model: nn.Module) -> nn.Module:
    """Undo ``merge_loldu(model, reversible=True)``: each layer gets its base weight back (the same tensor,
    bit for bit) and its LoLDU path, so training can go on. Layers that are not merged are left as they are.
    Returns the model."""
    for _, layer in layers_or_error(model, "unmerge_loldu"):
        layer.unmerge_weights()
    return model


def get_active_adapter(model: nn.Module) -> str:
    """The name of the trainable adapter (the one in d and s): "default" unless set_adapter chose another."""
    active = {layer.active_adapter for _, layer in layers_or_error(model, "get_active_adapter")}
    if len(active) != 1:
        raise ValueError(f"get_active_adapter: the layers disagree: {sorted(active)}; call set_adapter(model, name)")
    return active.pop()


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the trainable adapter of every LoLDU layer (PEFT's ``set_adapter``).

    Its values move into each layer's d and s, in place (the parameters stay the same objects: build the
    optimizer after switching, since its state belongs to the previous adapter), and the values d and s held
    are kept as a named adapter under the previous name, so nothing is lost and switching back is exact. A
    layer that the adapter does not cover starts it at init (e == 0, the base). Returns the model.
    """
    where = "set_adapter"
    check_adapter_name(adapter_name, where)
    layers = layers_or_error(model, where)
    refuse_merged(layers, where)
    known = list_adapters(model)
    if adapter_name not in known:
        raise ValueError(f"{where}: no adapter {adapter_name!r}; the model has {known}")
    for _, layer in layers:
        layer.activate_adapter(adapter_name)
    activate_saved(model, adapter_name)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Drop the named adapter ``adapter_name`` from every layer. The trainable adapter cannot be deleted:
    make another one trainable first (set_adapter). Returns the model."""
    where = "delete_adapter"
    check_adapter_name(adapter_name, where)
    layers = layers_or_error(model, where)
    active = [name for name, layer in layers if layer.active_adapter == adapter_name]
    if active:
        raise ValueError(f"{where}: {adapter_name!r} is the trainable adapter (of {active}); make another one "
                         f"trainable first (set_adapter), or remove LoLDU (remove_loldu)")
    holders = [layer for _, layer in layers if adapter_name in layer.adapter_names]
    if not holders:
        raise ValueError(f"{where}: no adapter {adapter_name!r}; the model has {list_adapters(model)}")
    for layer in holders:
        layer.delete_named_adapter(adapter_name)
    delete_saved(model, adapter_name)
    return model


@contextmanager
def adapter_batch(model: nn.Module, names: Sequence[Optional[str]]) -> Iterator[nn.Module]:
    """Run one batch in which element i (the input's first dimension) uses adapter ``names[i]``.

    A name is the trainable adapter's ("default" unless set_adapter chose another), one loaded with
    ``load_loldu(..., adapter_name=...)``, or None (the base model). Every adapter of a layer shares its L and
    U, so x U^T is computed once and only the diagonal is gathered per row. A layer an adapter does not cover runs as its base for that adapter's rows.
    Leaving the context restores the model as it was.
    """
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise ValueError(f"adapter_batch: names must be a sequence with one adapter name (or None) per batch "
                         f"element, got {type(names).__name__} {names!r}")
    names = list(names)  # (a generator is read once, here)
    layers = layers_or_error(model, "adapter_batch")
    for name, layer in layers:
        if not isinstance(layer, (LoLDULinear, LoLDUQuantizedLinear)):
            raise ValueError(f"adapter_batch: layer {name!r} is a {type(layer).__name__}; mixed-adapter batches "
                             f"support LoLDULinear and LoLDUQuantizedLinear layers only")
    refuse_merged(layers, "adapter_batch")
    heads = [name for name, _ in saved_modules(model)]
    if heads:
        raise ValueError(f"adapter_batch: the model has modules_to_save {heads}, which run one adapter's copy per "
                         f"call; run one adapter at a time (set_adapter)")
    disabled = [name for name, layer in layers if not layer.loldu_enabled]
    if disabled:
        raise ValueError(f"adapter_batch: {disabled} are disabled (disable_loldu), so every row would get the base; "
                         f"enable_loldu(model) first, or name None for the rows that want the base")
    known = {None}.union(*({layer.active_adapter, *layer.adapter_names} for _, layer in layers))
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise ValueError(f"adapter_batch: each name must be a string or None, got {bad[0]!r}")
    unknown = sorted({n for n in names if n not in known})
    if unknown:
        raise ValueError(f"adapter_batch: unknown adapters {unknown}; the model has "
                         f"{sorted(k for k in known if k is not None)}")
    rows = {layer: torch.tensor([layer.batch_table_row(n) for n in names], dtype=torch.int64,
                                device=layer.weight.device) for _, layer in layers}
    with batch_rows_scope(rows):
        try:
            yield model
        except Exception as err:
            if COMPILED_BATCH in str(err) and str(err) != COMPILED_BATCH:
                raise RuntimeError(COMPILED_BATCH) from None  # dynamo's wrapping buries our reason
            raise
