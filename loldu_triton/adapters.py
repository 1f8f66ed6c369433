"""Adapter files: adapter_config.json (settings and a fingerprint of each base weight) and
adapter_model.safetensors (only d and s: (r + 1) float32 values per layer)."""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__
from .api import _replace, _why_not_adaptable, base_type, loldu_layers
from .layer import LOLDU_LAYERS, LoLDULayer

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "loldu-triton-adapter"
FORMAT_VERSION = 1
# A base weight whose pivots match but whose bytes differ (another dtype, rounding) is accepted, with a
# warning, when its pivot values agree to this relative tolerance (bf16 rounding is ~4e-3).
PIVOT_VALUE_RTOL = 1e-2


def _base_dtype(layer: LoLDULayer) -> str:
    dtype = str(layer.dense_weight().dtype).replace("torch.", "")
    return dtype if layer.base_quantization is None else f"{layer.base_quantization} ({dtype} compute)"


def _fingerprint(layer: LoLDULayer) -> dict:
    return {
        "pivots": layer.pivots.tolist(),
        "pivot_values": layer.pivot_values.tolist(),
        "sha256": layer.base_weight_checksum(),
        "dtype": _base_dtype(layer),
    }


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_loldu(model: nn.Module, directory) -> Path:
    """Write the model's LoLDU adapter to ``directory`` (created if needed); returns the directory."""
    layers = loldu_layers(model)
    if not layers:
        raise ValueError("save_loldu: the model has no LoLDU layer")
    if any(not name for name, _ in layers):
        raise ValueError("save_loldu: the model itself is a LoLDU layer; save a module that contains it")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {(layer.rank, layer.alpha, layer.init, layer.init_seed) for _, layer in layers}
    common = next(iter(settings)) if len(settings) == 1 else (None, None, None, None)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "rank": common[0],
        "alpha": common[1],
        "init": common[2],
        "target_modules": [name for name, _ in layers],
        "layers": {
            name: {
                "rank": layer.rank,
                "alpha": layer.alpha,
                "init": layer.init,
                "init_seed": layer.init_seed,
                "type": layer.base_class.__name__,
                "weight_shape": list(layer.weight.shape),
                "base": _fingerprint(layer),
            }
            for name, layer in layers
        },
    }
    tensors = {}
    for name, layer in layers:
        tensors[f"{name}.d"] = layer.d.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{name}.s"] = layer.s.detach().to("cpu", torch.float32).reshape(1)
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=1)))
    return directory


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"load_loldu: no adapter config at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_loldu: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"load_loldu: {path} is not a loldu-triton adapter config")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"load_loldu: {path} has format version {config['format_version']}, newer than this "
                         f"library ({__version__}) reads")
    return config


def _read_tensors(path: Path, layers: dict) -> Dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"load_loldu: no adapter weights at {path}") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"load_loldu: {path} is truncated or corrupt ({err})") from None
    expected = {f"{name}.{p}" for name in layers for p in ("d", "s")}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"load_loldu: {path} does not match its config (missing {missing}, unexpected {extra})")
    for name, spec in layers.items():
        for key, shape in ((f"{name}.d", (spec["rank"],)), (f"{name}.s", (1,))):
            t = tensors[key]
            if t.dtype != torch.float32 or tuple(t.shape) != shape:
                raise ValueError(f"load_loldu: {path}: {key} is {t.dtype} {tuple(t.shape)}, expected float32 {shape}")
            if not torch.isfinite(t).all():
                raise ValueError(f"load_loldu: {path}: {key} contains NaN or Inf")
    return tensors


def _check_base(name: str, layer: LoLDULayer, saved: dict, path: Path) -> None:
    if layer.pivots.tolist() != saved["pivots"]:
        raise ValueError(f"load_loldu: layer {name!r} has a different base weight than the adapter in {path} "
                         f"was trained on (its LU pivots differ)")
    if layer.base_weight_checksum() == saved["sha256"]:
        return
    ref = torch.tensor(saved["pivot_values"], dtype=torch.float64)
    gap = float((layer.pivot_values.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    if gap > PIVOT_VALUE_RTOL:
        raise ValueError(f"load_loldu: layer {name!r} has a different base weight than the adapter in {path} "
                         f"was trained on (pivot values differ by {gap:.2e} relative)")
    warnings.warn(f"load_loldu: layer {name!r}: base weight is not byte-identical to the one the adapter was "
                  f"trained on ({saved['dtype']} there, {_base_dtype(layer)} here; pivot values agree to "
                  f"{gap:.1e}); loading", stacklevel=3)


def load_loldu(model: nn.Module, directory, adapter_name: str = "default") -> nn.Module:
    """Load an adapter written by ``save_loldu`` into ``model`` (a plain base model, or one with LoLDU).

    Layers without LoLDU get it; every check (files, layer names and shapes, base-weight fingerprints) runs
    before anything changes, so on an error the model is left exactly as it was.

    adapter_name="default" loads into the trainable adapter (d, s). Any other name stores a frozen named
    adapter next to it, for ``adapter_batch``; named adapters share the layer's factors, so their rank, alpha
    and init must be the layer's (a layer without LoLDU gets it with the adapter's settings, at init).
    """
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"load_loldu: adapter_name must be a non-empty string, got {adapter_name!r}")
    named = adapter_name != "default"
    directory = Path(directory)
    config = _read_config(directory / CONFIG_NAME)
    layers = config["layers"]
    tensors = _read_tensors(directory / WEIGHTS_NAME, layers)

    plan = []  # (name, layer to hold the values, whether it replaces the module)
    modules = dict(model.named_modules())
    for name, spec in layers.items():
        module = modules.get(name)
        base = base_type(module) if module is not None else None
        if base is None or base.__name__ != spec["type"]:
            found = "nothing" if module is None else type(module).__name__
            raise ValueError(f"load_loldu: the adapter in {directory} has layer {name!r}, but the model has "
                             f"{found} there (an nn.{spec['type']} is needed)")
        if list(module.weight.shape) != spec["weight_shape"]:
            raise ValueError(f"load_loldu: layer {name!r} has a weight of shape {list(module.weight.shape)}, the "
                             f"adapter expects {spec['weight_shape']}")
        settings = (spec["rank"], spec["alpha"], spec["init"], spec["init_seed"])
        if named and base is not nn.Linear:
            raise ValueError(f"load_loldu: layer {name!r} is an nn.{base.__name__}; named adapters are for "
                             f"nn.Linear layers only")
        if isinstance(module, LoLDULayer) and (module.rank, module.alpha, module.init, module.init_seed) == settings:
            target, replaces = module, False
        elif named and isinstance(module, LoLDULayer):
            raise ValueError(f"load_loldu: layer {name!r} has LoLDU with (rank, alpha, init, init_seed) = "
                             f"{(module.rank, module.alpha, module.init, module.init_seed)}, adapter "
                             f"{adapter_name!r} was trained with {settings}; named adapters share the layer's "
                             f"factors and initial diagonal")
        else:
            reason = _why_not_adaptable(name, module, modules[name.rpartition(".")[0]])
            if reason:
                raise ValueError(f"load_loldu: cannot adapt {name!r}: {reason}")
            backend = getattr(module, "backend", "auto")
            target = LOLDU_LAYERS[base].from_base(module, spec["rank"], spec["alpha"], spec["init"],
                                                  spec["init_seed"], backend, name, freeze=False)
            if isinstance(module, LoLDULayer):
                target.base_requires_grad = module.base_requires_grad
            replaces = True
        _check_base(name, target, spec["base"], directory)
        plan.append((name, target, replaces))

    others = [n for n, _ in loldu_layers(model) if n not in layers]
    if others and not named:
        warnings.warn(f"load_loldu: {others} have LoLDU but are not in the adapter; left as they are", stacklevel=2)
    for name, target, replaces in plan:
        d, s = tensors[f"{name}.d"].to(target.d.device), tensors[f"{name}.s"].to(target.d.device)
        if named:
            target.set_named_adapter(adapter_name, target.scale_of(d, s))
        else:
            with torch.no_grad():
                target.d.copy_(d)
                target.s.copy_(s)
        if replaces:
            target.freeze_base()
            _replace(model, name, target)
    return model
