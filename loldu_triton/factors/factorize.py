"""Truncated LDU factors of a frozen weight, and the initial diagonal.

The factors are computed in float64, on the CPU, or on the weight's GPU when it is on one (cuSOLVER there:
the same pivots up to exact ties, factors equal up to float64 rounding), and only for the first ``rank``
pivots (cost ~ out * rank^2 + rank^2 * in, not a full LU). On the CPU they come from LAPACK: identical on one
torch build and CPU; a different BLAS may differ in the last float64 bits, far below the precision of the
layer's dtype.
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


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: min and max carry NaN and infinities. One pass, vectorised in every dtype
    (torch.isfinite on a bf16 weight took 9x as long)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def factor_device(weight: torch.Tensor) -> torch.device:
    """Where a weight's factors are computed: on its GPU when it is on one (float64 there), else the CPU."""
    return weight.device if weight.device.type == "cuda" else torch.device("cpu")


def lu_without_pivoting(a: torch.Tensor) -> torch.Tensor:
    """LU of ``a`` (m x n, m >= n) in elimination order, in place, packed as LAPACK packs it (unit lower L below
    the diagonal, U on and above it); torch has no pivot=False on the CPU. Recursive on column halves, so nearly
    all the work is in GEMMs and triangular solves. A zero pivot leaves its column of L zero."""
    n = a.shape[1]
    if n <= 16:
        for k in range(n):
            pivot = a[k, k]
            if bool(pivot != 0):
                a[k + 1:, k] /= pivot
            else:
                a[k + 1:, k] = 0.0
            a[k + 1:, k + 1:] -= a[k + 1:, k:k + 1] * a[k:k + 1, k + 1:]
        return a
    h = n // 2
    lu_without_pivoting(a[:, :h])
    a[:h, h:] = torch.linalg.solve_triangular(a[:h, :h], a[:h, h:], upper=False, unitriangular=True)
    a[h:, h:] -= a[h:, :h] @ a[:h, h:]
    lu_without_pivoting(a[h:, h:])
    return a


def _row_order(pivots, out_f: int, rank: int, name: str) -> list:
    """The rows in elimination order when the first ``rank`` pivots are prescribed: those, then the others."""
    given = torch.as_tensor(pivots).reshape(-1).tolist() if not isinstance(pivots, list) else pivots
    if (len(given) != rank or len(set(given)) != rank
            or not all(isinstance(p, int) and 0 <= p < out_f for p in given)):
        raise ValueError(f"{name}: pivots must be {rank} distinct row indices in [0, {out_f}), got {given!r}")
    chosen = set(given)
    return given + [i for i in range(out_f) if i not in chosen]


def ldu_factors(weight: torch.Tensor, rank: int, name: str = "weight", pivots=None,
                dtype: torch.dtype = torch.float64) -> LDUFactors:
    """Row-pivoted LDU of ``weight`` (out x in), first ``rank`` pivots, in float64 on the CPU (on the weight's
    GPU when it is on one: the same pivots and factors up to float64 rounding).

    ``pivots`` (rank row indices) prescribes the elimination order instead of choosing it: the factors of a
    weight, in the order an adapter was trained on another copy of it (a quantized one, say).
    ``dtype``: the dtype L and U are returned in, rounded once from the float64 factors (a layer asks for its
    own: that saves a float64 pass over each); D stays float64."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: LDU needs a 2-D weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    rank = check_rank(rank, name, (out_f, in_f))
    if weight.device.type == "meta":
        raise ValueError(f"{name}: weight is on the meta device; load real weights before adding LoLDU")
    w = weight.detach()
    if not all_finite(w):
        raise ValueError(f"{name}: weight of shape {tuple(weight.shape)} contains NaN or Inf")
    device, f64 = factor_device(w), torch.float64
    eps = torch.finfo(w.dtype).eps if w.dtype.is_floating_point else torch.finfo(torch.float32).eps

    # The first `rank` pivots of a row-pivoted LU depend only on the first `rank` columns: factor that panel
    # (out x rank), then get the pivot rows of U for the remaining columns by one unit-triangular solve. Every
    # other step works in place on LAPACK's result, so the cost stays close to lu_factor + solve_triangular.
    if pivots is None:
        lu, swaps, _ = torch.linalg.lu_factor_ex(w[:, :rank].to(device=device, dtype=f64))
        perm = list(range(out_f))
        for k, target in enumerate(swaps.tolist()):  # LAPACK row swaps (1-based) -> a permutation
            perm[k], perm[target - 1] = perm[target - 1], perm[k]
    else:
        perm = _row_order(pivots, out_f, rank, name)
        order = torch.tensor(perm, device=w.device)
        lu = lu_without_pivoting(w[order, :rank].to(device=device, dtype=f64))
    perm_t = torch.tensor(perm, device=device)
    pivot_rows = perm_t[:rank]
    top = lu[:rank]  # unit lower L (strictly below the diagonal) and U_raw's first rank columns (on and above)
    # U_raw row-major (LAPACK's lu is column-major): this transposing copy is most of the cost beyond LAPACK's
    # at full rank; a copy then an in-place triu was the fastest way measured
    U_raw = torch.empty(rank, in_f, dtype=f64, device=device)
    U_raw[:, :rank].copy_(top)
    U_raw[:, :rank].triu_()
    if in_f > rank:
        # The pivot rows' other columns, converted as they are copied in, then solved where they are (the same
        # bits as a solve into a new tensor). solve_triangular reads only top's strict lower part (unitriangular).
        rest = U_raw[:, rank:]
        rest.copy_(w[pivot_rows.to(w.device), rank:])
        torch.linalg.solve_triangular(top, rest, upper=False, unitriangular=True, out=rest)
    # L in the dtype asked for (rounding commutes with the zeroing, done in that dtype; in place for float64)
    L_perm = lu.to(dtype)
    L_perm[:rank].tril_(-1)  # (the rows below the top block hold L alone)
    L_perm.diagonal().fill_(1.0)
    L = torch.empty_like(L_perm)
    L[perm_t] = L_perm  # fold P into L's rows: row perm[i] of L is row i of the permuted L

    D = U_raw.diagonal().clone()
    largest = float(D.abs().max())
    if largest > MAX_PIVOT:
        raise ValueError(f"{name}: weight of shape {tuple(weight.shape)} has LU pivots up to {largest:.3g}, beyond "
                         f"what LoLDU's float32 diagonal can hold ({MAX_PIVOT:.3g}); rescale the weight")
    tol = LOST_PIVOT_EPS.get(w.dtype, 16.0) * eps * largest
    growth = torch.linalg.vector_norm(U_raw, float("inf"), dim=1)
    usable = (D.abs() > tol) & (D.abs() * MAX_U_GROWTH >= growth)
    scale = torch.where(usable, D, torch.ones_like(D))[:, None]
    U = U_raw.div_(scale) if dtype == f64 else torch.div(U_raw, scale, out=torch.empty_like(U_raw, dtype=dtype))
    # Unusable pivot: a unit direction with D = 0 (it starts at zero and cannot overflow any dtype).
    for k in torch.nonzero(~usable).flatten().tolist():
        D[k] = 0.0
        U[k] = 0.0
        U[k, k] = 1.0
        L[:, k] = 0.0
        L[perm[k], k] = 1.0
    return LDUFactors(L=L, D=D, U=U, pivots=pivot_rows.cpu(), usable_rank=int(usable.sum()))


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
    D = D.detach().to("cpu", torch.float64)
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
