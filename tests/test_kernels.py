"""Tests of the Triton kernels in loldu_triton/kernels without the interpreter: the CPU paths (errors, fake
tensors, what torch.compile sees), the comparison helpers every numerics test uses, 3xTF32's error by emulation,
the autotuning spaces, and the GPU tests (run when CUDA is available). The interpreter runs the kernels on CPU
in tests/interpreted (a pytest invocation of its own)."""

import importlib
import itertools
import logging
import math
import re

import pytest
import torch
from kernel_checks import Roundoff, assert_close, assert_float64_close, float64_copy, mismatches, references

from conftest import rel_err

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

MODULE = "loldu_triton.kernels.launch"


# ---- the comparison helper --------------------------------------------------------------------------------------


def _bf16_case(M, K, N, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, W = torch.randn(M, K, generator=g).bfloat16(), (torch.randn(N, K, generator=g) * K ** -0.5).bfloat16()
    L, U = (torch.randn(N, r, generator=g) * r ** -0.5).bfloat16(), (torch.randn(r, K, generator=g) * K ** -0.5).bfloat16()
    return x, W, None, L, U, torch.randn(r, generator=g) + 1.0, torch.randn(M, N, generator=g).bfloat16()


def test_one_wrong_row_at_large_m_fails_elementwise_though_the_whole_tensor_error_is_small():
    x, W, b, L, U, e, dy = _bf16_case(8192, 256, 64, 16)
    ref, scale, n = references(x, W, b, L, U, e, dy)["y"]
    good = ref.bfloat16()  # the correct output, rounded as a bf16 kernel would write it
    assert not mismatches(good, ref, scale, n, torch.bfloat16)
    wrong = good.clone()
    wrong[4321] = (x[4321].double() @ W.double().T).bfloat16()  # one row without its rank-r term
    assert rel_err(wrong, ref) < 2e-2  # what a relative Frobenius check with bf16's tolerance would accept
    bad = mismatches(wrong, ref, scale, n, torch.bfloat16, "y")
    assert bad and bad[0].startswith("y: ") and all("(4321," in line for line in bad[1:])


def test_nan_never_passes_and_only_the_poisoned_element_is_reported():
    ref = torch.randn(5, 7, dtype=torch.float64)
    got = ref.float()
    got[2, 3] = float("nan")
    bad = mismatches(got, ref, ref.abs() + 1, 4, torch.float32)
    assert len(bad) == 2 and "(2, 3)" in bad[1]
    with pytest.raises(AssertionError, match="1 of 35 elements"):
        assert_close(got, ref, ref.abs() + 1, 4, torch.float32)


def _second_derivatives(model, x):
    x = x.requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).pow(2).sum(), model[0].weight, create_graph=True)
    return torch.autograd.grad(g.pow(2).sum(), x)[0]


def test_a_float64_run_with_drawn_roundoff_passes_float32_and_catches_one_wrong_element():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.randn(9, 24)
    got = _second_derivatives(model, x.clone())
    reference = (float64_copy(model), x.double())
    assert_float64_close(got, _second_derivatives, *reference)
    for size in (1e-4, float("nan")):  # a bug-sized error in one element (relative to the largest), and NaN
        wrong = got.clone()
        wrong[4, 7] += size * got.abs().max()
        with pytest.raises(AssertionError, match=r"1 of 216 elements out of tolerance\n  at \(4, 7\)"):
            assert_float64_close(wrong, _second_derivatives, *reference)


def test_roundoff_refuses_an_op_it_has_no_rule_for():
    with pytest.raises(NotImplementedError, match="no rule for aten._linalg_solve_ex"):
        with Roundoff(torch.float32, torch.Generator()):
            torch.linalg.solve(torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))


# ---- 3xTF32 -----------------------------------------------------------------------------------------------------


def _tf32(a):
    """Round fp32 to tf32 (10 explicit mantissa bits), to nearest, ties away: cvt.rna.tf32.f32."""
    bits = a.float().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def test_3xtf32_error_against_float64_is_within_fp32_tolerance():
    """What the kernels compute for fp32 under "highest" (input_precision="tf32x3"): each operand split into
    big = tf32(a) and small = tf32(a - big), and big*big + big*small + small*big accumulated in fp32 (the
    small*small term is dropped). Emulated here, since the interpreter computes any precision as fp32; a
    plain tf32 dot fails the same tolerance, so the test tells the two apart."""
    g = torch.Generator().manual_seed(0)
    M, K, N = 64, 4096, 48
    a, b = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    exact = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    a_big, b_big = _tf32(a), _tf32(b)
    a_small, b_small = _tf32(a - a_big), _tf32(b - b_big)
    x3 = (a_big @ b_big) + (a_big @ b_small) + (a_small @ b_big)  # fp32 products and sums, as the MMAs do
    assert not mismatches(x3, exact, scale, K, torch.float32, "3xtf32")
    assert mismatches(a_big @ b_big, exact, scale, K, torch.float32, "tf32")
    import loldu_triton.kernels.common as common

    default = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert common.precision(torch.float32) == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert common.precision(torch.float32) == "tf32"
        assert common.precision(torch.bfloat16) == "tf32"  # ignored by 2-byte dots
    finally:
        torch.set_float32_matmul_precision(default)


# ---- autotuning spaces -----------------------------------------------------------------------------------------


def test_rank_steps_pad_r_to_a_multiple_of_16_only():
    from loldu_triton.kernels.gemm import rank_step

    for R in (1, 5, 16, 17, 32, 48, 64, 80, 96, 1000, 4096):
        step, prefetch = rank_step(R)
        r16 = math.ceil(R / 16) * 16
        assert step in (16, 32, 64) and r16 % step == 0 and (step == 64 or step == r16 & -r16)
        assert prefetch == (r16 <= 32) and (not prefetch or step == r16)


def _named(**kw):
    meta = dict(device="meta")
    return {"a_ptr": torch.empty(1, dtype=kw.pop("a", torch.bfloat16), **meta),
            "b_ptr": torch.empty(1, dtype=kw.pop("b", torch.bfloat16), **meta),
            "b2_ptr": torch.empty(1, dtype=kw.pop("b2", torch.bfloat16), **meta), **kw}


@pytest.mark.parametrize("arch", [90, 80])
def test_gemm_configs_are_pruned_by_dtype_m_and_shared_memory(arch):
    from loldu_triton.kernels import configs

    pool = configs.GEMM_HALF + configs.GEMM_FP32
    with configs.target(arch):
        limit = configs.smem_limit()
        for a, b in [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.int8), (torch.float32, torch.float32),
                     (torch.bfloat16, torch.float32)]:
            for bucket, per_row in itertools.product((16, 64, 256, 16384), (False, True)):
                kept = configs.prune_gemm(pool + [configs.GEMM_HALF_SMALL], _named(a=a, b=b, b2=b, M_BUCKET=bucket),
                                          LOWRANK=True, R_STEP=64, PER_ROW=per_row)
                assert kept
                assert all(configs.member(c, configs.GEMM_FP32) == (a == torch.float32) for c in kept)
                assert all((c.kwargs["BLOCK_M"] <= 32) == (bucket <= 64) for c in kept)
                # fits, by the estimate compile-check checks (per-row over an fp32 weight on an A100: only
                # the small fallback tile does)
                assert all(configs.gemm_smem(c, a.itemsize, b.itemsize, 64, b.itemsize, per_row) <= limit
                           for c in kept)
    kept = {}
    for target in (90, 80):  # with fp32 weights under bf16 activations, deep pipelines fit Hopper, not an A100
        with configs.target(target):
            kept[target] = configs.prune_gemm(pool, _named(b=torch.float32, M_BUCKET=16384), LOWRANK=False)
    assert set(kept[80]) < set(kept[90])


def test_backward_gemm_is_tuned_apart_from_the_forward():
    from loldu_triton.kernels import gemm

    assert gemm.gemm_fwd is not gemm.gemm_bwd and gemm.gemm_fwd.fn is gemm.gemm_bwd.fn
    assert gemm.gemm_fwd.cache is not gemm.gemm_bwd.cache


# ---- this process, no interpreter ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernels():
    k = importlib.import_module(MODULE)
    if k.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 in the test process: these tests need the GPU code path")
    return k


def _cpu_operands(M=37, K=45, N=29, r=5):
    g = torch.Generator().manual_seed(0)
    x, W, L, U = (torch.randn(*shape, generator=g) for shape in ((M, K), (N, K), (N, r), (r, K)))
    return x, W, torch.randn(N, generator=g), L, U, torch.rand(r, generator=g) + 0.5


def _fake_cuda_operands(dtype, factor_dtype, M=37, K=45, N=29, r=5):
    """Call inside FakeTensorMode: CUDA tensors without a GPU."""
    x, W, b = (torch.empty(*shape, device="cuda", dtype=dtype) for shape in ((M, K), (N, K), (N,)))
    L, U = (torch.empty(*shape, device="cuda", dtype=factor_dtype) for shape in ((N, r), (r, K)))
    return x, W, b, L, U, torch.empty(r, device="cuda", dtype=torch.float32)


def test_cpu_tensors_without_interpreter_raise(kernels):
    x, W, b, L, U, e = _cpu_operands()
    with pytest.raises(RuntimeError, match="Triton kernels need CUDA tensors"):
        kernels.forward(x, W, b, L, U, e)
    with pytest.raises(RuntimeError, match="Triton kernels need CUDA tensors"):
        kernels.backward(torch.randn(37, 29), torch.randn(37, 5), W, L, U, e)
    with pytest.raises(RuntimeError, match="Triton kernels need CUDA tensors"):
        kernels.merge(W, L, U, e)
    assert kernels.available() == torch.cuda.is_available()


def test_fake_tensors_give_shapes_and_dtypes(kernels):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, W, b, L, U, e = _fake_cuda_operands(torch.bfloat16, torch.float32)
        for route in ("side", "merged"):
            y, t = kernels.forward(x, W, b, L, U, e, route=route)
            assert (y.shape, y.dtype, t.shape, t.dtype) == ((37, 29), torch.bfloat16, (37, 5), torch.bfloat16)
            dx, ge = kernels.backward(y, t, W, L, U, e, route=route)
            assert (dx.shape, dx.dtype, ge.shape, ge.dtype) == ((37, 45), torch.bfloat16, (5,), torch.float32)
        w = kernels.merge(W, L, U, e)
        assert (w.shape, w.dtype) == ((29, 45), torch.bfloat16)


def test_triton_ops_decompose_into_the_kernels(kernels):
    """What torch.compile's AOT stage sees: the ops' bodies with every kernel wrapped, nothing opaque."""
    from loldu_triton.kernels.common import triton_op

    if triton_op is None:
        pytest.skip("torch.library.triton_op needs torch >= 2.6")
    try:  # torch internals, stable since 2.6 but not public
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch._subclasses.functional_tensor import dispatch_functionalize
        from torch.fx.experimental.proxy_tensor import make_fx
    except ImportError as err:
        pytest.skip(f"torch internals moved: {err}")

    def f(x, W, b, L, U, e):
        y, t = kernels.forward(x, W, b, L, U, e, route="side")
        dx, ge = kernels.backward(y, t, W, L, U, e, route="merged")
        return y, dx, ge

    # Without a GPU torch cannot compile the kernels to see which pointers they write, and logs that.
    wrap_log = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    level = wrap_log.level
    wrap_log.setLevel(logging.CRITICAL)
    try:
        with FakeTensorMode():
            operands = _fake_cuda_operands(torch.float16, torch.float16)
        gm = make_fx(dispatch_functionalize(f), tracing_mode="fake")(*operands)
    finally:
        wrap_log.setLevel(level)
    assert "loldu_triton" not in gm.code
    idx = re.findall(r"triton_kernel_wrapper_functional\(kernel_idx = (\d+)", gm.code)
    names = [kernel_side_table.get_kernel(int(i)).fn.__name__ for i in idx]
    assert names == ["_shrink_kernel", "_gemm_kernel", "_shrink_kernel", "_merge_kernel", "_gemm_kernel"]


# ---- GPU ---------------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_case(M, K, N, r, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float64) * scale).to(dtype)

    e = torch.randn(r, generator=g, device="cuda")
    e = e + 0.5 * e.sign()  # away from zero
    x, W, b, dy = rnd(M, K), rnd(N, K, scale=K ** -0.5), rnd(N), rnd(M, N)
    return x, W, b, rnd(N, r, scale=r ** -0.5), rnd(r, K, scale=K ** -0.5), e, dy


def _check_all(kernels, dtype, x, W, b, L, U, e, dy, route, poison=False, e_value=None):
    M, K, N = x.shape[0], x.shape[1], W.shape[0]
    nan = dict(device="cuda", dtype=dtype)
    y_out = torch.full((M, N), float("nan"), **nan) if poison else None
    dx_out = torch.full((M, K), float("nan"), **nan) if poison else None
    y, t = kernels.forward(x, W, b, L, U, e, route=route, y_out=y_out)
    dx, ge = kernels.backward(dy, t, W, L, U, e, route=route, dx_out=dx_out)
    ref = references(x, W, b, L, U, e if e_value is None else e_value, dy, t)
    bad = []
    for name, out in (("y", y), ("t", t), ("dx", dx), ("grad_e", ge)):
        bad += mismatches(out, *ref[name], dtype, f"M={M} K={K} N={N} r={L.shape[1]} {route} {name}")
    return bad, ref


# M = 8192 in bf16 only, to keep the autotuning time down (see benchmarks/gpu_check.sh).
LARGE = [(512, r, dtype) for r in (16, 64, 1024) for dtype in (torch.bfloat16, torch.float16, torch.float32)]
LARGE += [(8192, r, torch.bfloat16) for r in (16, 64, 1024)]


@cuda
@pytest.mark.parametrize("M,r,dtype", LARGE, ids=lambda v: str(v).replace("torch.", ""))
def test_gpu_large(kernels, M, r, dtype):
    x, W, b, L, U, e, dy = _gpu_case(M, 4096, 4096, r, dtype)
    x_t = x.t().contiguous().t()  # column-major activations
    bad = []
    for route in ("side", "merged"):
        found, ref = _check_all(kernels, dtype, x_t, W, b, L, U, e, dy, route)
        bad += found
    bad += mismatches(kernels.merge(W, L, U, e), *ref["merge"], dtype, "merge")
    assert not bad, "\n".join(bad)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_decode_odd_shapes_and_poison(kernels, dtype):
    bad = []
    # the decode and odd shapes of compile_check.SHAPES, which benchmarks/gpu_check.sh compiles ahead
    for M, K, N, r in ((1, 4096, 4096, 16), (1, 4096, 4096, 4096), (37, 45, 29, 5), (37, 45, 29, 1)):
        x, W, b, L, U, e, dy = _gpu_case(M, K, N, r, dtype, seed=M)
        for route in ("side", "merged"):
            found, ref = _check_all(kernels, dtype, x, W, b, L, U, e, dy, route, poison=True)
            bad += found
        w_out = torch.full_like(W, float("nan"))
        bad += mismatches(kernels.merge(W, L, U, e, out=w_out), *ref["merge"], dtype, f"merge M={M}")
    assert not bad, "\n".join(bad)


@cuda
def test_gpu_e_at_init_is_exactly_zero_even_compiled():
    """e's formula stays exactly 0 at init where inductor fuses it into FMAs on the GPU."""
    from loldu_triton.core.formulas import delta_diagonal

    d0 = torch.randn(4096, device="cuda") * 3
    s0 = torch.tensor([0.37], device="cuda")
    for fn in (delta_diagonal, torch.compile(delta_diagonal, fullgraph=True)):
        assert torch.equal(fn(d0.clone(), s0.clone(), d0, s0), torch.zeros_like(d0))


@cuda
def test_gpu_torch_compile_fullgraph(kernels):
    x, W, b, L, U, e, dy = _gpu_case(256, 1024, 768, 64, torch.bfloat16)

    def f(x, W, b, L, U, e, dy):
        y, t = kernels.forward(x, W, b, L, U, e)
        dx, ge = kernels.backward(dy, t, W, L, U, e)
        return y, t, dx, ge, kernels.merge(W, L, U, e)

    eager = f(x, W, b, L, U, e, dy)
    compiled = torch.compile(f, fullgraph=True)(x, W, b, L, U, e, dy)
    ref = references(x, W, b, L, U, e, dy, eager[1])
    for name, c in zip(("y", "t", "dx", "grad_e", "merge"), compiled):
        # autotuning may pick other tiles than eager did: both against float64
        assert_close(c, *ref[name], torch.bfloat16, name)
