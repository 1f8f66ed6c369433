
import pytest
import torch

from kernel_checks import assert_close, outside, tolerance
from loldu_triton.factors.factorize import MAX_U_GROWTH, initial_diagonal, ldu_factors


def lapack_reference(W, r):
    P, L, U = torch.linalg.lu(W.double())
    D = torch.diagonal(U)[:r]
    return P.argmax(0)[:r], (P @ L)[:, :r], D, U[:r] / D[:, None]


def factor_bounds(W, f, r):
    """How far computed L, D, U may sit from the exact factors (first order): W = L D U holds up to
    back = tolerance(|L||D||U|) on the first r columns and pivot rows, and with M = |L1^-1| back |U1^-1| on the
    pivot block, L^-1 dL D, dD and D dU U^-1 are the strictly lower, diagonal and strictly upper parts of
    L1^-1 dW U1^-1 (L1, U1: the unit triangular pivot blocks)."""
    S = (f.L.abs() * f.D.abs()) @ f.U.abs()
    back = tolerance(W, S, r, torch.float64)
    Li, Ui = torch.linalg.inv(f.L[f.pivots]).abs(), torch.linalg.inv(f.U[:, :r]).abs()
    M = Li @ back[f.pivots][:, :r] @ Ui
    D = f.D.abs()
    return S, {"L": (back[:, :r] @ Ui + f.L.abs() @ torch.triu(M)) / D, "D": torch.diagonal(M),
               "U": (torch.tril(M) @ f.U.abs() + Li @ back[f.pivots]) / D[:, None]}


@pytest.mark.parametrize("shape,r", [((7, 5), 5), ((30, 40), 30), ((64, 32), 10), ((5, 9), 3), ((1, 6), 1)])
def test_factors_match_full_lu_truncated_to_first_pivots(shape, r):
    W = torch.randn(*shape, dtype=torch.float64)
    f = ldu_factors(W, r)
    pivots, L, D, U = lapack_reference(W, r)
    assert torch.equal(f.pivots, pivots)
    # ours and LAPACK's each within the first-order bound of the exact factors: apart by at most twice it
    S, bound = factor_bounds(W, f, r)
    rows, cols = f.pivots, slice(0, r)
    LDU = f.L @ torch.diag(f.D) @ f.U
    assert_close(LDU[:, cols], W[:, cols], S[:, cols], r, torch.float64, "first r columns")
    assert_close(LDU[rows], W[rows], S[rows], r, torch.float64, "pivot rows")
    bad = [line for name, ours, ref in (("L", f.L, L), ("D", f.D, D), ("U", f.U, U))
           for line in outside(ours, ref, 2 * bound[name], name)]
    assert not bad, "\n".join(bad)
    assert f.usable_rank == r
    # permutation folded into L: one unit entry per column at the pivot row, nothing above it in elimination order
    assert torch.equal(f.L[f.pivots, torch.arange(r)], torch.ones(r, dtype=torch.float64))
    if r == min(shape):
        assert_close(LDU, W, S, r, torch.float64, "W")


def test_factors_are_bit_identical_across_calls_and_dtypes_of_the_same_values():
    W = torch.randn(48, 33).bfloat16()
    a = ldu_factors(W, 12)
    b = ldu_factors(W.float(), 12)  # same values in another dtype
    c = ldu_factors(W.clone().t().contiguous().t(), 12)  # other strides
    for other in (b, c):
        for name in ("L", "D", "U", "pivots"):
            assert torch.equal(getattr(a, name), getattr(other, name)), name


def test_zero_weight_gives_unit_directions_and_no_nan():
    f = ldu_factors(torch.zeros(8, 6), 4)
    assert f.usable_rank == 0
    assert torch.equal(f.D, torch.zeros(4, dtype=torch.float64))
    for t in (f.L, f.U):
        assert torch.isfinite(t).all()
        assert torch.equal(t.abs().sum(dim=0 if t is f.L else 1), torch.ones(4, dtype=torch.float64))
    assert len(set(f.pivots.tolist())) == 4


def test_rank_deficient_weight_reports_usable_rank():
    W = torch.randn(9, 3, dtype=torch.float64) @ torch.randn(3, 12, dtype=torch.float64)
    f = ldu_factors(W, 6)
    assert f.usable_rank == 3
    assert torch.equal(f.D[3:], torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(f.U).all() and torch.isfinite(f.L).all()


def test_tiny_pivot_with_huge_row_is_not_used_so_u_fits_float16():
    W = torch.tensor([[1e-9, 1.0, 2.0], [1e-10, 3.0, 1.0], [5e-10, 1.0, 1.0]])
    f = ldu_factors(W, 3)
    assert f.D[0] == 0  # |U| would have been ~2e9
    assert f.U.abs().max() <= MAX_U_GROWTH
    assert torch.isfinite(f.U.half()).all()


def test_zero_first_column_keeps_later_directions_usable():
    W = torch.randn(6, 5, dtype=torch.float64)
    W[:, 0] = 0
    f = ldu_factors(W, 4)
    assert f.D[0] == 0 and (f.D[1:] != 0).all()
    assert f.usable_rank == 3


@pytest.mark.parametrize("bad,match", [(float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf")])
def test_non_finite_weight_is_refused(bad, match):
    W = torch.randn(5, 5)
    W[2, 3] = bad
    with pytest.raises(ValueError, match=f"layer.q.*{match}"):
        ldu_factors(W, 2, name="layer.q")


@pytest.mark.parametrize("r", [0, 6, -1])
def test_rank_out_of_range_is_refused(r):
    with pytest.raises(ValueError, match=r"my\.layer: rank must be an int in \[1, min\(out, in\)\] = \[1, 5\]"):
        ldu_factors(torch.randn(5, 8), r, name="my.layer")


def test_inits_follow_the_pivot_statistics_and_are_reproducible():
    D = ldu_factors(torch.randn(40, 40, dtype=torch.float64), 32).D
    lu = initial_diagonal(D, "lu", 0)
    assert torch.equal(lu, D.float())
    const = initial_diagonal(D, "constant", 0)
    assert torch.allclose(const, torch.full((32,), float(D.mean())))
    uni = initial_diagonal(D, "uniform", 0)
    assert (uni >= D.min() - 1e-6).all() and (uni <= D.max() + 1e-6).all() and uni.unique().numel() == 32
    normal = initial_diagonal(D, "normal", 0)
    assert abs(float(normal.mean() - D.mean())) < 3 * float(D.std()) / 32**0.5 * 2
    assert torch.equal(normal, initial_diagonal(D, "normal", 0))
    assert not torch.equal(normal, initial_diagonal(D, "normal", 1))
    with pytest.raises(ValueError, match="init must be one of"):
        initial_diagonal(D, "xavier", 0)


@pytest.mark.parametrize("shape,r", [((7, 5), 5), ((30, 40), 30), ((64, 32), 20), ((50, 70), 37), ((1, 6), 1)])
def test_prescribed_pivots_give_the_factors_of_that_elimination_order(shape, r):
    W = torch.randn(*shape, dtype=torch.float64)
    pivots, L, D, U = lapack_reference(W, r)
    f = ldu_factors(W, r, pivots=pivots)  # the order partial pivoting chooses: LAPACK's factors
    assert torch.equal(f.pivots, pivots) and f.usable_rank == r
    S, bound = factor_bounds(W, f, r)
    bad = [line for name, ours, ref in (("L", f.L, L), ("D", f.D, D), ("U", f.U, U))
           for line in outside(ours, ref, 2 * bound[name], name)]
    assert not bad, "\n".join(bad)
    # another order (more than 16 columns: the recursive halves run): W = L D U still holds there
    order = torch.randperm(shape[0])[:r]
    g = ldu_factors(W, r, pivots=order.tolist())
    assert torch.equal(g.pivots, order) and torch.isfinite(g.L).all() and torch.isfinite(g.U).all()
    usable = g.D != 0
    S = (g.L.abs() * g.D.abs()) @ g.U.abs()
    LDU = g.L @ torch.diag(g.D) @ g.U
    if bool(usable.all()):
        assert_close(LDU[:, :r], W[:, :r], S[:, :r], r, torch.float64, "first r columns")
        assert_close(LDU[order], W[order], S[order], r, torch.float64, "pivot rows")
    assert torch.equal(g.L[g.pivots, torch.arange(r)], torch.ones(r, dtype=torch.float64))


def test_prescribed_zero_pivot_gives_a_unit_direction_and_no_nan():
    W = torch.randn(6, 5, dtype=torch.float64)
    W[2, 0] = 0.0
    f = ldu_factors(W, 3, pivots=[2, 0, 1])
    assert f.D[0] == 0 and f.usable_rank == 2
    assert torch.isfinite(f.L).all() and torch.isfinite(f.U).all()


@pytest.mark.parametrize("pivots", [[0, 0, 1], [0, 1], [0, 1, 6], [-1, 0, 1], [0.0, 1, 2]])
def test_bad_prescribed_pivots_are_refused_by_name(pivots):
    with pytest.raises(ValueError, match=r"layer\.v: pivots must be 3 distinct row indices in \[0, 6\)"):
        ldu_factors(torch.randn(6, 5), 3, name="layer.v", pivots=pivots)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU factorization is not run")
@pytest.mark.parametrize("shape,r", [((300, 200), 64), ((200, 300), 200), ((64, 64), 64)])
def test_factors_on_the_gpu_match_the_cpu_path_up_to_float64_rounding(shape, r):
    W = torch.randn(*shape, dtype=torch.float32)
    cpu, gpu = ldu_factors(W, r), ldu_factors(W.cuda(), r)
    assert gpu.L.is_cuda and gpu.U.is_cuda and gpu.D.is_cuda and not gpu.pivots.is_cuda
    assert torch.equal(cpu.pivots, gpu.pivots) and cpu.usable_rank == gpu.usable_rank
    S, bound = factor_bounds(W.double(), cpu, r)
    bad = [line for name in ("L", "D", "U")
           for line in outside(getattr(gpu, name).cpu(), getattr(cpu, name), 2 * bound[name], name)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_entry_anywhere_in_a_large_weight_is_refused(dtype, bad):
    W = torch.randn(67, 1031).to(dtype)
    for index in [(0, 0), (66, 1030), (33, 517), (5, 1029)]:  # corners, middle, a vector tail
        V = W.clone()
        V[index] = bad
        with pytest.raises(ValueError, match=r"w\.x: weight of shape \(67, 1031\) contains NaN or Inf"):
            ldu_factors(V, 3, name="w.x")
