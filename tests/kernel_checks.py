"""Element-by-element comparison of kernel outputs with a float64 reference, shared by the interpreter tests
(tests/interpreted) and the GPU tests.

Each element's tolerance scales with the terms it sums, not with the output (terms cancel: rank-1 grad_e
does): with S = the same sum over absolute values (|x| |W|^T + |t| |e| |L|^T + |b| for y, ...) and n terms,

    tol = eps(dtype) * (C * S / sqrt(n) + |ref|) + eps(fp32) * sqrt(n) * S

- eps(fp32) * sqrt(n) * S: the fp32 accumulator's rounding over n terms (the probabilistic bound);
- eps(dtype) * C * S / sqrt(n): each term rounded a few times in the dtype (fp32 factors cast to bf16, t and
  t * e rounded before their dot, 3xTF32 dropping the low-by-low product); S / n is the typical term and
  independent errors of n terms add up like sqrt(n);
- eps(dtype) * |ref|: the rounding of the output itself.
For fp32 the first term dominates; for bf16/fp16 the second, which stays small against a wrong element
(a whole term missing is ~S / sqrt(n), C * eps larger). NaN never passes.
"""
import math

import torch

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
       torch.bfloat16: torch.finfo(torch.bfloat16).eps}
C = {torch.float32: 8.0, torch.float16: 8.0, torch.bfloat16: 8.0}
NAN = float("nan")


def mismatches(actual, ref, scale, n, dtype, name="", limit=5):
    """Descriptions of the worst elements outside tolerance (empty if none). ref, scale: float64 tensors of
    actual's shape; n: the number of terms each element sums; dtype: the precision the kernel ran in."""
    actual, ref, scale = actual.detach().double(), ref.double().to(actual.device), scale.double().to(actual.device)
    if actual.shape != ref.shape:
        return [f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"]
    n = max(n, 1)
    tol = EPS[dtype] * (C[dtype] * scale / math.sqrt(n) + ref.abs()) + EPS[torch.float32] * math.sqrt(n) * scale
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
        "merge": (W + (Lf * E) @ Uf, aW + (aL * aE) @ aU, r + 1),
    }


def poisoned(rows, cols, dtype, device="cpu"):
    """A NaN-filled (rows, cols) view inside a larger NaN buffer, to catch unwritten and out-of-bounds elements."""
    buf = torch.full((rows + 2, cols + 3), NAN, dtype=dtype, device=device)
    return buf, buf[1:rows + 1, 2:cols + 2]


def poison_intact(buf, view):
    """(every element of view written, nothing outside it touched)."""
    inside = torch.zeros(buf.shape, dtype=torch.bool, device=buf.device)
    inside[1:view.shape[0] + 1, 2:view.shape[1] + 2] = True
    return not bool(view.isnan().any()), bool(buf[~inside].isnan().all())
