"""The adapter file format, read and written as bytes and records, with no model in sight.

One file, ``loldu_adapter.safetensors``, holds the whole adapter: per layer d and s (the r + 1 trained float32
values), the LU pivot rows (int32) and a sketch of the base weight (float64, see factors.fingerprint), and in
its metadata the settings as JSON and a sha256 over settings and tensor bytes. One file is replaced atomically,
so a crash or a concurrent reader sees the old adapter or the new one, never a mix.

The first format (``adapter_config.json`` + ``adapter_model.safetensors``) is still read.
Every field read from a file is checked here, and an error names the file and the field.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .._version import __version__
from .settings import ROUNDOFF, check_fields

ADAPTER_NAME = "loldu_adapter.safetensors"
LEGACY_CONFIG_NAME = "adapter_config.json"
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "loldu-triton-adapter"
FORMAT_VERSION = 3  # 3: modules_to_save; a file without them is written as 2, which older versions read
LEGACY_FORMAT_VERSION = 1
# Adapter files are small ((2r + 1) * 4 bytes a layer, plus any modules_to_save): nothing larger is one.
MAX_FILE_BYTES = 1 << 30
# Legacy format: a base whose pivots match but whose bytes differ is accepted, with a warning, when its pivot
# values agree to this relative tolerance (bf16 rounding is ~4e-3).
PIVOT_VALUE_RTOL = 1e-2
# The LoLDUConfig fields a layer's record holds, and those of the file's common config (its top level).
LAYER_FIELDS = ("rank", "alpha", "init", "init_seed", "base_quantization")
COMMON_FIELDS = LAYER_FIELDS + ("target_modules", "dropout")  # (dropout: absent in older files, so 0)
# The numbers a base weight's sketch holds: its Frobenius norm and this many bilinear probes.
SKETCH_PROBES = 8
# The base layer types an adapter can be for, by name.
LAYER_TYPES = ("Linear", "Conv2d", "Embedding")


def parse_count(value, where: str) -> int:
    """The one parser of a number in a file: a JSON int (not a bool) or ASCII digits in a string (str.isdigit()
    also takes superscripts, which int() refuses), at most 18 digits, as an int; anything else is an error
    naming ``where`` (the file and the field)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10 ** 18:
        return value
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,18}", value):
        raise ValueError(f"{where} must be a number written in ASCII digits, got {value!r}")
    return int(value)


def file_where(path: Path, field: str = "") -> str:
    return f"load_loldu: {path}" + (f": {field}" if field else "")


def read_regular_file(path: Path, what: str) -> bytes:
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


def atomic_write(path: Path, data: bytes) -> None:
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


def file_checksum(config_text: str, tensor_bytes: bytes) -> str:
    return hashlib.sha256(config_text.encode() + b"\0" + tensor_bytes).hexdigest()


def split(data: bytes, path: Path) -> Tuple[dict, bytes]:
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


def read_tensors(data: bytes, path: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"load_loldu: {path} is truncated or corrupt ({err})") from None


def serialize(tensors: Dict[str, torch.Tensor], config_text: str, version: int = FORMAT_VERSION) -> bytes:
    """The file's bytes. The checksum covers the tensor bytes, which are the same with or without it."""
    metadata = {"format": FORMAT, "format_version": str(version), "config": config_text}
    draft = save_safetensors(tensors, metadata=metadata)
    _, tensor_bytes = split(draft, Path("<draft>"))
    metadata["checksum"] = file_checksum(config_text, tensor_bytes)
    return save_safetensors(tensors, metadata=metadata)


def remove_legacy(directory: Path) -> None:
    """Drop a first-format adapter of ours that the new file supersedes (the new file wins anyway)."""
    config = directory / LEGACY_CONFIG_NAME
    try:
        ours = json.loads(read_regular_file(config, "config")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return  # absent, or not ours (a PEFT adapter, say): leave it
    if ours:
        for name in (LEGACY_WEIGHTS_NAME, LEGACY_CONFIG_NAME):
            try:
                os.remove(directory / name)
            except FileNotFoundError:
                pass


# What a folder holds, so that no write replaces an adapter of another kind (the first format's file names are
# PEFT's too).
ADAPTER_KINDS = {"loldu": f"a LoLDU adapter ({ADAPTER_NAME})",
                 "loldu-first": f"a LoLDU adapter of the first format ({LEGACY_CONFIG_NAME} + {LEGACY_WEIGHTS_NAME})",
                 "lora": f"a PEFT LoRA adapter ({LEGACY_CONFIG_NAME} + {LEGACY_WEIGHTS_NAME})",
                 "other": f"another kind of adapter ({LEGACY_CONFIG_NAME} or {LEGACY_WEIGHTS_NAME})"}


def folder_adapter(directory: Path) -> Optional[str]:
    """Which of ADAPTER_KINDS ``directory`` holds, by its files, or None."""
    if os.path.lexists(directory / ADAPTER_NAME):
        return "loldu"
    config = directory / LEGACY_CONFIG_NAME
    if os.path.lexists(config):
        try:
            data = json.loads(read_regular_file(config, "config"))
        except (OSError, ValueError, RecursionError):
            return "other"
        if isinstance(data, dict) and data.get("format") == FORMAT:
            return "loldu-first"
        return "lora" if isinstance(data, dict) and data.get("peft_type") == "LORA" else "other"
    return "other" if os.path.lexists(directory / LEGACY_WEIGHTS_NAME) else None


def refuse_other_adapter(directory: Path, mine: Tuple[str, ...], where: str, overwrite) -> None:
    """Raise, before anything is written, when ``directory`` holds an adapter of a kind not in ``mine``."""
    if not isinstance(overwrite, bool):
        raise ValueError(f"{where}: overwrite must be True or False, got {overwrite!r}")
    kind = folder_adapter(directory)
    if kind is not None and kind not in mine and not overwrite:
        raise ValueError(f"{where}: {directory} holds {ADAPTER_KINDS[kind]}; nothing was written. Choose another "
                         f"folder, or pass overwrite=True to write there anyway")



def required_field(spec: dict, key: str, path: Path, where: str):
    if key not in spec:
        raise ValueError(f"{file_where(path, where)} has no {key!r}")
    return spec[key]


def check_layer_spec(name, spec, path: Path, legacy: bool) -> dict:
    """The settings of one layer record, each checked; errors name the file, the layer and the field."""
    where = f"layer {name!r}"
    if not isinstance(name, str) or not name:
        raise ValueError(f"{file_where(path)}: layer names must be non-empty strings, got {name!r}")
    if not isinstance(spec, dict):
        raise ValueError(f"{file_where(path, where)} must be an object, got {type(spec).__name__}")
    unknown = sorted(str(k) for k in spec if k not in LAYER_FIELDS + ("type", "weight_shape", "base"))
    if unknown:
        raise ValueError(f"{file_where(path, where)} has unknown fields {unknown}")
    for key in ("rank", "alpha", "init", "init_seed"):  # (base_quantization came later: None when absent)
        required_field(spec, key, path, where)
    settings = check_fields({k: spec[k] for k in LAYER_FIELDS if k in spec}, file_where(path, where))
    rank, alpha, init, init_seed = (settings[k] for k in ("rank", "alpha", "init", "init_seed"))
    if rank == "full" or alpha is None:
        raise ValueError(f"{file_where(path, where)}: a layer's rank must be an int and its alpha a number, got "
                         f"rank {rank!r}, alpha {alpha!r}")
    kind = required_field(spec, "type", path, where)
    if kind not in LAYER_TYPES:
        raise ValueError(f"{file_where(path, where)}: type must be one of {sorted(LAYER_TYPES)}, "
                         f"got {kind!r}")
    shape = required_field(spec, "weight_shape", path, where)
    if not isinstance(shape, list) or len(shape) < 2 or not all(isinstance(n, int) for n in shape):
        raise ValueError(f"{file_where(path, where)}: weight_shape must be a list of positive ints, got {shape!r}")
    shape = [parse_count(n, file_where(path, f"{where}: weight_shape")) for n in shape]
    if not all(shape):
        raise ValueError(f"{file_where(path, where)}: weight_shape must be a list of positive ints, got {shape!r}")
    base = required_field(spec, "base", path, where)
    if not isinstance(base, dict) or not isinstance(base.get("sha256"), str):
        raise ValueError(f"{file_where(path, where)}: base must be an object with a 'sha256' string")
    if legacy:
        pivots, values = base.get("pivots"), base.get("pivot_values")
        if (not isinstance(pivots, list) or not isinstance(values, list) or len(pivots) != rank
                or len(values) != rank or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in values)):
            raise ValueError(f"{file_where(path, where)}: base must hold {rank} pivots and {rank} finite pivot_values")
    elif base.get("precision") not in ROUNDOFF:
        raise ValueError(f"{file_where(path, where)}: base precision must be one of {sorted(ROUNDOFF)}, "
                         f"got {base.get('precision')!r}")
    return {"rank": rank, "alpha": alpha, "init": init, "init_seed": init_seed,
            "base_quantization": settings.get("base_quantization"), "type": kind, "weight_shape": shape, "base": base}


def check_common(config: dict, path: Path) -> Optional[dict]:
    """The file's common LoLDUConfig fields (its top level), checked; None where the layers' settings differ."""
    if config.get("rank") is None:
        return None
    return check_fields({k: config[k] for k in COMMON_FIELDS if k in config}, file_where(path, "config"))


def check_layers(config, path: Path, legacy: bool) -> Dict[str, dict]:
    if not isinstance(config, dict):
        raise ValueError(f"{file_where(path)}: the adapter config must be a JSON object")
    layers = config.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{file_where(path)}: 'layers' must be an object of layer name -> record, got "
                         f"{type(layers).__name__}")
    if not layers:
        raise ValueError(f"{file_where(path)}: the adapter has no layers")
    return {name: check_layer_spec(name, spec, path, legacy) for name, spec in layers.items()}


def check_pivots(tensor: torch.Tensor, spec: dict, key: str, path: Path) -> list:
    rows = spec["weight_shape"][0]
    pivots = tensor.tolist()
    if len(set(pivots)) != len(pivots) or not all(0 <= p < rows for p in pivots):
        raise ValueError(f"{file_where(path, key)} must be {len(pivots)} distinct rows in [0, {rows})")
    return pivots


def check_tensors(tensors, layers: Dict[str, dict], path: Path, legacy: bool) -> None:
    fields = {"d": torch.float32, "s": torch.float32}
    if not legacy:
        fields.update(pivots=torch.int32, sketch=torch.float64)
    expected = {f"{name}.{f}" for name in layers for f in fields}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{file_where(path)} does not match its config (missing {missing}, unexpected {extra})")
    for name, spec in layers.items():
        shapes = {"d": (spec["rank"],), "s": (1,), "pivots": (spec["rank"],), "sketch": (SKETCH_PROBES + 1,)}
        for field, dtype in fields.items():
            key, t = f"{name}.{field}", tensors[f"{name}.{field}"]
            if t.dtype != dtype or tuple(t.shape) != shapes[field]:
                raise ValueError(f"{file_where(path, key)} is {t.dtype} {tuple(t.shape)}, expected {dtype} "
                                 f"{shapes[field]}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{file_where(path, key)} contains NaN or Inf")
        if legacy:
            spec["pivots"] = spec["base"]["pivots"]
        else:
            spec["pivots"] = check_pivots(tensors[f"{name}.pivots"], spec, f"{name}.pivots", path)
            spec["sketch"] = tensors[f"{name}.sketch"]


SAVED_PREFIX = "modules_to_save:"  # tensor keys "modules_to_save:<module>:<state_dict key>"


def check_saved(config: dict, tensors: Dict[str, torch.Tensor], path: Path) -> Dict[str, dict]:
    """The modules_to_save of a file: {module name: {"type": class name, "state": {key: tensor}}}; their tensors
    leave ``tensors``. Shapes and dtypes are the model's to check."""
    records = config.get("modules_to_save") or {}
    if not isinstance(records, dict):
        raise ValueError(f"{file_where(path, 'modules_to_save')} must be an object of module name -> record")
    saved = {}
    for name, record in records.items():
        where = file_where(path, f"modules_to_save {name!r}")
        keys = record.get("keys") if isinstance(record, dict) else None
        if (not name or not isinstance(record.get("type"), str) or not isinstance(keys, list) or not keys
                or not all(isinstance(k, str) and k for k in keys)):
            raise ValueError(f"{where} must be an object with a 'type' string and a non-empty 'keys' list")
        state = {}
        for key in keys:
            full = f"{SAVED_PREFIX}{name}:{key}"
            if full not in tensors:
                raise ValueError(f"{where}: tensor {full!r} is missing")
            state[key] = tensors.pop(full)
            if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
                raise ValueError(f"{file_where(path, full)} contains NaN or Inf")
        saved[name] = {"type": record["type"], "state": state}
    return saved


def read_adapter_file(path: Path) -> Tuple[Dict[str, dict], Dict[str, torch.Tensor], dict, Dict[str, dict]]:
    data = read_regular_file(path, "adapter")
    header, tensor_bytes = split(data, path)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{file_where(path)} is not a loldu-triton adapter")
    version = parse_count(metadata.get("format_version"), file_where(path, "format_version"))
    if version > FORMAT_VERSION:
        raise ValueError(f"{file_where(path)} has format version {version}, newer than this library "
                         f"({__version__}) reads")
    config_text, checksum = metadata.get("config"), metadata.get("checksum")
    if not isinstance(config_text, str) or not isinstance(checksum, str):
        raise ValueError(f"{file_where(path)} lacks its config or checksum")
    tensors = read_tensors(data, path)  # first: a file cut short is reported as such
    if file_checksum(config_text, tensor_bytes) != checksum:
        raise ValueError(f"{file_where(path)} fails its checksum: the file was changed or damaged after it was saved")
    try:
        config = json.loads(config_text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{file_where(path, 'config')} is not valid JSON ({err})") from None
    layers = check_layers(config, path, legacy=False)
    check_common(config, path)
    saved = check_saved(config, tensors, path)
    check_tensors(tensors, layers, path, legacy=False)
    return layers, tensors, config, saved


def read_legacy(directory: Path) -> Tuple[Dict[str, dict], Dict[str, torch.Tensor], dict, Dict[str, dict]]:
    path = directory / LEGACY_CONFIG_NAME
    try:
        config = json.loads(read_regular_file(path, "adapter config"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"load_loldu: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"load_loldu: {path} is not a loldu-triton adapter config")
    version = config.get("format_version", 0)
    if not isinstance(version, int):  # a JSON number in this format, never a string
        raise ValueError(f"{file_where(path, 'format_version')} must be an int, got {version!r}")
    version = parse_count(version, file_where(path, "format_version"))
    if version > LEGACY_FORMAT_VERSION:
        raise ValueError(f"load_loldu: {path} has format version {version}, newer than this library "
                         f"({__version__}) reads")
    layers = check_layers(config, path, legacy=True)
    weights = directory / LEGACY_WEIGHTS_NAME
    tensors = read_tensors(read_regular_file(weights, "adapter weights"), weights)
    check_tensors(tensors, layers, weights, legacy=True)
    return layers, tensors, config, {}


def read_adapter_files(directory: Path) -> Tuple[Dict[str, dict], Dict[str, torch.Tensor], dict, dict, Path]:
    if not os.path.lexists(directory / ADAPTER_NAME) and os.path.lexists(directory / LEGACY_CONFIG_NAME):
        return (*read_legacy(directory), directory / LEGACY_CONFIG_NAME)
    return (*read_adapter_file(directory / ADAPTER_NAME), directory / ADAPTER_NAME)


def read_adapter(directory) -> Tuple[Dict[str, dict], Dict[str, torch.Tensor], Dict[str, dict]]:
    """(layer records, their tensors, modules_to_save) of the adapter in ``directory``, every field checked."""
    layers, tensors, _, saved, _ = read_adapter_files(Path(directory))
    return layers, tensors, saved


def read_common_settings(directory) -> Tuple[dict, list, list]:
    """(The LoLDUConfig fields stored with the adapter in ``directory``, its layers', its modules_to_save); see
    LoLDUConfig.from_pretrained."""
    layers, _, config, saved, path = read_adapter_files(Path(directory))
    common = check_common(config, path)
    if common is None:
        settings = {name: (spec["rank"], spec["alpha"], spec["init"]) for name, spec in layers.items()}
        raise ValueError(f"{file_where(path)}: stores no single LoLDUConfig (its layers were adapted with different "
                         f"settings, or it predates stored configs); per layer (rank, alpha, init): {settings}")
    return common, list(layers), list(saved)
