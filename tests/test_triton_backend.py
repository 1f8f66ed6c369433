"""LoLDULinear on the Triton backend without a GPU and without the interpreter (the interpreter runs the layer on
the kernels in tests/interpreted/test_layer_interpreted.py)."""
import os

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton")


def test_triton_backend_on_cpu_without_interpreter_raises_instead_of_falling_back():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs the non-interpreted code path")
    from loldu_triton import LoLDULinear

    layer = LoLDULinear.from_linear(nn.Linear(8, 6), 3, backend="triton", name="enc.fc")
    with pytest.raises(RuntimeError, match="Triton kernels need CUDA tensors"):
        layer(torch.randn(2, 8))
