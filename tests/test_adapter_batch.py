import copy

import pytest
import torch

from kernel_checks import Float64Reference, assert_float64_close, float64_copy
from loldu_triton import adapter_batch, add_loldu, get_loldu_params, load_loldu, save_loldu
from test_api import TinyLM

TARGETS = ["q_proj", "v_proj", "lm_head"]


def forward(model, x):
    with torch.no_grad():
        return model(x)


def assert_float64_output(y, model, x, name=""):
    """y against model(x) run in float64."""
    assert_float64_close(y, forward, float64_copy(model), x.double(), name=name)


def trained_adapter(base_state, seed, directory):
    torch.manual_seed(seed)
    model = TinyLM()
    model.load_state_dict(base_state)
    add_loldu(model, rank=4, target_modules=TARGETS)
    opt = torch.optim.Adam(get_loldu_params(model), lr=5e-2)
    x = torch.randn(8, 5, 16)
    for _ in range(4):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    save_loldu(model, directory)
    return model


@pytest.fixture
def three_adapters(tmp_path):
    torch.manual_seed(0)
    base = TinyLM()
    base_state = copy.deepcopy(base.state_dict())
    models = {name: trained_adapter(base_state, seed, tmp_path / name) for seed, name in enumerate("abc")}
    serving = TinyLM()
    serving.load_state_dict(base_state)
    load_loldu(serving, tmp_path / "c")  # "c" is the trainable default adapter
    load_loldu(serving, tmp_path / "a", adapter_name="a")
    load_loldu(serving, tmp_path / "b", adapter_name="b")
    return base, models, serving, tmp_path


def test_each_row_equals_its_adapter_alone(three_adapters):
    base, models, serving, _ = three_adapters
    x = torch.randn(6, 5, 16)
    names = ["a", None, "b", "default", "a", "b"]
    alone = {"a": models["a"], "b": models["b"], "default": models["c"], None: base}
    with torch.no_grad():
        with adapter_batch(serving, names):
            y = serving(x)
        for i, name in enumerate(names):
            assert_float64_output(y[i : i + 1], alone[name], x[i : i + 1], f"row {i} ({name})")
        # leaving the context restores the model: the default adapter for every row
        assert torch.equal(serving(x), models["c"](x))


def test_gradients_reach_the_default_adapter_from_its_rows_only(three_adapters):
    _, models, serving, _ = three_adapters
    x = torch.randn(4, 5, 16)
    names = ["default", "a", None, "default"]
    with adapter_batch(serving, names):
        serving(x).pow(2).sum().backward()
    def grads(model, x):  # the default adapter alone, on its rows
        model(x).pow(2).sum().backward()
        return [p.grad for p in get_loldu_params(model)]

    assert_float64_close([p.grad for p in get_loldu_params(serving)], grads, float64_copy(models["c"]),
                         x[[0, 3]].double())


def test_wrong_length_unknown_name_and_mismatched_settings_are_errors(three_adapters):
    base, _, serving, tmp_path = three_adapters
    before = [(n, b.clone()) for n, b in serving.named_buffers() if n.endswith("adapter_table")]
    with pytest.raises(ValueError, match=r"unknown adapters \['z'\]; the model has \['a', 'b', 'default'\]"):
        with adapter_batch(serving, ["a", "z"]):
            pass
    with pytest.raises(ValueError, match=r"adapter_batch has 3 names but the input of shape \(2, 5, 16\) has 2 rows"):
        with adapter_batch(serving, ["a", "b", None]):
            serving(torch.randn(2, 5, 16))
    x = torch.randn(2, 5, 16)
    with adapter_batch(serving, ["default", "default"]):
        inside = serving(x)
    # after the error, the plain forward is the default adapter's again (its own route: equal up to rounding)
    reference = Float64Reference(forward, float64_copy(serving), x.double())
    reference.assert_close(inside, "inside")
    reference.assert_close(serving(x), "after")
    other = TinyLM()
    other.load_state_dict(base.state_dict())
    add_loldu(other, rank=2, target_modules=TARGETS)
    with pytest.raises(ValueError, match=r"layer 'layers.0.q_proj' has LoLDU with .* named adapters share"):
        load_loldu(other, tmp_path / "a", adapter_name="a")
    assert not any(layer.adapter_names for layer in other.modules() if hasattr(layer, "adapter_names"))
    after = [(n, b) for n, b in serving.named_buffers() if n.endswith("adapter_table")]
    assert [n for n, _ in before] == [n for n, _ in after] and all(torch.equal(b, a) for (_, b), (_, a) in zip(before, after))
