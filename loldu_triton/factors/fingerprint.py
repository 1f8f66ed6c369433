"""Fingerprints of a base weight, which adapter files store to tell whether a base is the one an adapter was
trained on: its sha256 (byte identity) and a sketch (identity up to a dtype cast), with the tolerance that
tells a cast from another weight."""
from __future__ import annotations

import hashlib

import torch

from ..core.fileformat import SKETCH_PROBES
from ..core.settings import ROUNDOFF

# A sketch moves by about ROUNDOFF of the precision under a cast.
SKETCH_TOLERANCE = 4.0  # x (roundoff here + roundoff there): ~13 standard deviations of a cast's change


def weight_checksum(weight: torch.Tensor) -> str:
    """sha256 of the weight's bytes in its own dtype (the identity of a base weight)."""
    data = weight.detach().to("cpu").contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()



def weight_sketch(weight: torch.Tensor) -> torch.Tensor:
    """[||W||_F, u_1^T W v_1, ..., u_k^T W v_k] in float64 for fixed Gaussian probes (seeded by the shape).

    It sees every entry, where the pivots see only the first rank columns: a base whose other columns changed
    moves it by ~||delta W||_F, while a dtype cast of the same weight moves it by about that dtype's rounding.
    """
    w = weight.detach()
    out_f, in_f = w.shape
    gen = torch.Generator().manual_seed(out_f * 1_000_003 + in_f)
    u = torch.randn(out_f, SKETCH_PROBES, generator=gen, dtype=torch.float64).to(w.device)
    v = torch.randn(in_f, SKETCH_PROBES, generator=gen, dtype=torch.float64).to(w.device)
    sketch = torch.zeros(SKETCH_PROBES + 1, dtype=torch.float64, device=w.device)
    step = max(1, (1 << 23) // max(in_f, 1))  # rows per chunk: at most 64 MB of float64 at a time
    for start in range(0, out_f, step):
        chunk = w[start:start + step].to(torch.float64)
        sketch[0] += chunk.pow(2).sum()
        sketch[1:] += ((chunk @ v) * u[start:start + step]).sum(0)
    sketch[0] = sketch[0].sqrt()
    return sketch.cpu()


def sketch_gap(here: torch.Tensor, saved: torch.Tensor) -> float:
    """How far two sketches differ, relative to the weight's Frobenius norm."""
    scale = max(float(here[0]), float(saved[0]))
    if scale == 0.0:
        return 0.0
    return float((here - saved).abs().max()) / scale


def sketch_tolerance(precision_here: str, precision_there: str) -> float:
    """The largest sketch_gap a cast between the two precisions explains."""
    return SKETCH_TOLERANCE * (ROUNDOFF[precision_here] + ROUNDOFF[precision_there])
