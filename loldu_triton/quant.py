"""Weight-only quantization of a frozen base weight: int8 or fp8 (e4m3) values with one float32 scale per
output row. W0 ~ q * scale[:, None]; the LDU factors always come from the unquantized weight."""
from __future__ import annotations

from typing import Tuple

import torch

QUANTIZATIONS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
QUANTIZED_DTYPES = tuple(dtype for dtype, _ in QUANTIZATIONS.values())


def quantize_weight(weight: torch.Tensor, kind: str, name: str = "weight") -> Tuple[torch.Tensor, torch.Tensor]:
    """(values, scale): per-output-row absmax scaling, rounding to nearest."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"{name}: base_quantization must be one of {sorted(QUANTIZATIONS)}, got {kind!r}")
    dtype, top = QUANTIZATIONS[kind]
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero, no 0/0
    scaled = w / scale[:, None]
    values = scaled.round().clamp(-top, top).to(dtype) if dtype == torch.int8 else scaled.to(dtype)
    return values, scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (values.float() * scale[:, None]).to(dtype)
