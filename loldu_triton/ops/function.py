"""The autograd Function of a LoLDU linear call, y = x W^T + b + ((x U^T) * e) L^T, on either backend:
"torch" (any device, the reference) or "triton" (the fused kernels of ``loldu_triton.kernels``).

Per call the planner (factors.planner) picks the side path, which never builds the out x in delta, or, where
that is cheaper (many rows, large rank), merging W_eff once for one GEMM; at high rank also grad_e from dY^T x
(x kept instead of t) and forward's W_eff kept for backward. The formulas are core.formulas'.

Dropout on the adapter's input: the caller passes x_side = dropout(x) (autograd records the mask there). The
shrink then reads x_side and the base GEMM x (planner.DROPOUT_STEP); backward returns dY W for x and the
rank-r term's gradient (v * e) U for x_side. Without x_side every route is as before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.formulas import accumulation_dtype, add_side_term, merged_weight, shrink_dtype, side_term
from ..factors.planner import DROPOUT_STEP, SIDE_STEP, StepPlan, plan, plan_step
from ..factors.quant import dense_weight


def kernels():
    """The Triton kernels' entry points, imported on first use: triton is optional."""
    from ..kernels import launch

    return launch


def shrink(x2, U):
    """t = x U^T in shrink_dtype."""
    dtype = shrink_dtype(x2.dtype)
    return F.linear(x2, U) if dtype == x2.dtype else F.linear(x2.to(dtype), U.to(dtype))


def torch_forward(x2, weight, bias, L, U, e, rows, route, need_t=True, x_side=None):
    """(y, t, W_eff). t = x U^T: the side route computes it for its epilogue, the merged route only where
    backward needs it (at full rank it costs a GEMM). W_eff: the merged route's weight, else None. x_side: the
    shrink's input where it is not x (dropout; the side route only)."""
    if rows is None and route == "merged":
        w_eff = merged_weight(weight, L, U, e)
        return F.linear(x2, w_eff, bias), (shrink(x2, U) if need_t else None), w_eff
    t = shrink(x2 if x_side is None else x_side, U)
    y = F.linear(x2, weight, bias)
    add_side_term(y, t, e if rows is None else e[rows], L.T)
    return y, t, None


def outer_grad_e(dy2, x2, L, U):
    """grad_e = diag(L^T (dY^T x) U^T): one N x K GEMM over the rows and an r x N x K product, instead of the
    two M x r GEMMs of sum_rows((x U^T) * (dY L)). Differentiable in dY and x (a double backward needs that)."""
    dtype = shrink_dtype(x2.dtype)  # dY^T x sums M products: fp16 would overflow
    a = dy2.to(dtype).T @ x2.to(dtype)
    acc = accumulation_dtype(dtype)
    return ((L.to(dtype).T @ a).to(acc) * U.to(acc)).sum(1)


def torch_backward(dy2, t, x2, weight, L, U, e, rows, step, w_eff, need_dx: bool, need_grad_e: bool,
                   need_side: bool = False):
    """(dX, grad_e, d x_side) by the routes of ``step``; w_eff is forward's merged weight where it was kept
    (never under create_graph: it carries no graph to e). d x_side = (v * e) U, on the "base" route only."""
    e_rows = e if rows is None else e[rows]
    need_v = (need_dx and step.backward == "side") or need_side or (need_grad_e and step.grad_e == "shrink")
    v = dy2 @ L if need_v else None
    grad_e = None
    if need_grad_e:
        if step.grad_e == "outer":
            grad_e = outer_grad_e(dy2, x2, L, U)
        else:
            acc = accumulation_dtype(t.dtype)
            tv = t.to(acc) * v.to(acc)
            grad_e = tv.sum(0) if rows is None else torch.zeros_like(e).index_add_(0, rows, tv)
    dx2 = None
    if need_dx:
        if step.backward == "merged":
            dx2 = dy2 @ (w_eff if w_eff is not None else merged_weight(weight, L, U, e))
        elif step.backward == "base":
            dx2 = dy2 @ weight
        else:
            dx2 = add_side_term(dy2 @ weight, v, e_rows, U)
    return dx2, grad_e, (side_term(v, e_rows, U, dy2.dtype) if need_side else None)


def _step(x2, weight, e, rows, backend, need_dx, need_grad_e) -> StepPlan:
    """The routes of one training call. The Triton path is planned as the kernels plan (GPU, fused epilogue)."""
    if rows is not None:
        return SIDE_STEP
    (N, K), r = weight.shape, e.shape[-1]
    if backend == "triton":
        return plan_step(x2.shape[0], K, N, r, x2.element_size(), "cuda", True, need_dx, need_grad_e)
    return plan_step(x2.shape[0], K, N, r, x2.element_size(), x2.device.type, False, need_dx, need_grad_e)


def _torch_gemms(step) -> bool:
    """Whether a Triton-backend step runs as PyTorch GEMMs around the merge kernel: keeping W_eff for backward
    and the outer grad_e need no kernel of their own, and the kernels' routes can do neither."""
    return step.keep_merged or step.grad_e == "outer"


def forward_2d(x2, weight, bias, L, U, e, rows, scale, backend, step=None, need_t=False, x_side=None):
    """(y, t, W_eff) for a 2-D input on either backend. Without a step (no autograd) only y is wanted; with
    one, t where ``need_t`` (the side route computes it anyway) and W_eff where backward keeps it. x_side:
    dropout(x), the rank-r path's input, or None (x itself)."""
    if step is None and x_side is not None:
        step = DROPOUT_STEP
    if backend == "triton":
        launch = kernels()
        if rows is not None:
            return (*launch.run_forward_rows(x2, weight, bias, L, U, e, rows, scale, x_side=x_side), None)
        if step is not None and _torch_gemms(step):
            w_eff = launch.run_merge(weight, L, U, e, weight_scale=scale)
            return F.linear(x2, w_eff, bias), (shrink(x2, U) if need_t else None), w_eff
        if x_side is not None:
            return (*launch.run_forward(x2, weight, bias, L, U, e, route="side", weight_scale=scale,
                                        x_side=x_side), None)
        return (*launch.run_forward(x2, weight, bias, L, U, e, route=None if step is None else step.forward,
                                    weight_scale=scale), None)
    weight = dense_weight(weight, scale, x2.dtype)
    (N, K), r = weight.shape, e.shape[-1]
    route = step.forward if step is not None else plan(x2.shape[0], K, N, r, x2.element_size(),
                                                       x2.device.type, fused_epilogue=False)
    return torch_forward(x2, weight, bias, L, U, e, rows, route, need_t, x_side)


class LoLDULinearFunction(torch.autograd.Function):
    """Returns (y, t). t = x U^T is an output as well as the saved tensor: grad_e = sum(t * dY L) depends on
    x through t, so a double backward (create_graph=True) reaches x through this Function's own backward. On the
    "outer" grad_e route t is None and x itself is saved: that saved input carries its own graph. With x_side
    (dropout(x)), t = x_side U^T and x_side gets the rank-r term's gradients."""

    @staticmethod
    def forward(ctx, x2, weight, bias, L, U, e, rows, scale, backend, x_side=None):
        need_x, need_w, _, _, need_u, need_e = ctx.needs_input_grad[:6]
        step = DROPOUT_STEP if x_side is not None else _step(x2, weight, e, rows, backend, need_x, need_e)
        need_t = step.grad_e == "shrink" or ctx.needs_input_grad[3]  # grad_L = dY^T (t * e)
        y2, t, w_eff = forward_2d(x2, weight, bias, L, U, e, rows, scale, backend, step, need_t, x_side)
        # x itself is kept only for the outer grad_e or a gradient of the frozen weight or U. W_eff is kept
        # where the planner says (an out x in tensor per layer until backward, see loldu_triton.planner).
        keep_x = need_w or need_u or step.grad_e == "outer"
        ctx.save_for_backward(t, weight, L, U, e, rows, scale, x2 if keep_x else None,
                              w_eff if step.keep_merged else None, x_side if need_u else None)
        ctx.dropout = x_side is not None
        ctx.set_materialize_grads(False)  # dt is None unless something used t: no zero tensor to add
        ctx.backend = backend
        ctx.step = step
        ctx.x_dtype = x2.dtype
        return y2, t

    @staticmethod
    def backward(ctx, dy, dt):
        t, weight, L, U, e, rows, scale, x2, w_eff, x_side = ctx.saved_tensors
        need_x, need_w, need_b, need_l, need_u, need_e = ctx.needs_input_grad[:6]
        need_side = ctx.dropout and ctx.needs_input_grad[9]
        x_u = x2 if x_side is None else x_side  # the shrink's input, for U's gradients
        step = ctx.step
        # Under create_graph the backward itself is differentiated: only PyTorch ops record that graph, and the
        # kept W_eff (built in forward, no graph to e) is built again from e.
        differentiable = torch.is_grad_enabled()
        if differentiable:
            w_eff = None
        dx = grad_w = grad_b = grad_l = grad_u = grad_e = d_side = None
        if dy is not None:
            if ctx.backend == "triton" and need_x and not differentiable and step.backward == "base":
                dx, grad_e, v = kernels().run_backward_base(dy, t, weight, L, U, e, rows, scale)
                d_side = side_term(v, e if rows is None else e[rows], U, dy.dtype) if need_side else None
            elif ctx.backend == "triton" and need_x and not differentiable and not _torch_gemms(step):
                launch = kernels()
                dx, grad_e = (launch.run_backward(dy, t, weight, L, U, e, route=step.backward, weight_scale=scale)
                              if rows is None else launch.run_backward_rows(dy, t, weight, L, U, e, rows, scale))
            else:  # no dX wanted (a first layer): grad_e alone is two small GEMMs, not worth a kernel's dX GEMM
                dense = dense_weight(weight, scale, dy.dtype) if need_x and w_eff is None else weight
                dx, grad_e, d_side = torch_backward(dy, t, x2, dense, L, U, e, rows, step, w_eff, need_x, need_e,
                                                    need_side)
            e_rows = e if rows is None else e[rows]
            grad_w = (dy.T @ x2).to(weight.dtype) if need_w else None
            grad_b = dy.sum(0) if need_b else None
            grad_l = (dy.T @ (t * e_rows).to(dy.dtype)).to(L.dtype) if need_l else None
            if need_u:
                grad_u = (((dy @ L) * e_rows).to(dy.dtype).T @ x_u).to(U.dtype)
        if dt is not None:  # only in a double backward: t = x U^T (x_side U^T under dropout)
            if need_x or need_side:
                dx_t = (dt @ U.to(dt.dtype)).to(ctx.x_dtype)
                if not ctx.dropout:
                    dx = dx_t if dx is None else dx + dx_t
                else:
                    d_side = dx_t if d_side is None else d_side + dx_t
            if need_u:
                grad_u_t = (dt.T @ x_u.to(dt.dtype)).to(U.dtype)
                grad_u = grad_u_t if grad_u is None else grad_u + grad_u_t
        grads = ((dx if need_x else None), grad_w, grad_b, grad_l, grad_u, (grad_e if need_e else None), None, None,
                 None, (d_side if need_side else None))
        return grads if ctx.dropout else grads[:9]
