"""Element-by-element comparison with a float64 reference, the one helper every numerics test uses: the kernel
tests here, tests/interpreted and the GPU tests (a kernel's output against ``references``), and the tests of
whole models, training steps and second derivatives (``assert_float64_close``).

Each element's tolerance scales with the terms it sums, not with the output (terms cancel: rank-1 grad_e
does): with S = the same sum over absolute values (|x| |W|^T + |t| |e| |L|^T + |b| for y, ...) and n terms,

    tol = eps(dtype) * (C * S / sqrt(n) + |ref|) + eps(acc) * sqrt(n) * S

- eps(acc) * sqrt(n) * S: the accumulator's rounding over n terms (the probabilistic bound); the accumulator is
  fp32 for fp32/bf16/fp16 and float64 for float64;
- eps(dtype) * C * S / sqrt(n): each term rounded a few times in the dtype (fp32 factors cast to bf16, t and
  t * e rounded before their dot, 3xTF32 dropping the low-by-low product); S / n is the typical term and
  independent errors of n terms add up like sqrt(n);
- eps(dtype) * |ref|: the rounding of the output itself.
For fp32 the first term dominates; for bf16/fp16 the second, which stays small against a wrong element
(a whole term missing is ~S / sqrt(n), C * eps larger). NaN never passes.

A whole model (or a training run, or a second derivative) is many such sums, each one's error carried through
the rest. ``assert_float64_close`` runs the computation in float64 once for the reference, then DRAWS more
times with every op's result moved at random by up to that op's own tolerance above (contractions and sums by
the formula, one rounding for an element-wise op); the largest move of each element over the draws, times
SAFETY, is its tolerance. That is Monte Carlo arithmetic: the spread another CPU's roundoff could give, per
element, wherever it comes from, without a fixed atol.
"""
import copy
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

EPS = {dtype: torch.finfo(dtype).eps for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
C = 8.0
# The largest move of 8 draws falls under a fraction a of its typical size with probability ~(0.8 a)^8; a float32
# run's error sat at a median 0.025 and at most 0.43 of it over 18k Llama logits (6 seeds): 8x leaves room.
DRAWS = 8
SAFETY = 8.0
NAN = float("nan")


def tolerance(ref, scale, n, dtype):
    """The per-element tolerance above for a result of ``dtype`` summing n terms of magnitude ``scale``."""
    n = max(n, 1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return EPS[dtype] * (C * scale / math.sqrt(n) + ref.abs()) + EPS[acc] * math.sqrt(n) * scale


def outside(actual, ref, tol, name="", limit=5):
    """Descriptions of the worst elements with |actual - ref| > tol (empty if none); NaN never passes."""
    actual = actual.detach().double()
    ref, tol = ref.double().to(actual.device), tol.double().to(actual.device)
    if actual.shape != ref.shape:
        return [f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"]
    tol = tol + 1e-300
    err = (actual - ref).abs()
    bad = ~(err <= tol)  # NaN compares false: fails
    if not bad.any():
        return []
    ratio = torch.where(bad, torch.nan_to_num(err / tol, nan=float("inf")), torch.zeros_like(err))
    worst = ratio.flatten().topk(min(limit, int(bad.sum()))).indices.cpu()
    actual, ref, tol = actual.cpu(), ref.cpu(), tol.cpu()
    out = [f"{name}: {int(bad.sum())} of {bad.numel()} elements out of tolerance"]
    for flat in worst.tolist():
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), actual.shape))
        out.append(f"  at {idx}: got {actual[idx].item():.6g}, want {ref[idx].item():.6g}, "
                   f"tol {tol[idx].item():.3g}")
    return out


def mismatches(actual, ref, scale, n, dtype, name="", limit=5):
    """Descriptions of the worst elements outside tolerance (empty if none). ref, scale: float64 tensors of
    actual's shape; n: the number of terms each element sums; dtype: the precision the kernel ran in."""
    ref, scale = ref.double(), scale.double()
    return outside(actual, ref, tolerance(ref, scale.to(ref.device), n, dtype), name, limit)


def assert_close(actual, ref, scale, n, dtype, name=""):
    bad = mismatches(actual, ref, scale, n, dtype, name)
    assert not bad, "\n".join(bad)


def references(x, weight, bias, L, U, e, dy, t=None):
    """Float64 references and their scales (sum of |terms|) and lengths for y, t, dx, grad_e and the merge, on
    x's device. t: the t the kernel returned (the backward's grad_e sums the t it was given)."""
    X, W, Lf, Uf, E, dY = (a.detach().double().to(x.device) for a in (x, weight, L, U, e, dy))
    B = bias.detach().double() if bias is not None else torch.zeros(W.shape[0], dtype=torch.float64, device=x.device)
    T = X @ Uf.T
    V = dY @ Lf
    Tk = t.detach().double() if t is not None else T
    aX, aW, aL, aU, aE, adY, aT = (a.abs() for a in (X, W, Lf, Uf, E, dY, T))
    K, N, r = X.shape[1], W.shape[0], Uf.shape[0]
    M = X.shape[0]
    return {
        "y": (X @ W.T + (T * E) @ Lf.T + B, aX @ aW.T + (aT * aE) @ aL.T + B.abs(), K + r + 1),
        "t": (T, aX @ aU.T, K),
        "dx": (dY @ W + (V * E) @ Uf, adY @ aW + ((adY @ aL) * aE) @ aU, N + r),
        "grad_e": ((Tk * V).sum(0), (Tk.abs() * (adY @ aL)).sum(0), M * N),
        "merge": merge_reference(weight, L, U, e),
    }


def merge_reference(weight, L, U, e):
    """W + L diag(e) U in float64, its scale |W| + |L| |e| |U| and length, for a 2-D weight."""
    W, Lf, Uf, E = (a.detach().double().to(weight.device) for a in (weight, L, U, e))
    return W + (Lf * E) @ Uf, W.abs() + (Lf.abs() * E.abs()) @ Uf.abs(), Uf.shape[0] + 1


def assert_linear_close(y, x, weight, bias, L, U, e, name="y"):
    """A LoLDU linear output of any leading dims against float64 (y = x W^T + b + ((x U^T) e) L^T), in y's dtype;
    weight: the dense (dequantized) base. The scale |x| (|W| + |L| |e| |U|)^T + |b| holds for either route (side,
    or through the merged weight)."""
    X, W, Lf, Uf, E = (a.detach().double() for a in (x.reshape(-1, x.shape[-1]), weight, L, U, e))
    B = bias.detach().double() if bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    ref = X @ (W + (Lf * E) @ Uf).T + B
    scale = X.abs() @ (W.abs() + (Lf.abs() * E.abs()) @ Uf.abs()).T + B.abs()
    assert_close(y.reshape(ref.shape), ref, scale, X.shape[1] + Uf.shape[0] + 1, y.dtype, name)


def poisoned(rows, cols, dtype, device="cpu"):
    """A NaN-filled (rows, cols) view inside a larger NaN buffer, to catch unwritten and out-of-bounds elements."""
    buf = torch.full((rows + 2, cols + 3), NAN, dtype=dtype, device=device)
    return buf, buf[1:rows + 1, 2:cols + 2]


def poison_intact(buf, view):
    """(every element of view written, nothing outside it touched)."""
    inside = torch.zeros(buf.shape, dtype=torch.bool, device=buf.device)
    inside[1:view.shape[0] + 1, 2:view.shape[1] + 2] = True
    return not bool(view.isnan().any()), bool(buf[~inside].isnan().all())


# ---- whole computations: float64 runs with each op's roundoff drawn at random -------------------------------

aten = torch.ops.aten


def _float(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _mm_like(op, k_of):
    """A contraction: S = the op on absolute values (beta/alpha too), n = its inner length (+1 for an addend)."""
    def rule(args, kwargs):
        absed = [a.abs() if _float(a) else abs(a) if isinstance(a, (int, float)) else a for a in args]
        absed_kw = {k: abs(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                    for k, v in kwargs.items()}
        return [(op(*absed, **absed_kw), k_of(args))]
    return rule


def _reduction(op, n_of=None):
    """A sum over elements: S = the same reduction of |x|; n = how many elements each result sums."""
    def rule(args, kwargs):
        s = op(args[0].abs(), *args[1:], **kwargs)
        n = n_of(args, kwargs) if n_of else max(1, args[0].numel() // max(1, s.numel()))
        return [(s, n)]
    return rule


def _conv(args, kwargs):
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = args
    s = aten.convolution(x.abs(), w.abs(), None if b is None else b.abs(), stride, padding, dilation, transposed,
                         output_padding, groups)
    n = (w.shape[0] // groups if transposed else w.shape[1]) * math.prod(w.shape[2:]) + 1
    return [(s, n)]


def _conv_backward(args, kwargs):
    g, x, w = args[:3]
    transposed, groups = args[7], args[9]
    outs = aten.convolution_backward(g.abs(), x.abs(), w.abs(), *args[3:])
    spatial = g.shape[0] * math.prod(g.shape[2:])
    n_in = (w.shape[1] if transposed else w.shape[0] // groups) * math.prod(w.shape[2:])
    return [(outs[0], n_in), (outs[1], spatial), (outs[2], spatial)]


def _softmax(args, kwargs):  # exp(x - max) / sum: positive terms, no cancellation
    x, dim = args[0], args[1]
    return [("out", x.shape[dim] if x.dim() else 1)]


def _log_softmax(args, kwargs):  # x - max - log(sum exp): the terms' size, not the result's
    x, dim = args[0], args[1]
    return [(x.abs() + torch.logsumexp(x, dim, keepdim=True).abs(), x.shape[dim] if x.dim() else 1)]


def _softmax_backward(args, kwargs):  # p * (g - sum(p g))
    g, p, dim = args[:3]
    return [(p.abs() * (g.abs() + (p.abs() * g.abs()).sum(dim, keepdim=True)), g.shape[dim] if g.dim() else 1)]


def _log_softmax_backward(args, kwargs):  # g - exp(out) sum(g)
    g, out, dim = args[:3]
    return [(g.abs() + out.exp() * g.abs().sum(dim, keepdim=True), g.shape[dim] if g.dim() else 1)]


def _nll_loss(args, kwargs):  # a mean of picked log-probabilities (one sign): no cancellation
    x = args[0]
    return [("out", x.shape[0] if x.dim() > 1 else 1), None]


def _embedding_backward(args, kwargs):  # the rows of grad summed per index
    g, indices = args[0], args[1]
    return [(aten.embedding_dense_backward(g.abs(), *args[1:]), indices.numel())]


def _index_add(args, kwargs):
    self, dim, index, source = args[:4]
    return [(aten.index_add(self.abs(), dim, index, source.abs()), index.numel() + 1)]


def _index_put(args, kwargs):  # with accumulate=True, a sum per index; else a copy
    self, indices, values = args[:3]
    if not kwargs.get("accumulate", args[3] if len(args) > 3 else False):
        return [None]
    return [(aten.index_put(self.abs(), indices, values.abs(), True), values.numel() + 1)]


def _layer_norm(args, kwargs):
    x, shape, w, b = args[:4]
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    mean = x.mean(dims, keepdim=True)
    rstd = (x.var(dims, unbiased=False, keepdim=True) + args[4]).rsqrt()
    s = (x.abs() + mean.abs()) * rstd
    if w is not None:
        s = s * w.abs()
    if b is not None:
        s = s + b.abs()
    n = math.prod(shape)
    return [(s, n), ("out", n), ("out", n)]


# Element-wise ops that round more than once (compound): their terms' size, not the result's.
def _addcmul(args, kwargs):
    self, t1, t2 = args[:3]
    value = abs(kwargs.get("value", args[3] if len(args) > 3 else 1))
    return [(self.abs() + value * t1.abs() * t2.abs(), 2)]


def _addcdiv(args, kwargs):
    self, t1, t2 = args[:3]
    value = abs(kwargs.get("value", args[3] if len(args) > 3 else 1))
    return [(self.abs() + value * t1.abs() / t2.abs(), 2)]


def _lerp(args, kwargs):
    start, end, weight = args[:3]
    weight = weight.abs() if isinstance(weight, torch.Tensor) else abs(weight)
    return [(start.abs() + weight * (end.abs() + start.abs()), 2)]


def _tanh_backward(args, kwargs):  # g * (1 - y^2)
    g, y = args[:2]
    return [(g.abs() * (1 + y * y), 2)]


def _silu_backward(args, kwargs):  # g * sigmoid(x) * (1 + x * (1 - sigmoid(x)))
    g, x = args[:2]
    sig = torch.sigmoid(x)
    return [(g.abs() * sig * (1 + x.abs() * (1 - sig)), 2)]


def _gelu_backward(args, kwargs):  # g * (Phi(x) + x phi(x))
    g, x = args[:2]
    phi = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return [(g.abs() * (0.5 * (1 + torch.erf(x.abs() / math.sqrt(2))) + x.abs() * phi), 2)]


RULES = {
    aten.mm: _mm_like(aten.mm, lambda a: a[0].shape[-1]),
    aten.bmm: _mm_like(aten.bmm, lambda a: a[0].shape[-1]),
    aten.mv: _mm_like(aten.mv, lambda a: a[0].shape[-1]),
    aten.dot: _mm_like(aten.dot, lambda a: a[0].shape[-1]),
    aten.addmm: _mm_like(aten.addmm, lambda a: a[1].shape[-1] + 1),
    aten.addmm_: _mm_like(aten.addmm, lambda a: a[1].shape[-1] + 1),
    aten.baddbmm: _mm_like(aten.baddbmm, lambda a: a[1].shape[-1] + 1),
    aten.addmv: _mm_like(aten.addmv, lambda a: a[1].shape[-1] + 1),
    aten.convolution: _conv,
    aten.convolution_backward: _conv_backward,
    aten.sum: _reduction(aten.sum),
    aten.mean: _reduction(aten.mean),
    aten.cumsum: _reduction(aten.cumsum, lambda a, k: a[0].shape[a[1]] if a[0].dim() else 1),
    aten.linalg_vector_norm: lambda a, k: [("out", a[0].numel())],
    aten._softmax: _softmax,
    aten._log_softmax: _log_softmax,
    aten._softmax_backward_data: _softmax_backward,
    aten._log_softmax_backward_data: _log_softmax_backward,
    aten.nll_loss_forward: _nll_loss,
    aten.embedding_dense_backward: _embedding_backward,
    aten.index_add: _index_add,
    aten.index_add_: _index_add,
    aten.index_put: _index_put,
    aten.index_put_: _index_put,
    aten._index_put_impl_: _index_put,
    aten.native_layer_norm: _layer_norm,
    aten.addcmul: _addcmul,
    aten.addcmul_: _addcmul,
    aten.addcdiv: _addcdiv,
    aten.addcdiv_: _addcdiv,
    aten.lerp: _lerp,
    aten.lerp_: _lerp,
    aten.tanh_backward: _tanh_backward,
    aten.silu_backward: _silu_backward,
    aten.gelu_backward: _gelu_backward,
}
# Exact: they move, pick or compare values, or make new ones, and round nothing.
EXACT = {
    aten.clone, aten.copy_, aten._to_copy, aten.cat, aten.stack, aten.index, aten.index_select, aten.gather,
    aten.scatter, aten.embedding, aten.masked_fill, aten.masked_fill_, aten.where, aten.fill_, aten.zero_,
    aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.new_zeros, aten.new_ones, aten.new_empty,
    aten.new_full, aten.zeros, aten.ones, aten.empty, aten.full, aten.arange, aten.scalar_tensor, aten.empty_strided,
    aten.constant_pad_nd, aten.flip, aten.roll, aten.repeat, aten.tril, aten.triu, aten.max, aten.min, aten.amax,
    aten.amin, aten.maximum, aten.minimum, aten.clamp, aten.clamp_min, aten.clamp_max, aten.relu, aten.relu_,
    aten.threshold_backward, aten.neg, aten.abs, aten.sign, aten.slice_scatter, aten.select_scatter,
    aten.scatter_, aten.lift_fresh, aten.lift_fresh_copy, aten.detach, aten.alias,
    aten._unsafe_view, aten.expand_copy, aten.sort, aten.topk, aten.nll_loss_backward, aten.nonzero,
    aten._local_scalar_dense, aten.isnan, aten.isinf, aten.isfinite, aten.set_, aten.resize_, aten.bernoulli_,
    aten.slice_backward, aten.select_backward, aten.diagonal_backward, aten.as_strided_scatter, aten.unfold_backward,
    aten.diag_embed, aten.diagonal_copy, aten.new_empty_strided,
    aten.uniform_, aten.normal_, aten.random_, aten.randn, aten.rand, aten.randint, aten.randperm,
}
# Any other element-wise op (torch.Tag.pointwise) rounds its result once: eps(dtype) * |out|.


class Roundoff(TorchDispatchMode):
    """Runs float64 ops as they are, then moves each floating result by up to its tolerance in ``dtype``
    (uniformly at random, from ``generator``). Raises on an op it has no rule for: a silent zero would make the
    tolerance too tight."""

    def __init__(self, dtype, generator):
        super().__init__()
        self.dtype, self.generator = dtype, generator

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if func.is_view or packet in EXACT or not any(_float(t) for t in tree_flatten(args)[0]):
            return func(*args, **kwargs)
        rule = RULES.get(packet)
        if rule is None and torch.Tag.pointwise not in func.tags:
            raise NotImplementedError(f"Roundoff has no rule for {func}: add it to kernel_checks.RULES or EXACT")
        scales = rule(args, kwargs) if rule is not None else None  # before the op: it may be in place
        out = func(*args, **kwargs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if scales is None:
            scales = [("out", 1)] * len(outs)
        for o, sn in zip(outs, scales):
            if sn is None or not _float(o) or o.dtype != torch.float64:
                continue
            s, n = sn
            s = o.abs() if isinstance(s, str) else s.expand_as(o)
            tol = tolerance(o, s, n, self.dtype) if rule is not None else EPS[self.dtype] * o.abs()
            u = torch.rand(o.shape, generator=self.generator, dtype=torch.float64, device=o.device) * 2 - 1
            o.add_(torch.where(torch.isfinite(tol), tol * u, torch.zeros_like(tol)))
        return out


def _leaves(tree):
    return [t.detach().double() for t in tree_flatten(tree)[0]]


def float64_spread(fn, *args, dtype=torch.float32, draws=DRAWS, seed=0):
    """(references, spreads): the tensors fn(*args) returns, args being float64 models and tensors, and per
    element the largest move over ``draws`` runs under Roundoff. Each run gets a deep copy of args (made
    outside the mode: only fn's own arithmetic is perturbed), so fn may train a model in place."""
    ref = _leaves(fn(*copy.deepcopy(args)))
    spread = [torch.zeros_like(r) for r in ref]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(draws):
        fresh = copy.deepcopy(args)
        with Roundoff(dtype, generator):
            got = _leaves(fn(*fresh))
        for s, g, r in zip(spread, got, ref):
            torch.maximum(s, torch.nan_to_num((g - r).abs(), nan=float("inf")), out=s)
    return ref, spread


class Float64Reference:
    """fn(*args) on float64 models and tensors, run once plain and DRAWS times under Roundoff (see
    float64_spread); assert_close checks a result of the same computation in ``dtype`` against it,
    |actual - ref| <= SAFETY * spread element by element. One reference serves several candidates."""

    def __init__(self, fn, *args, dtype=torch.float32, draws=DRAWS):
        self.ref, self.spread = float64_spread(fn, *args, dtype=dtype, draws=draws)

    def mismatches(self, actual, name=""):
        got = tree_flatten(actual)[0]
        if len(got) != len(self.ref):
            return [f"{name}: {len(got)} tensors against {len(self.ref)}"]
        bad = []
        for i, (g, r, s) in enumerate(zip(got, self.ref, self.spread)):
            bad += outside(g, r, SAFETY * s, f"{name}[{i}]" if len(got) > 1 else name)
        return bad

    def assert_close(self, actual, name=""):
        bad = self.mismatches(actual, name)
        assert not bad, "\n".join(bad)


def assert_float64_close(actual, fn, *args, dtype=torch.float32, name="", draws=DRAWS):
    """Each tensor of ``actual`` (a tensor or a list/tuple/dict of them) against the same of fn(*args), the same
    computation on float64 models and tensors (see Float64Reference). dtype: the precision ``actual`` was
    computed in."""
    Float64Reference(fn, *args, dtype=dtype, draws=draws).assert_close(actual, name)


def float64_copy(model):
    """A deep copy of ``model`` for a float64 reference run: every floating parameter and buffer in float64 (the
    adapter's float32 d and s too), LoLDU layers on the PyTorch backend, Hugging Face attention in plain ops
    (Roundoff has rules for those, not for the fused attention kernels)."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    for module in model.modules():
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None and t.is_floating_point() and t.dtype.itemsize > 1:  # a quantized base stays
                t.data = t.data.double()
        if isinstance(getattr(module, "backend", None), str):
            module.backend = "torch"
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    return model
