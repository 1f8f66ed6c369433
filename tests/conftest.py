import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error against a (float64) reference; NaN never passes."""
    actual, expected = actual.detach().double(), expected.detach().double()
    err = float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected).clamp_min(1e-300))
    return float("inf") if err != err else err


def run_interpreted(worker: str, timeout: int = 900) -> dict:
    """Run ``worker`` (Python code printing one JSON object on its last line) in a fresh process with the Triton
    interpreter on: it must be set before triton kernels are defined, which this process may have done."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", worker], env=env, cwd=repo, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
