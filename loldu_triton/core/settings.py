"""One validation of LoLDU's settings, shared by every entry point (layers, add_loldu, adapter files, configs).

Each check returns the value in its canonical type or raises an error that names the argument and the caller
(``where``: a layer, a function or a file). Nothing is coerced silently: 2.7, "3" and True are not ranks.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import operator
import os
import re
import sys
import warnings

import torch

INITS = ("lu", "uniform", "normal", "constant")
BACKENDS = ("auto", "torch", "triton")
# Weight-only quantizations of a frozen base: storage dtype and largest code (see factors.quant).
QUANTIZATIONS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
QUANTIZATION_KINDS = tuple(QUANTIZATIONS)
QUANTIZED_DTYPES = tuple(dtype for dtype, _ in QUANTIZATIONS.values())


# Frames skipped when a warning looks for the user's line: this package's, and torch's and contextlib's between
# them and the user (a module's __call__, load_state_dict, a with statement).
_LIBRARY_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
                 os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
_CONTEXTLIB = os.path.abspath(contextlib.__file__)


def warn_caller(message, category=UserWarning) -> None:
    """warnings.warn pointing at the first line outside this library: the user's own call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_LIBRARY_DIRS)
                                 or frame.f_code.co_filename == _CONTEXTLIB):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


def _is_int(value) -> bool:
    # numbers.Integral covers int and numpy integers; bool is an int to Python but never a count here.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_rank(rank, where: str, shape=None, allow_full: bool = False):
    """A positive int (numpy ints too), at most min(shape) for a weight of that (out, in) shape; "full" where
    ``allow_full``."""
    if allow_full and isinstance(rank, str) and rank == "full":
        return rank
    limit = None if shape is None else min(shape)
    if not _is_int(rank) or rank < 1 or (limit is not None and rank > limit):
        wanted = "a positive int" + (" or 'full'" if allow_full else "")
        if shape is not None:
            wanted = f"an int in [1, min(out, in)] = [1, {limit}] for weight {shape[0]}x{shape[1]}"
        raise ValueError(f"{where}: rank must be {wanted}, got {rank!r} ({type(rank).__name__})")
    return operator.index(rank)


def check_alpha(alpha, where: str):
    """None (alpha = rank) or a finite real > 0: e's scale s0 = alpha / rank must be finite and nonzero."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"{where}: alpha must be a positive finite number or None, got {alpha!r} "
                         f"({type(alpha).__name__})")
    value = float(alpha)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: alpha must be a positive finite number or None, got {alpha!r}")
    return value


def check_init(init, where: str) -> str:
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"{where}: init must be one of {INITS}, got {init!r}")
    return init


def check_init_seed(seed, where: str) -> int:
    if not _is_int(seed):
        raise ValueError(f"{where}: init_seed must be an int, got {seed!r} ({type(seed).__name__})")
    return operator.index(seed)


def check_backend(backend, where: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_quantization(kind, where: str):
    if kind is not None and (not isinstance(kind, str) or kind not in QUANTIZATION_KINDS):
        raise ValueError(f"{where}: base_quantization must be None or one of {QUANTIZATION_KINDS}, got {kind!r}")
    return kind


def check_dropout(p, where: str) -> float:
    """The adapter-input dropout probability: a finite real in [0, 1) (1 would drop every input; a bool or a
    string is not a probability)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{where}: dropout must be a float in [0, 1), got {p!r} ({type(p).__name__})")
    return float(p)


def check_progress(progress, where: str):
    """None (a bar when stderr is a terminal, unless LOLDU_PROGRESS=0), True or False."""
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"{where}: progress must be None, True or False, got {progress!r}")
    return progress


def progress_delay(progress, delay: float):
    """After how many seconds a progress bar shows (None: never). progress=True or LOLDU_PROGRESS=1: at once;
    False or LOLDU_PROGRESS=0: never; None with neither set: after ``delay`` when stderr is a terminal."""
    env = os.environ.get("LOLDU_PROGRESS", "").strip()
    if progress is True or (progress is None and env == "1"):
        return 0.0
    if progress is False or env == "0" or not getattr(sys.stderr, "isatty", lambda: False)():
        return None
    return delay


def check_settings(where: str, rank, alpha, init, init_seed, shape=None, allow_full=False):
    """(rank, alpha, init, init_seed), each checked; alpha None stays None."""
    return (check_rank(rank, where, shape, allow_full), check_alpha(alpha, where), check_init(init, where),
            check_init_seed(init_seed, where))


def check_adapter_name(name, where: str, allow_none: bool = False):
    """A non-empty string (or None where ``allow_none``: the trainable adapter, whatever its name)."""
    if allow_none and name is None:
        return None
    if not isinstance(name, str) or not name:
        wanted = "None or a non-empty string" if allow_none else "a non-empty string"
        raise ValueError(f"{where}: adapter_name must be {wanted}, got {name!r}")
    return name


def is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def check_target_modules(targets, where: str, field: str = "target_modules"):
    """None (every nn.Linear), "all-linear", a regex (full match) or a non-empty list of layer names (suffix
    match); a list comes back as a tuple, so that a checked value cannot be changed afterwards. ``field``: the
    name errors give (exclude_modules reads the same way, without "all-linear")."""
    if targets is None:
        return None
    if isinstance(targets, str):
        if not targets:
            raise ValueError(f"{where}: {field} must not be an empty string")
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(f"{where}: {field} {targets!r} is not a valid regex ({err})") from None
        return targets
    if isinstance(targets, (list, tuple, set, frozenset)):
        names = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
        if names and all(isinstance(n, str) and n for n in names):
            return tuple(names)
    kinds = "'all-linear', " if field == "target_modules" else ""
    raise ValueError(f"{where}: {field} must be None, {kinds}a regex or a non-empty list of layer names, "
                     f"got {targets!r}")


def exact_names(names) -> str:
    """A target_modules regex that selects exactly the layers ``names`` (a list would match by suffix)."""
    return "|".join(re.escape(n) for n in names)


class RankClampWarning(UserWarning):
    """A rank larger than a weight holds was lowered to its full rank; ``detail`` says which and to what."""

    def __init__(self, where: str, shape=None, rank=None):
        self.detail = "" if shape is None else (f"({shape[0]}x{shape[1]}) holds at most rank {min(shape)}; "
                                                f"using {min(shape)} instead of {rank}")
        super().__init__(f"{where} {self.detail}" if self.detail else where)


def clamp_rank(rank, shape, where: str) -> int:
    """``rank`` (an int or "full") for a weight of ``shape`` (out, in): at most min(out, in), with a warning
    naming ``where`` when it had to be lowered; "full" is min(out, in) without one."""
    full = min(shape)
    if _is_int(rank) and rank > full:
        warn_caller(RankClampWarning(where, shape, rank))
        return full
    rank = check_rank(rank, where, shape, allow_full=True)  # (an error here names the weight's limits)
    return full if rank == "full" else rank


def check_exclude_modules(names, where: str):
    """None, a regex (full match) or a non-empty list of layer names (suffix match), as target_modules."""
    if names == "all-linear":
        raise ValueError(f"{where}: exclude_modules cannot be 'all-linear'")
    return check_target_modules(names, where, "exclude_modules")


def check_modules_to_save(names, where: str):
    """None or a non-empty list of module names (suffix match), kept as a tuple."""
    if names is None:
        return None
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) and n for n in names):
        return tuple(dict.fromkeys(names))
    raise ValueError(f"{where}: modules_to_save must be None or a non-empty list of module names, got {names!r}")


# PEFT's task types; SEQ_CLS trains and saves the classifier head (see model.heads.saved_names).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def check_task_type(task_type, where: str):
    task_type = getattr(task_type, "value", task_type)  # peft.TaskType is a str enum
    if task_type is not None and (not isinstance(task_type, str) or task_type not in TASK_TYPES):
        raise ValueError(f"{where}: task_type must be None or one of {TASK_TYPES}, got {task_type!r}")
    return None if task_type is None else str(task_type)


def check_bias(bias, where: str) -> str:
    if bias != "none":
        raise ValueError(f"{where}: bias must be 'none', got {bias!r}: LoLDU trains no bias of an adapted layer; "
                         f"to train a whole layer, bias included, name it in modules_to_save")
    return bias


def check_flag(name: str):
    def check(value, where: str) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {name} must be True or False, got {value!r}")
        return value
    return check


# The fields of LoLDUConfig (and of an adapter file's settings) and each one's check (value, where) -> value.
FIELD_CHECKS = {
    "rank": lambda v, where: check_rank(v, where, allow_full=True),
    "alpha": check_alpha,
    "init": check_init,
    "init_seed": check_init_seed,
    "target_modules": check_target_modules,
    "base_quantization": check_quantization,
    "backend": check_backend,
    "dropout": check_dropout,
    "exclude_modules": check_exclude_modules,
    "modules_to_save": check_modules_to_save,
    "task_type": check_task_type,
    "bias": check_bias,
    "inference_mode": check_flag("inference_mode"),
}

# PEFT's LoraConfig names: the same meaning under another name, and names that do not apply to LoLDU (with what
# LoLDU has instead).
PEFT_ALIASES = {"r": "rank", "lora_dropout": "dropout"}
PEFT_REFUSED = {
    "lora_alpha": "LoLDU scales by alpha / rank at init (alpha=None: rank) and trains the scale s itself",
    "use_dora": "LoLDU has no magnitude vector; it trains d and s between frozen L and U",
    "use_rslora": "LoLDU's scale is alpha / rank and trains as s",
    "init_lora_weights": "LoLDU's init is one of " + ", ".join(INITS),
    "fan_in_fan_out": "LoLDU factors the weight as the layer stores it",
    "layers_to_transform": "name the layers in target_modules (a list or a regex)",
    "layers_pattern": "name the layers in target_modules (a list or a regex)",
    "rank_pattern": "LoLDU has one rank per config; use several add_loldu calls with target_modules",
    "alpha_pattern": "LoLDU has one alpha per config; use several add_loldu calls with target_modules",
}


def translate_peft_names(kwargs: dict, where: str) -> dict:
    """``kwargs`` with PEFT's names for LoLDU fields renamed; PEFT names that do not apply are errors saying what
    LoLDU uses instead."""
    refused = sorted(k for k in kwargs if k in PEFT_REFUSED)
    if refused:
        raise ValueError(f"{where}: {refused[0]!r} is a LoRA setting with no LoLDU meaning: "
                        f"{PEFT_REFUSED[refused[0]]}")
    out, given_as = {}, {}
    for key, value in kwargs.items():
        field = PEFT_ALIASES.get(key, key)
        if field in out:
            raise ValueError(f"{where}: {given_as[field]!r} and {key!r} are the same setting; pass one")
        out[field], given_as[field] = value, key
    return out


def check_fields(data, where: str) -> dict:
    """{field: checked value} of a dict of LoLDUConfig fields; unknown fields and invalid values are errors that
    name ``where`` (a file, say) and the field."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a LoLDU config must be a dict, got {type(data).__name__}")
    data = translate_peft_names(data, where)
    unknown = sorted(str(k) for k in data if k not in FIELD_CHECKS)
    if unknown:
        raise ValueError(f"{where}: unknown LoLDU config fields {unknown}; fields: {sorted(FIELD_CHECKS)}")
    return {name: FIELD_CHECKS[name](value, where) for name, value in data.items()}


# Unit roundoff of each precision a base weight can have (its dtype, or its quantization). For the bases other
# libraries quantize (factors.quantized_bases): the relative change of the weight (Frobenius norm) that the
# quantization makes, with room. 8-bit per-row absmax moved weights by <= 0.4%. 4-bit blocks (nf4, fp4, torchao
# int4) moved weights by 9-12%, but bitsandbytes 0.50.2's CPU backend moved Gaussian weights with 32 input
# features by 30-40% (a tiny Llama's layer by 83%), with sketch gaps up to 0.66: the sketch tolerance (4x the sum
# of two roundoffs) is then 1.0, while a different weight of the same size moves the sketch by ~2-3. At 4 bits
# the sketch is a coarse check.
ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8,
            "int8": 2.0**-6, "fp8": 2.0**-4, "bnb-int8": 2.0**-6, "torchao-int8": 2.0**-6,
            "bnb-nf4": 2.0**-2, "bnb-fp4": 2.0**-2, "torchao-int4": 2.0**-2}
