"""``loldu_linear``: y = x W^T + b + ((x U^T) * e) L^T, with a backward that saves only t = x U^T at low rank.

Two backends share one autograd.Function: "torch" (any device, the reference) and "triton" (the fused kernels
in ``loldu_triton.kernels``). Per call the planner (``loldu_triton.planner``) picks the side path, which never
builds the out x in delta, or, where that is cheaper (many rows, large rank), merging W_eff once for one GEMM;
at high rank also grad_e from dY^T x (x kept instead of t) and forward's W_eff kept for backward.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from .config import check_backend
from .planner import SIDE_STEP, StepPlan, plan, plan_step, plan_step_uncached, plan_uncached
from .quant import QUANTIZED_DTYPES, dequantize


def _kernels():
    from .kernels import loldu_linear as kernels  # imported lazily: triton is optional

    return kernels


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """"auto" takes the Triton kernels for CUDA tensors when triton imports; "triton" never falls back."""
    check_backend(backend, "loldu_linear")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return "torch"
    try:
        _kernels()
    except ImportError as err:
        if backend == "triton":
            raise RuntimeError(f"loldu_linear: backend='triton' needs the triton package ({err})") from err
        return "torch"
    return "triton"


def shrink_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of t = x U^T. float16's range is too small for it: U grows as 1/pivot (up to 2^14), so a
    small pivot makes x U^T overflow even where x W^T does not, and at init inf * (e == 0) would be NaN."""
    return torch.float32 if dtype == torch.float16 else dtype


def _shrink_t(x2, U):
    dtype = shrink_dtype(x2.dtype)
    return F.linear(x2, U) if dtype == x2.dtype else F.linear(x2.to(dtype), U.to(dtype))


def _torch_forward(x2, weight, bias, L, U, e, rows, route, need_t=True):
    """(y, t, W_eff). t = x U^T: the side route computes it for its epilogue, the merged route only where
    backward needs it (at full rank it costs a GEMM). W_eff: the merged route's weight, else None."""
    if rows is None and route == "merged":
        w_eff = _torch_merge(weight, L, U, e)
        return F.linear(x2, w_eff, bias), (_shrink_t(x2, U) if need_t else None), w_eff
    t = _shrink_t(x2, U)
    y = F.linear(x2, weight, bias)
    y.addmm_((t * (e if rows is None else e[rows])).to(y.dtype), L.T)
    return y, t, None


def _outer_grad_e(dy2, x2, L, U):
    """grad_e = diag(L^T (dY^T x) U^T): one N x K GEMM over the rows and an r x N x K product, instead of the
    two M x r GEMMs of sum_rows((x U^T) * (dY L)). Differentiable in dY and x (a double backward needs that)."""
    dtype = shrink_dtype(x2.dtype)  # dY^T x sums M products: fp16 would overflow
    a = dy2.to(dtype).T @ x2.to(dtype)
    acc = torch.promote_types(dtype, torch.float32)  # fp32 accumulation, float64 kept
    return ((L.to(dtype).T @ a).to(acc) * U.to(acc)).sum(1)


def _torch_backward(dy2, t, x2, weight, L, U, e, rows, step, w_eff, need_dx: bool, need_grad_e: bool):
    """(dX, grad_e) by the routes of ``step``; w_eff is forward's merged weight where it was kept (never under
    create_graph: it carries no graph to e)."""
    e_rows = e if rows is None else e[rows]
    v = dy2 @ L if (need_dx and step.backward == "side") or (need_grad_e and step.grad_e == "shrink") else None
    grad_e = None
    if need_grad_e:
        if step.grad_e == "outer":
            grad_e = _outer_grad_e(dy2, x2, L, U)
        else:
            acc = torch.promote_types(t.dtype, torch.float32)  # fp32 accumulation, float64 kept
            tv = t.to(acc) * v.to(acc)
            grad_e = tv.sum(0) if rows is None else torch.zeros_like(e).index_add_(0, rows, tv)
    dx2 = None
    if need_dx:
        if step.backward == "merged":
            dx2 = dy2 @ (w_eff if w_eff is not None else _torch_merge(weight, L, U, e))
        else:
            dx2 = dy2 @ weight
            dx2.addmm_((v * e_rows).to(dx2.dtype), U)
    return dx2, grad_e


def _dense(weight, scale, dtype):
    """The weight the PyTorch path multiplies by: itself, or a quantized one dequantized to ``dtype``."""
    return weight if scale is None else dequantize(weight, scale, dtype)


def _torch_merge(weight, L, U, e):
    acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 accumulation, float64 kept
    return torch.addmm(weight.to(acc), L.to(acc) * e.to(acc), U.to(acc)).to(weight.dtype)


def _step(x2, weight, e, rows, backend, need_dx, need_grad_e) -> StepPlan:
    """The routes of one training call. The Triton path is planned as the kernels plan (GPU, fused epilogue)."""
    if rows is not None:
        return SIDE_STEP
    (N, K), r = weight.shape, e.shape[-1]
    planned = plan_step_uncached if torch.compiler.is_compiling() else plan_step
    if backend == "triton":
        return planned(x2.shape[0], K, N, r, x2.element_size(), "cuda", True, need_dx, need_grad_e)
    return planned(x2.shape[0], K, N, r, x2.element_size(), x2.device.type, False, need_dx, need_grad_e)


def _torch_gemms(step) -> bool:
    """Whether a Triton-backend step runs as PyTorch GEMMs around the merge kernel: keeping W_eff for backward
    and the outer grad_e need no kernel of their own, and the kernels' routes can do neither."""
    return step.keep_merged or step.grad_e == "outer"


def _forward(x2, weight, bias, L, U, e, rows, scale, backend, step=None, need_t=False):
    """(y, t, W_eff) for a 2-D input on either backend. Without a step (no autograd) only y is wanted; with
    one, t where ``need_t`` (the side route computes it anyway) and W_eff where backward keeps it."""
    if backend == "triton":
        kernels = _kernels()
        if rows is not None:
            return (*kernels.forward_rows(x2, weight, bias, L, U, e, rows, scale), None)
        if step is not None and _torch_gemms(step):
            w_eff = kernels.merge(weight, L, U, e, weight_scale=scale)
            return F.linear(x2, w_eff, bias), (_shrink_t(x2, U) if need_t else None), w_eff
        return (*kernels.forward(x2, weight, bias, L, U, e, route=None if step is None else step.forward,
                                 weight_scale=scale), None)
    weight = _dense(weight, scale, x2.dtype)
    (N, K), r = weight.shape, e.shape[-1]
    planned = plan_uncached if torch.compiler.is_compiling() else plan
    route = step.forward if step is not None else planned(x2.shape[0], K, N, r, x2.element_size(),
                                                       x2.device.type, fused_epilogue=False)
    return _torch_forward(x2, weight, bias, L, U, e, rows, route, need_t)


class LoLDULinearFunction(torch.autograd.Function):
    """Returns (y, t). t = x U^T is an output as well as the saved tensor: grad_e = sum(t * dY L) depends on
    x through t, so a double backward (create_graph=True) reaches x through this Function's own backward. On the
    "outer" grad_e route t is None and x itself is saved: that saved input carries its own graph."""

    @staticmethod
    def forward(ctx, x2, weight, bias, L, U, e, rows, scale, backend):
        need_x, need_w, _, _, need_u, need_e = ctx.needs_input_grad[:6]
        step = _step(x2, weight, e, rows, backend, need_x, need_e)
        need_t = step.grad_e == "shrink" or ctx.needs_input_grad[3]  # grad_L = dY^T (t * e)
        y2, t, w_eff = _forward(x2, weight, bias, L, U, e, rows, scale, backend, step, need_t)
        # x itself is kept only for the outer grad_e or a gradient of the frozen weight or U. W_eff is kept
        # where the planner says (an out x in tensor per layer until backward, see loldu_triton.planner).
        keep_x = need_w or need_u or step.grad_e == "outer"
        ctx.save_for_backward(t, weight, L, U, e, rows, scale, x2 if keep_x else None,
                              w_eff if step.keep_merged else None)
        ctx.set_materialize_grads(False)  # dt is None unless something used t: no zero tensor to add
        ctx.backend = backend
        ctx.step = step
        ctx.x_dtype = x2.dtype
        return y2, t

    @staticmethod
    def backward(ctx, dy, dt):
        t, weight, L, U, e, rows, scale, x2, w_eff = ctx.saved_tensors
        need_x, need_w, need_b, need_l, need_u, need_e = ctx.needs_input_grad[:6]
        step = ctx.step
        # Under create_graph the backward itself is differentiated: only PyTorch ops record that graph, and the
        # kept W_eff (built in forward, no graph to e) is built again from e.
        differentiable = torch.is_grad_enabled()
        if differentiable:
            w_eff = None
        dx = grad_w = grad_b = grad_l = grad_u = grad_e = None
        if dy is not None:
            if ctx.backend == "triton" and need_x and not differentiable and not _torch_gemms(step):
                kernels = _kernels()
                dx, grad_e = (kernels.backward(dy, t, weight, L, U, e, route=step.backward, weight_scale=scale)
                              if rows is None else kernels.backward_rows(dy, t, weight, L, U, e, rows, scale))
            else:  # no dX wanted (a first layer): grad_e alone is two small GEMMs, not worth a kernel's dX GEMM
                dense = _dense(weight, scale, dy.dtype) if need_x and w_eff is None else weight
                dx, grad_e = _torch_backward(dy, t, x2, dense, L, U, e, rows, step, w_eff, need_x, need_e)
            e_rows = e if rows is None else e[rows]
            grad_w = (dy.T @ x2).to(weight.dtype) if need_w else None
            grad_b = dy.sum(0) if need_b else None
            grad_l = (dy.T @ (t * e_rows).to(dy.dtype)).to(L.dtype) if need_l else None
            if need_u:
                grad_u = (((dy @ L) * e_rows).to(dy.dtype).T @ x2).to(U.dtype)
        if dt is not None:  # only in a double backward: t = x U^T
            if need_x:
                dx_t = (dt @ U.to(dt.dtype)).to(ctx.x_dtype)
                dx = dx_t if dx is None else dx + dx_t
            if need_u:
                grad_u_t = (dt.T @ x2.to(dt.dtype)).to(U.dtype)
                grad_u = grad_u_t if grad_u is None else grad_u + grad_u_t
        return (dx if need_x else None), grad_w, grad_b, grad_l, grad_u, (grad_e if need_e else None), None, None, None


def check_operands(x, weight, bias, L, U, e, name: str = "loldu_linear", weight_scale=None) -> None:
    out_f, in_f = weight.shape
    if x.dim() == 0:
        raise ValueError(f"{name}: input is a 0-d tensor; a linear layer needs at least one dim of {in_f} features")
    if x.device != weight.device:
        raise ValueError(f"{name}: input is on {x.device}, the layer's weight on {weight.device}")
    rank = e.shape[-1] if e.dim() in (1, 2) else -1
    if x.shape[-1] != in_f:
        raise ValueError(f"{name}: input of shape {tuple(x.shape)} has last dim {x.shape[-1]}, expected {in_f}")
    if e.dim() not in (1, 2) or L.shape != (out_f, rank) or U.shape != (rank, in_f):
        raise ValueError(
            f"{name}: factor shapes L {tuple(L.shape)}, U {tuple(U.shape)}, e {tuple(e.shape)} do not fit "
            f"weight {tuple(weight.shape)} (want L (out, r), U (r, in), e (r,))"
        )
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"{name}: bias of shape {tuple(bias.shape)} does not fit weight {tuple(weight.shape)}")
    if weight_scale is not None:
        if weight.dtype not in QUANTIZED_DTYPES or weight_scale.shape != (out_f,):
            raise ValueError(f"{name}: a quantized weight is int8 or float8_e4m3fn with one scale per output "
                             f"row; got {weight.dtype} and scale of shape {tuple(weight_scale.shape)}")
        if x.dtype != L.dtype:
            raise ValueError(f"{name}: input dtype {x.dtype} differs from the layer's compute dtype {L.dtype}")
    elif x.dtype != weight.dtype:
        raise ValueError(f"{name}: input dtype {x.dtype} differs from weight dtype {weight.dtype}")


def check_rows(rows, e: torch.Tensor, m: int, device: torch.device, name: str) -> None:
    """rows must pick a row of the (adapters, r) table e for each of the m input rows; out-of-range indices
    would read other memory in a kernel. (Costs a host sync on GPU: layers build their rows themselves.)"""
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.shape != (m,):
        got = f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"{name}: rows must be an int64 tensor of shape ({m},), one per input row; got {got}")
    if rows.device != device:
        raise ValueError(f"{name}: rows is on {rows.device}, the input on {device}")
    if m and (int(rows.min()) < 0 or int(rows.max()) >= e.shape[0]):
        raise ValueError(f"{name}: rows must be in [0, {e.shape[0]}) (the table has {e.shape[0]} adapters); "
                         f"got values in [{int(rows.min())}, {int(rows.max())}]")


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def loldu_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    L: torch.Tensor,
    U: torch.Tensor,
    e: torch.Tensor,
    backend: str = "auto",
    *,
    rows: Optional[torch.Tensor] = None,
    weight_scale: Optional[torch.Tensor] = None,
    name: str = "loldu_linear",
) -> torch.Tensor:
    """``x (W + L diag(e) U)^T + b`` without building the out x in delta.

    x: (..., in); weight: (out, in); bias: (out,) or None; L: (out, r); U: (r, in); e: (r,) float32.
    backend: "auto" (Triton kernels for CUDA tensors, else PyTorch), "torch", or "triton" (never falls back).
    rows: many adapters in one batch. Then e is an (adapters, r) float32 table and rows an int64 tensor with
        one entry per row of x flattened to (M, in): row m uses e[rows[m]]. Always the side path.
    weight_scale: weight is quantized (int8 or float8_e4m3fn values of W / weight_scale[:, None], see
        loldu_triton.quant); the compute dtype is then L's.
    name: how errors refer to the caller (a layer's name).
    Under torch.autocast the operands are cast to the autocast dtype, as F.linear's are; e stays float32.
    """
    if (rows is None) != (e.dim() == 1):
        raise ValueError(f"{name}: pass e of shape (r,), or an (adapters, r) table together with rows")
    if rows is not None and x.dim() > 0:
        check_rows(rows, e, x.shape[:-1].numel(), x.device, name)
    return _loldu_linear(x, weight, bias, L, U, e, backend, rows, weight_scale, name)


def _loldu_linear(x, weight, bias, L, U, e, backend, rows, weight_scale, name):
    """loldu_linear with rows already known to be valid (a layer builds them)."""
    device_type = x.device.type
    autocast_off = contextlib.nullcontext()
    dtype = _autocast_dtype(device_type)
    if dtype is not None:
        x, L, U = (t.to(dtype) for t in (x, L, U))
        weight = weight if weight_scale is not None else weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        autocast_off = torch.autocast(device_type, enabled=False)
    check_operands(x, weight, bias, L, U, e, name, weight_scale)
    # Reshapes stay outside the Function: an output that is a view made inside it could not be modified in
    # place (ReLU(inplace=True), y += residual). A 2-D input gets its output itself, not a view, as from
    # nn.Linear: FSDP2 misses an in-place op on a view and frees the weight before backward.
    operands = (x.reshape(-1, x.shape[-1]), weight, bias, L, U, e, rows, weight_scale, resolve_backend(backend, x))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, L, U, e))
    with autocast_off:
        # Without autograd (inference, decode) the custom Function's own overhead is skipped.
        y2 = LoLDULinearFunction.apply(*operands)[0] if needs_grad else _forward(*operands)[0]
    return y2 if x.dim() == 2 else y2.reshape(*x.shape[:-1], y2.shape[-1])


def loldu_merge(weight: torch.Tensor, L: torch.Tensor, U: torch.Tensor, e: torch.Tensor, backend: str = "auto",
                weight_scale: Optional[torch.Tensor] = None):
    """``W + L diag(e) U`` in weight's dtype (L's for a quantized weight), accumulated in float32."""
    if resolve_backend(backend, weight) == "triton":
        return _kernels().merge(weight, L, U, e, weight_scale=weight_scale)
    return _torch_merge(_dense(weight, weight_scale, L.dtype), L, U, e)
