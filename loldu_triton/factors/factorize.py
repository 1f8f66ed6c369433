"""Truncated LDU factors of a frozen weight, and the initial diagonal.

The factors are computed in float64 on the CPU whatever device holds the weight, and only for the first
``rank`` pivots (cost ~ out * rank^2 + rank^2 * in, not a full LU), so the same weight gives the same
factors whichever device trains. They come from LAPACK: identical on one torch build and CPU; a different BLAS
may differ in the last float64 bits, far below the precision of the layer's dtype.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..core.settings import check_init, check_rank, warn_caller

# A pivot whose row would need entries of U larger than this is treated as unusable: such a direction is
# numerically dominated by cancellation, and the bound keeps U finite even in float16 (max 65504).
MAX_U_GROWTH = 2.0**14
# A pivot below LOST_PIVOT_EPS * eps(weight dtype) * (largest pivot) is lost to the weight's own rounding: a
# rank-deficient fp32 product leaves pivots of 1-2 eps, while full-rank weights keep theirs above 1e4 eps.
# In 16-bit types a full-rank weight's smallest pivots sit only a few eps below its largest, so there only
# pivots under one eps count as lost.
LOST_PIVOT_EPS = {torch.float16: 1.0, torch.bfloat16: 1.0}
# d, s and e are float32: pivots must leave room for s * d and its updates there.
MAX_PIVOT = torch.finfo(torch.float32).max / 2.0**10


@dataclass
class LDUFactors:
    """``weight ~ L diag(D) U`` restricted to the first ``rank`` pivots (permutation folded into L's rows)."""

    L: torch.Tensor  # (out, rank) float64; row pivots[k] of column k is 1
    D: torch.Tensor  # (rank,) float64; 0 where the pivot was unusable
    U: torch.Tensor  # (rank, in) float64; unit diagonal U[k, k] == 1
    pivots: torch.Tensor  # (rank,) int64: the row of the weight chosen at each elimination step
    usable_rank: int  # number of pivots that were not (numerically) zero


def ldu_factors(weight: torch.Tensor, rank: int, name: str = "weight") -> LDUFactors:
    """Row-pivoted LDU of ``weight`` (out x in), first ``rank`` pivots, in float64 on the CPU."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: LDU needs a 2-D weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    rank = check_rank(rank, name, (out_f, in_f))
    if weight.device.type == "meta":
        raise ValueError(f"{name}: weight is on the meta device; load real weights before adding LoLDU")
    w = weight.detach()
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: weight of shape {tuple(weight.shape)} contains NaN or Inf")
    # Only the first `rank` columns and the `rank` pivot rows are ever read: copy just those.
    cols = w[:, :rank].to(device="cpu", dtype=torch.float64)
    eps = torch.finfo(w.dtype).eps if w.dtype.is_floating_point else torch.finfo(torch.float32).eps

    # The first `rank` pivots of a row-pivoted LU depend only on the first `rank` columns: factor that panel,
    # then get the pivot rows of U for the remaining columns by one unit-triangular solve.
    lu, swaps, _ = torch.linalg.lu_factor_ex(cols)
    perm = list(range(out_f))
    for k, target in enumerate(swaps.tolist()):  # LAPACK row swaps (1-based) -> a permutation
        perm[k], perm[target - 1] = perm[target - 1], perm[k]
    pivots = torch.tensor(perm[:rank], dtype=torch.int64)
    L_top = torch.tril(lu[:rank], diagonal=-1) + torch.eye(rank, dtype=torch.float64)
    U_raw = torch.empty(rank, in_f, dtype=torch.float64)
    U_raw[:, :rank] = torch.triu(lu[:rank])
    if in_f > rank:
        pivot_rows = w[pivots, rank:].to(device="cpu", dtype=torch.float64)
        U_raw[:, rank:] = torch.linalg.solve_triangular(L_top, pivot_rows, upper=False, unitriangular=True)
    L_perm = torch.tril(lu, diagonal=-1)
    L_perm[:rank] += torch.eye(rank, dtype=torch.float64)
    L = torch.empty_like(L_perm)
    L[torch.tensor(perm)] = L_perm  # fold P into L's rows: row perm[i] of L is row i of the permuted L

    D = torch.diagonal(U_raw).clone()
    largest = float(D.abs().max())
    if largest > MAX_PIVOT:
        raise ValueError(f"{name}: weight of shape {tuple(weight.shape)} has LU pivots up to {largest:.3g}, beyond "
                         f"what LoLDU's float32 diagonal can hold ({MAX_PIVOT:.3g}); rescale the weight")
    tol = LOST_PIVOT_EPS.get(w.dtype, 16.0) * eps * largest
    usable = (D.abs() > tol) & (D.abs() * MAX_U_GROWTH >= U_raw.abs().amax(dim=1))
    U = U_raw / torch.where(usable, D, torch.ones_like(D))[:, None]
    # Unusable pivot: a unit direction with D = 0 (it starts at zero and cannot overflow any dtype).
    for k in torch.nonzero(~usable).flatten().tolist():
        D[k] = 0.0
        U[k] = 0.0
        U[k, k] = 1.0
        L[:, k] = 0.0
        L[pivots[k], k] = 1.0
    return LDUFactors(L=L, D=D, U=U, pivots=pivots, usable_rank=int(usable.sum()))


def warn_if_rank_deficient(factors: LDUFactors, name: str) -> None:
    rank = factors.D.numel()
    if factors.usable_rank < rank:
        warn_caller(f"{name}: weight has usable rank {factors.usable_rank} of the requested {rank} "
                    f"(zero or tiny pivots); the other {rank - factors.usable_rank} directions use unit factors "
                    f"with a zero initial diagonal")


def initial_diagonal(D: torch.Tensor, init: str, seed: int, name: str = "weight") -> torch.Tensor:
    """The starting diagonal z0 (float32) for an init mode.

    Random inits draw from a generator seeded by ``seed`` and the pivot values, so the same base weight
    always gives the same z0: an adapter file then needs only z and sigma to reproduce the layer.
    """
    check_init(init, name)
    D = D.to(torch.float64)
    if init == "lu":
        return D.to(torch.float32)
    mean, std = float(D.mean()), float(D.std(unbiased=False))
    if init == "constant":
        return torch.full_like(D, mean).to(torch.float32)
    digest = hashlib.sha256(D.numpy().tobytes() + str(seed).encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    if init == "uniform":
        lo, hi = float(D.min()), float(D.max())
        return (lo + (hi - lo) * torch.rand(D.shape, generator=gen, dtype=torch.float64)).to(torch.float32)
    return (mean + std * torch.randn(D.shape, generator=gen, dtype=torch.float64)).to(torch.float32)
