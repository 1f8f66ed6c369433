"""Weight-only quantization of a frozen base weight: int8 or fp8 (e4m3) values with one float32 scale per
output row. W0 ~ q * scale[:, None]; the LDU factors always come from the unquantized weight."""
from __future__ import annotations

from typing import Tuple

import torch

from ..core.settings import QUANTIZATIONS, check_quantization


def quantize_weight(weight: torch.Tensor, kind: str, name: str = "weight") -> Tuple[torch.Tensor, torch.Tensor]:
    """(values, scale): per-output-row absmax scaling, rounding to nearest."""
    if check_quantization(kind, name) is None:
        raise ValueError(f"{name}: quantize_weight needs a kind, one of {list(QUANTIZATIONS)}")
    dtype, top = QUANTIZATIONS[kind]
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero, no 0/0
    scaled = w / scale[:, None]
    values = scaled.round().clamp(-top, top).to(dtype) if dtype == torch.int8 else scaled.to(dtype)
    return values, scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W0 from its codes and per-row scales, in ``dtype``."""
    return (values.float() * scale[:, None]).to(dtype)


def dense_weight(weight: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """The weight a GEMM multiplies by: itself (scale None), or quantized codes dequantized to ``dtype``."""
    return weight if scale is None else dequantize(weight, scale, dtype)
