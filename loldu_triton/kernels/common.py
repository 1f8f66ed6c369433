"""What every kernel family shares: interpreter mode, the dot helper, precision rules, and
the one place kernels are launched from (so compile-check can record launches instead of running them)."""

import contextlib
import os
import torch
import triton
import triton.language as tl

try:  # torch >= 2.6: ops that torch.compile traces into, kernels included
    from torch.library import triton_op, wrap_triton
except ImportError:
    triton_op = None

    def wrap_triton(kernel):
        return kernel

try:  # what triton_op itself uses in eager mode to skip the slow HOP dispatch of wrap_triton
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:

    def set_wrap_triton_enabled(enabled):
        return contextlib.nullcontext()


# Must be set before this module is imported: kernels are defined for the interpreter or for a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in the dtype of a. UPCAST (bf16 under the interpreter, whose bf16 dot is wrong) uses fp32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    else:
        b = b.to(a.dtype)
    return tl.dot(a, b, acc, input_precision=PREC)


def precision(dtype):
    """input_precision of tl.dot for this activation dtype. Same rule as torch.matmul: fp32 stays fp32-accurate
    unless the user allowed tf32, and then it runs on tensor cores as 3xTF32; half types ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def upcast(dtype):
    return INTERPRET and dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------------------
# Launching. compile-check swaps the launcher for a recorder: it sees each launch's kernel and arguments, which
# is how it knows every variant the launchers can produce, without keeping a list of them by hand.
# --------------------------------------------------------------------------------------------------------------

_recorder = None


def launch(kernel, grid, *args, **kwargs):
    if _recorder is not None:
        _recorder(kernel, args, kwargs)
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


@contextlib.contextmanager
def recording(callback):
    """Within this block launches call callback(kernel, args, kwargs) instead of running."""
    global _recorder
    previous, _recorder = _recorder, callback
    try:
        yield
    finally:
        _recorder = previous
