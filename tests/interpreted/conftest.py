"""Tests of the Triton kernels run by the Triton interpreter on CPU tensors.

The interpreter must be on before the kernels are defined, so these tests run in a pytest invocation of their
own (`TRITON_INTERPRET=1 python -m pytest tests/interpreted`, the second command of `make test`); the main
invocation does not collect this directory (see tests/conftest.py)."""
import os
import sys

import pytest

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: kernel_checks

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from loldu_triton.kernels import common  # noqa: E402

if not common.INTERPRET:
    raise pytest.UsageError("the kernels were defined before TRITON_INTERPRET=1 was set: run tests/interpreted "
                            "in a pytest invocation of its own")
