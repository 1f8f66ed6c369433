"""Adapter files.

One file, ``loldu_adapter.safetensors``, holds the whole adapter: per layer d and s (the r + 1 trained float32
values), the LU pivot rows (int32) and a sketch of the base weight (float64, see factorize.weight_sketch), and
in its metadata the settings as JSON and a sha256 over settings and tensor bytes. One file is replaced
atomically, so a crash or a concurrent reader sees the old adapter or the new one, never a mix.

The first format (``adapter_config.json`` + ``adapter_model.safetensors``) is still read.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import stat
import struct
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ._version import __version__
from .api import _offloaded, _refuse_merged, _replace, _why_not_adaptable, adapter_layers, base_type, loldu_layers
from .config import LoLDUConfig
from .factorize import SKETCH_PROBES
from .layer import LOLDU_LAYERS, LoLDULayer

ADAPTER_NAME = "loldu_adapter.safetensors"
LEGACY_CONFIG_NAME = "adapter_config.json"
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "loldu-triton-adapter"
FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1
# Adapter files are tiny ((2r + 1) * 4 bytes a layer): anything larger than this is not one.
MAX_FILE_BYTES = 1 << 30
# Legacy format: a base whose pivots match but whose bytes differ is accepted, with a warning, when its pivot
# values agree to this relative tolerance (bf16 rounding is ~4e-3).
PIVOT_VALUE_RTOL = 1e-2
# Unit roundoff of each precision a base can have; a sketch moves by about this much under a cast.
ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8,
            "int8": 2.0**-6, "fp8": 2.0**-4}
SKETCH_TOLERANCE = 4.0  # x (roundoff here + roundoff there): ~13 standard deviations of a cast's change
# The LoLDUConfig fields a layer's record holds, and those of the file's common config (its top level).
LAYER_FIELDS = ("rank", "alpha", "init", "init_seed", "base_quantization")
COMMON_FIELDS = LAYER_FIELDS + ("target_modules",)


def _where(path: Path, field: str = "") -> str:
    return f"load_loldu: {path}" + (f": {field}" if field else "")


def _read_regular_file(path: Path, what: str) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES, read in one go: never blocks on a FIFO, never
    streams a device, and sees one version of a file that a save replaces meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"load_loldu: no {what} at {path}") from None
    except OSError as err:
        raise ValueError(f"load_loldu: cannot open {path} ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"load_loldu: {path} is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ValueError(f"load_loldu: {path} is {info.st_size} bytes, more than an adapter file can be "
                             f"({MAX_FILE_BYTES})")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"load_loldu: {path} grew past {MAX_FILE_BYTES} bytes while being read")
    return data


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the old file stays until the new one is complete and durable."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never follows a link planted at the temporary name; 0o666 lets the umask decide the mode.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _checksum(config_text: str, tensor_bytes: bytes) -> str:
    return hashlib.sha256(config_text.encode() + b"\0" + tensor_bytes).hexdigest()


def _split(data: bytes, path: Path) -> Tuple[dict, bytes]:
    """(header, tensor bytes) of a safetensors file, with its bounds checked."""
    if len(data) < 8:
        raise ValueError(f"load_loldu: {path} is truncated or corrupt (only {len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError(f"load_loldu: {path} is truncated or corrupt (header of {header_len} bytes in a file "
                         f"of {len(data)})")
    try:
        header = json.loads(data[8:8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"load_loldu: {path} is truncated or corrupt (header: {err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"load_loldu: {path} is truncated or corrupt (header is not an object)")
    return header, data[8 + header_len:]


def _tensors(data: bytes, path: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"load_loldu: {path} is truncated or corrupt ({err})") from None


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------


def _layer_record(layer: LoLDULayer, sha256: str, precision: str) -> dict:
    """One layer's entry in the file's config: its settings (LoLDUConfig fields), type, shape and base."""
    settings = layer.loldu_settings().to_dict()
    return {**{k: settings[k] for k in LAYER_FIELDS}, "type": layer.base_class.__name__,
            "weight_shape": list(layer.weight.shape), "base": {"sha256": sha256, "precision": precision}}


def _common_config(layers) -> Optional[LoLDUConfig]:
    """The one LoLDUConfig from which add_loldu rebuilds exactly these layers, or None when there is none (the
    layers were adapted with different settings)."""
    ranks = [layer.rank for _, layer in layers]
    fulls = [min(layer.weight2d().shape) for _, layer in layers]
    top = max(ranks)
    if len(set(ranks)) > 1 and ranks == fulls:
        rank = "full"
    elif all(r == min(top, f) for r, f in zip(ranks, fulls)):
        rank = top  # each layer holds it, or was lowered to its full rank
    else:
        return None
    alphas = {layer.alpha for _, layer in layers}
    if len(alphas) == 1:
        alpha = alphas.pop()
    elif all(layer.alpha == layer.rank for _, layer in layers):
        alpha = None
    else:
        return None
    settings = {(layer.init, layer.init_seed, layer.base_quantization) for _, layer in layers}
    if len(settings) != 1:
        return None
    init, init_seed, quantization = settings.pop()
    return LoLDUConfig(rank=rank, alpha=alpha, init=init, init_seed=init_seed, base_quantization=quantization,
                       target_modules=[name for name, _ in layers])


def _serialize(tensors: Dict[str, torch.Tensor], config_text: str) -> bytes:
    """The file's bytes. The checksum covers the tensor bytes, which are the same with or without it."""
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": config_text}
    draft = save_safetensors(tensors, metadata=metadata)
    _, tensor_bytes = _split(draft, Path("<draft>"))
    metadata["checksum"] = _checksum(config_text, tensor_bytes)
    return save_safetensors(tensors, metadata=metadata)


def save_loldu(model: nn.Module, directory, adapter_name: Optional[str] = None) -> Path:
    """Write one adapter of the model to ``directory`` (created if needed); returns the directory.

    adapter_name=None saves the trainable adapter; a name saves that adapter (trainable or named) of every
    layer that has it. Either way the file loads back as it was saved: ``load_loldu(base, directory)`` makes it
    the trainable adapter, ``load_loldu(base, directory, adapter_name=name)`` a named one, with the same d and s
    bit for bit. The adapter goes into one file, replaced atomically: an interrupted save leaves the previous
    adapter as it was. Non-finite values are refused before anything is written."""
    layers = adapter_layers(model, adapter_name, "save_loldu")
    records, tensors = {}, {}
    for name, layer in layers:
        sha256, sketch, precision = layer.base_fingerprint()  # (first: refuses a base still on the meta device)
        d, s = layer.adapter_values(layer.active_adapter if adapter_name is None else adapter_name)
        d, s = d.detach().to("cpu", torch.float32), s.detach().to("cpu", torch.float32).reshape(1)
        if not (torch.isfinite(d).all() and torch.isfinite(s).all()):
            raise ValueError(f"save_loldu: layer {name!r} has non-finite adapter values (d or s holds NaN or Inf); "
                             f"nothing was written")
        records[name] = _layer_record(layer, sha256, precision)
        tensors[f"{name}.d"] = d.contiguous()
        tensors[f"{name}.s"] = s
        tensors[f"{name}.pivots"] = layer.pivots.detach().to("cpu", torch.int32)
        tensors[f"{name}.sketch"] = sketch
    common = _common_config(layers)
    # The top level is the common LoLDUConfig (rank null when the layers differ; backend is a runtime choice).
    fields = {k: v for k, v in common.to_dict().items() if k != "backend"} if common else {"rank": None}
    config = {"library_version": __version__, **fields, "layers": records}
    data = _serialize(tensors, json.dumps(config, separators=(",", ":")))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / ADAPTER_NAME, data)
    _remove_legacy(directory)
    return directory


def _remove_legacy(directory: Path) -> None:
    """Drop a first-format adapter of ours that the new file supersedes (the new file wins anyway)."""
    config = directory / LEGACY_CONFIG_NAME
    try:
        ours = json.loads(_read_regular_file(config, "config")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return  # absent, or not ours (a PEFT adapter, say): leave it
    if ours:
        for name in (LEGACY_WEIGHTS_NAME, LEGACY_CONFIG_NAME):
            try:
                os.remove(directory / name)
            except FileNotFoundError:
                pass


# --------------------------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------------------------


def _field(spec: dict, key: str, path: Path, where: str):
    if key not in spec:
        raise ValueError(f"{_where(path, where)} has no {key!r}")
    return spec[key]


def _check_layer_spec(name, spec, path: Path, legacy: bool) -> dict:
    """The settings of one layer record, each checked; errors name the file, the layer and the field."""
    where = f"layer {name!r}"
    if not isinstance(name, str) or not name:
        raise ValueError(f"{_where(path)}: layer names must be non-empty strings, got {name!r}")
    if not isinstance(spec, dict):
        raise ValueError(f"{_where(path, where)} must be an object, got {type(spec).__name__}")
    unknown = sorted(str(k) for k in spec if k not in LAYER_FIELDS + ("type", "weight_shape", "base"))
    if unknown:
        raise ValueError(f"{_where(path, where)} has unknown fields {unknown}")
    for key in ("rank", "alpha", "init", "init_seed"):  # (base_quantization came later: None when absent)
        _field(spec, key, path, where)
    settings = LoLDUConfig.from_dict({k: spec[k] for k in LAYER_FIELDS if k in spec}, _where(path, where))
    rank, alpha, init, init_seed = settings.rank, settings.alpha, settings.init, settings.init_seed
    if rank == "full" or alpha is None:
        raise ValueError(f"{_where(path, where)}: a layer's rank must be an int and its alpha a number, got "
                         f"rank {rank!r}, alpha {alpha!r}")
    kind = _field(spec, "type", path, where)
    if kind not in {base.__name__ for base in LOLDU_LAYERS}:
        raise ValueError(f"{_where(path, where)}: type must be one of {sorted(b.__name__ for b in LOLDU_LAYERS)}, "
                         f"got {kind!r}")
    shape = _field(spec, "weight_shape", path, where)
    if (not isinstance(shape, list) or len(shape) < 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise ValueError(f"{_where(path, where)}: weight_shape must be a list of positive ints, got {shape!r}")
    base = _field(spec, "base", path, where)
    if not isinstance(base, dict) or not isinstance(base.get("sha256"), str):
        raise ValueError(f"{_where(path, where)}: base must be an object with a 'sha256' string")
    if legacy:
        pivots, values = base.get("pivots"), base.get("pivot_values")
        if (not isinstance(pivots, list) or not isinstance(values, list) or len(pivots) != rank
                or len(values) != rank or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in values)):
            raise ValueError(f"{_where(path, where)}: base must hold {rank} pivots and {rank} finite pivot_values")
    elif base.get("precision") not in ROUNDOFF:
        raise ValueError(f"{_where(path, where)}: base precision must be one of {sorted(ROUNDOFF)}, "
                         f"got {base.get('precision')!r}")
    return {"rank": rank, "alpha": alpha, "init": init, "init_seed": init_seed,
            "base_quantization": settings.base_quantization, "type": kind, "weight_shape": shape, "base": base}


def _check_common(config: dict, path: Path) -> Optional[LoLDUConfig]:
    """The file's common LoLDUConfig (its top level), checked; None where the layers' settings differ."""
    if config.get("rank") is None:
        return None
    return LoLDUConfig.from_dict({k: config[k] for k in COMMON_FIELDS if k in config}, _where(path, "config"))


def _check_layers(config, path: Path, legacy: bool) -> Dict[str, dict]:
    if not isinstance(config, dict):
        raise ValueError(f"{_where(path)}: the adapter config must be a JSON object")
    layers = config.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{_where(path)}: 'layers' must be an object of layer name -> record, got "
                         f"{type(layers).__name__}")
    if not layers:
        raise ValueError(f"{_where(path)}: the adapter has no layers")
    return {name: _check_layer_spec(name, spec, path, legacy) for name, spec in layers.items()}


def _pivots(tensor: torch.Tensor, spec: dict, key: str, path: Path) -> list:
    rows = spec["weight_shape"][0]
    pivots = tensor.tolist()
    if len(set(pivots)) != len(pivots) or not all(0 <= p < rows for p in pivots):
        raise ValueError(f"{_where(path, key)} must be {len(pivots)} distinct rows in [0, {rows})")
    return pivots


def _check_tensors(tensors, layers: Dict[str, dict], path: Path, legacy: bool) -> None:
    fields = {"d": torch.float32, "s": torch.float32}
    if not legacy:
        fields.update(pivots=torch.int32, sketch=torch.float64)
    expected = {f"{name}.{f}" for name in layers for f in fields}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{_where(path)} does not match its config (missing {missing}, unexpected {extra})")
    for name, spec in layers.items():
        shapes = {"d": (spec["rank"],), "s": (1,), "pivots": (spec["rank"],), "sketch": (SKETCH_PROBES + 1,)}
        for field, dtype in fields.items():
            key, t = f"{name}.{field}", tensors[f"{name}.{field}"]
            if t.dtype != dtype or tuple(t.shape) != shapes[field]:
                raise ValueError(f"{_where(path, key)} is {t.dtype} {tuple(t.shape)}, expected {dtype} "
                                 f"{shapes[field]}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{_where(path, key)} contains NaN or Inf")
        if legacy:
            spec["pivots"] = spec["base"]["pivots"]
        else:
            spec["pivots"] = _pivots(tensors[f"{name}.pivots"], spec, f"{name}.pivots", path)
            spec["sketch"] = tensors[f"{name}.sketch"]


def _read_adapter(path: Path) -> Tuple[Dict[str, dict], Dict[str, torch.Tensor]]:
    data = _read_regular_file(path, "adapter")
    header, tensor_bytes = _split(data, path)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{_where(path)} is not a loldu-triton adapter")
    version = metadata.get("format_version")
    if not isinstance(version, str) or not version.isdigit():
        raise ValueError(f"{_where(path, 'format_version')} must be a number, got {version!r}")
    if int(version) > FORMAT_VERSION:
        raise ValueError(f"{_where(path)} has format version {version}, newer than this library "
                         f"({__version__}) reads")
    config_text, checksum = metadata.get("config"), metadata.get("checksum")
    if not isinstance(config_text, str) or not isinstance(checksum, str):
        raise ValueError(f"{_where(path)} lacks its config or checksum")
    tensors = _tensors(data, path)  # first: a file cut short is reported as such
    if _checksum(config_text, tensor_bytes) != checksum:
        raise ValueError(f"{_where(path)} fails its checksum: the file was changed or damaged after it was saved")
    try:
        config = json.loads(config_text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{_where(path, 'config')} is not valid JSON ({err})") from None
    layers = _check_layers(config, path, legacy=False)
    _check_common(config, path)
    _check_tensors(tensors, layers, path, legacy=False)
    return layers, tensors, config


def _read_legacy(directory: Path) -> Tuple[Dict[str, dict], Dict[str, torch.Tensor]]:
    path = directory / LEGACY_CONFIG_NAME
    try:
        config = json.loads(_read_regular_file(path, "adapter config"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"load_loldu: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"load_loldu: {path} is not a loldu-triton adapter config")
    version = config.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{_where(path, 'format_version')} must be an int, got {version!r}")
    if version > LEGACY_FORMAT_VERSION:
        raise ValueError(f"load_loldu: {path} has format version {version}, newer than this library "
                         f"({__version__}) reads")
    layers = _check_layers(config, path, legacy=True)
    weights = directory / LEGACY_WEIGHTS_NAME
    tensors = _tensors(_read_regular_file(weights, "adapter weights"), weights)
    _check_tensors(tensors, layers, weights, legacy=True)
    return layers, tensors, config


def _read(directory: Path) -> Tuple[Dict[str, dict], Dict[str, torch.Tensor], dict, Path]:
    if not os.path.lexists(directory / ADAPTER_NAME) and os.path.lexists(directory / LEGACY_CONFIG_NAME):
        return (*_read_legacy(directory), directory / LEGACY_CONFIG_NAME)
    return (*_read_adapter(directory / ADAPTER_NAME), directory / ADAPTER_NAME)


def read_adapter(directory) -> Tuple[Dict[str, dict], Dict[str, torch.Tensor]]:
    """(layer records, tensors) of the adapter in ``directory``, every field checked."""
    layers, tensors, _, _ = _read(Path(directory))
    return layers, tensors


def read_adapter_config(directory) -> LoLDUConfig:
    """The LoLDUConfig stored with the adapter in ``directory`` (see LoLDUConfig.from_pretrained)."""
    layers, _, config, path = _read(Path(directory))
    common = _check_common(config, path)
    if common is None:
        settings = {name: (spec["rank"], spec["alpha"], spec["init"]) for name, spec in layers.items()}
        raise ValueError(f"{_where(path)}: stores no single LoLDUConfig (its layers were adapted with different "
                         f"settings, or it predates stored configs); per layer (rank, alpha, init): {settings}")
    return common


def _sketch_gap(here: torch.Tensor, saved: torch.Tensor) -> float:
    """How far two sketches differ, relative to the weight's Frobenius norm."""
    scale = max(float(here[0]), float(saved[0]))
    if scale == 0.0:
        return 0.0
    return float((here - saved).abs().max()) / scale


def _check_base(name: str, layer: LoLDULayer, saved: dict, path: Path) -> None:
    if layer.pivots.tolist() != saved["pivots"]:
        raise ValueError(f"load_loldu: layer {name!r} has a different base weight than the adapter in {path} "
                         f"was trained on (its LU pivots differ)")
    sha256, sketch, precision = layer.base_fingerprint()
    base = saved["base"]
    if sha256 == base["sha256"]:
        return
    if "sketch" in saved:
        gap = _sketch_gap(sketch, saved["sketch"])
        tol = SKETCH_TOLERANCE * (ROUNDOFF[precision] + ROUNDOFF[base["precision"]])
        there = base["precision"]
    else:  # first format: pivot values only
        ref = torch.tensor(base["pivot_values"], dtype=torch.float64)
        gap = float((layer.pivot_values.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        tol, there = PIVOT_VALUE_RTOL, base.get("dtype", "?")
    if not gap <= tol:
        raise ValueError(f"load_loldu: layer {name!r} has a different base weight than the adapter in {path} "
                         f"was trained on (its fingerprint differs by {gap:.2e} relative, more than a cast "
                         f"between {there} and {precision} explains: {tol:.1e})")
    warnings.warn(f"load_loldu: layer {name!r}: base weight is not byte-identical to the one the adapter was "
                  f"trained on ({there} there, {precision} here; fingerprints agree to {gap:.1e}); loading",
                  stacklevel=3)


def load_loldu(model: nn.Module, directory, adapter_name: str = "default") -> nn.Module:
    """Load an adapter written by ``save_loldu`` into ``model`` (a plain base model, or one with LoLDU).

    Layers without LoLDU get it; every check (files, layer names and shapes, base-weight fingerprints) runs
    before anything changes, so on an error the model is left exactly as it was.

    adapter_name="default" (or whichever name set_adapter made trainable) loads into the trainable adapter
    (d and s, in place). Any other name stores a frozen named adapter next to it, for ``adapter_batch`` and
    ``set_adapter``; named adapters share the layer's factors, so their rank, alpha and init must be the
    layer's (a layer without LoLDU gets it with the adapter's settings, at init).

    Like add_loldu, it leaves requires_grad of the other parameters alone: ``mark_only_loldu_as_trainable``
    freezes them.
    """
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"load_loldu: adapter_name must be a non-empty string, got {adapter_name!r}")
    _refuse_merged(loldu_layers(model), "load_loldu")
    directory = Path(directory)
    layers, tensors = read_adapter(directory)

    plan = []  # (name, module now, layer to hold the values, whether it replaces the module)
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
        named = adapter_name != getattr(module, "active_adapter", "default")
        current = None
        if isinstance(module, LoLDULayer):
            current = (module.rank, module.alpha, module.init, module.init_seed)
        if current == settings:
            target, replaces = module, False
        elif named and current is not None:
            raise ValueError(f"load_loldu: layer {name!r} has LoLDU with (rank, alpha, init, init_seed) = "
                             f"{current}, adapter {adapter_name!r} was trained with {settings}; named adapters "
                             f"share the layer's factors and initial diagonal")
        elif current is not None and getattr(module, "adapter_names", ()):
            raise ValueError(f"load_loldu: layer {name!r} has named adapters {list(module.adapter_names)} on "
                             f"LoLDU with (rank, alpha, init, init_seed) = {current}; the adapter needs "
                             f"{settings}, which would drop them. Remove LoLDU from the model first")
        else:
            reason = _offloaded(name, modules) or _why_not_adaptable(name, module, modules[name.rpartition(".")[0]])
            if reason:
                raise ValueError(f"load_loldu: cannot adapt {name!r}: {reason}")
            if module.weight.is_meta:
                raise ValueError(f"load_loldu: layer {name!r} is on the meta device; load its real weights first")
            backend = getattr(module, "backend", "auto")
            target = LOLDU_LAYERS[base].from_base(module, spec["rank"], spec["alpha"], spec["init"],
                                                  spec["init_seed"], backend, name, freeze=False)
            if isinstance(module, LoLDULayer):
                target.base_requires_grad = module.base_requires_grad
            replaces = True
        _check_base(name, target, spec, directory)
        plan.append((name, module, target, replaces, named))

    others = [n for n, _ in loldu_layers(model) if n not in layers]
    if others and not all(named for *_, named in plan):
        warnings.warn(f"load_loldu: {others} have LoLDU but are not in the adapter; left as they are", stacklevel=2)
    for name, module, target, replaces, named in plan:
        d, s = tensors[f"{name}.d"].to(target.d.device), tensors[f"{name}.s"].to(target.d.device)
        if named:
            target.set_named_adapter(adapter_name, d, s)
        else:
            with torch.no_grad():
                target.d.copy_(d)
                target.s.copy_(s)
        if replaces:
            target.freeze_base()
            _replace(model, module, target)
    return model
