import os

import pytest
import torch

# tests/interpreted runs in an invocation of its own, with TRITON_INTERPRET=1 set before the kernels are defined.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpreted"]

try:  # hypothesis drives the property tests; the GPU check runs without it on a machine that lacks it
    from hypothesis import settings
except ImportError:
    settings = None
else:
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


def tiny_llama(seed: int = 0):
    """A 2-layer Llama of width 32 built from a config (random weights, no download), in train mode."""
    tf = pytest.importorskip("transformers")
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(config)
