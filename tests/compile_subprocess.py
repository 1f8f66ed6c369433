"""Run a snippet that executes torch.compile's inductor code in a process of its own, after a canary.

torch 2.13's CPU inductor miscompiles and corrupts the heap on some machines, with or without LoLDU (a plain
MLP off by 0.55, 2e22 or NaN under ATEN_CPU_CAPABILITY=avx2; "double free or corruption" aborts; under =default
C++ that does not compile). So a plain model compiled the same way runs first, against float64: where it is
wrong, where inductor's C++ does not compile, or where the process dies, the test skips and says why. An
upstream miscompile is reported, never blamed on LoLDU, and never takes the test run down with it. What is
LoLDU's own (one graph, the traced math, recompiles) is tested in process with backend="aot_eager", which
generates no C++.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
CANARY_WRONG, CXX_FAILED = 3, 4

PRELUDE = r'''
import copy, json, sys, traceback
import torch
import torch.nn as nn
from kernel_checks import Float64Reference, float64_copy


def compiled(module):
    """How the canary and the snippet compile: inductor (the default backend), one graph."""
    return torch.compile(module, fullgraph=True)


def cxx_failed(err):
    while err is not None:
        if type(err).__name__ == "CppCompileError":
            return True
        err = err.__cause__ or err.__context__
    return False


def step(model, x):
    y = model(x)
    y.pow(2).mean().backward()
    return y.detach(), [p.grad for p in model.parameters()]


try:
    torch.manual_seed(0)
    canary, x = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)), torch.randn(12, 16)
    reference = Float64Reference(step, float64_copy(canary), x.double())
    bad = reference.mismatches(step(compiled(copy.deepcopy(canary)), x), "canary")
except Exception as err:
    print(f"canary: {type(err).__name__}: {str(err)[-1500:]}", file=sys.stderr)
    sys.exit(CXX_FAILED if cxx_failed(err) else CANARY_WRONG)
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(CANARY_WRONG)
torch._dynamo.reset()
try:
    exec(compile(SNIPPET, "<snippet>", "exec"), {"compiled": compiled, "Float64Reference": Float64Reference,
                                                  "float64_copy": float64_copy, "torch": torch, "nn": nn})
except Exception as err:
    if cxx_failed(err):
        print(f"snippet: {type(err).__name__}: {str(err)[-1500:]}", file=sys.stderr)
        sys.exit(CXX_FAILED)
    raise
'''

CRASH_MARKS = ("Fatal Python error", "double free", "corrupted", "free(): invalid", "Segmentation fault")


def run_after_canary(snippet: str, timeout: int = 600) -> None:
    """Runs ``snippet`` (which compiles with ``compiled(module)``) in a fresh interpreter after the canary;
    fails on the snippet's own error, skips (with the reason) where inductor itself is at fault."""
    script = f"CANARY_WRONG, CXX_FAILED = {CANARY_WRONG}, {CXX_FAILED}\nSNIPPET = {snippet!r}\n{PRELUDE}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS.parent), str(TESTS),
                                                                   os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script], cwd=TESTS.parent, env=env, capture_output=True,
                          text=True, timeout=timeout)
    tail = proc.stderr[-3000:]
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "the machine's own")
    if proc.returncode == CANARY_WRONG:
        pytest.skip(f"torch.compile (inductor, ATEN_CPU_CAPABILITY={cap}) gets a plain MLP wrong, without LoLDU: "
                    f"an upstream miscompile, nothing to test LoLDU against:\n{tail}")
    if proc.returncode == CXX_FAILED:
        pytest.skip(f"inductor's generated C++ does not compile (ATEN_CPU_CAPABILITY={cap}):\n{tail}")
    if proc.returncode < 0 or any(mark in proc.stderr for mark in CRASH_MARKS):
        pytest.skip(f"the process running inductor's code died (status {proc.returncode}, "
                    f"ATEN_CPU_CAPABILITY={cap}): upstream heap corruption, as with plain MLPs:\n{tail}")
    assert proc.returncode == 0, f"status {proc.returncode}\n{proc.stdout[-2000:]}\n{tail}"
