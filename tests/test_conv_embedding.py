import copy
from functools import partial

import pytest
import torch
import torch.nn as nn

from kernel_checks import Float64Reference, assert_float64_close, float64_copy
from loldu_triton import (
    LoLDUConv2d,
    LoLDUEmbedding,
    LoLDULinear,
    LoLDUParametrization,
    add_loldu,
    disable_loldu,
    enable_loldu,
    get_loldu_params,
    load_loldu,
    merge_loldu,
    remove_loldu,
    save_loldu,
)


class TinyConvLM(nn.Module):
    """Token embedding, a grouped strided conv over a 2-D view, and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 12, padding_idx=0)
        self.conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2)
        self.conv_plain = nn.Conv2d(6, 6, kernel_size=1)
        self.head = nn.Linear(6 * 2 * 2, 5)

    def forward(self, idx):
        h = self.embed(idx).reshape(idx.shape[0], 4, 3, 3)  # 3 tokens x 12 -> (B, 4 channels, 3, 3)
        h = self.conv_plain(torch.relu(self.conv(h)))
        return self.head(h.flatten(1))


def train(model, idx, steps=4, lr=3e-2):
    opt = torch.optim.Adam(get_loldu_params(model), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(idx).pow(2).mean().backward()
        opt.step()


def adapted_model(**kwargs):
    torch.manual_seed(0)
    model = TinyConvLM()
    add_loldu(model, rank=kwargs.pop("rank", 3), target_modules=["embed", "conv", "conv_plain", "head"], **kwargs)
    return model


def test_targeting_by_name_picks_conv_and_embedding_but_all_linear_does_not():
    model = adapted_model()
    assert isinstance(model.embed, LoLDUEmbedding) and isinstance(model.conv, LoLDUConv2d)
    assert isinstance(model.head, LoLDULinear)
    other = TinyConvLM()
    add_loldu(other, rank=3, target_modules="all-linear")
    assert type(other.embed) is nn.Embedding and type(other.conv) is nn.Conv2d and isinstance(other.head, LoLDULinear)


def test_identity_at_init_training_disable_remove_and_merge():
    torch.manual_seed(0)
    model = TinyConvLM()
    idx = torch.randint(0, 50, (7, 3))
    idx[0, 0] = 0  # the padding index
    y_base = model(idx)
    add_loldu(model, rank=3, target_modules=["embed", "conv", "conv_plain", "head"])
    assert torch.equal(model(idx), y_base)
    # conv weight viewed as 6 x (2 * 3 * 3), embedding table 50 x 12: no dense permutation anywhere
    assert model.conv.L.shape == (6, 3) and model.conv.U.shape == (3, 18)
    assert model.embed.L.shape == (50, 3) and model.embed.U.shape == (3, 12)
    assert max(b.numel() for b in model.embed.buffers()) == 50 * 3
    train(model, idx)
    y_trained = model(idx)
    assert not torch.allclose(y_trained, y_base)
    disable_loldu(model)
    assert torch.equal(model(idx), y_base)
    enable_loldu(model)
    assert torch.equal(model(idx), y_trained)
    reference = Float64Reference(lambda m, idx: m(idx), float64_copy(model), idx)
    merged, removed = model, copy.deepcopy(model)
    merge_loldu(merged)
    assert type(merged.embed) is nn.Embedding and type(merged.conv) is nn.Conv2d and type(merged.head) is nn.Linear
    assert merged.conv.groups == 2 and merged.conv.stride == (2, 2) and merged.embed.padding_idx == 0
    assert not get_loldu_params(merged)
    reference.assert_close(y_trained, "trained")
    reference.assert_close(merged(idx), "merged")
    remove_loldu(removed)
    assert type(removed.conv) is nn.Conv2d and torch.equal(removed(idx), y_base)


def test_adapter_files_round_trip_conv_and_embedding(tmp_path):
    torch.manual_seed(0)
    model = TinyConvLM()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_loldu(model, rank=3, target_modules=["embed", "conv", "head"])
    idx = torch.randint(0, 50, (5, 3))
    train(model, idx)
    save_loldu(model, tmp_path)
    fresh = TinyConvLM()
    fresh.load_state_dict(base_state)
    load_loldu(fresh, tmp_path)
    assert isinstance(fresh.embed, LoLDUEmbedding) and isinstance(fresh.conv, LoLDUConv2d)
    assert torch.equal(fresh(idx), model(idx))
    wrong = TinyConvLM()
    wrong.load_state_dict(base_state)
    wrong.conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1)  # groups=1: another weight shape
    with pytest.raises(ValueError, match=r"layer 'conv' has a weight of shape \[6, 4, 3, 3\], the adapter expects "
                                         r"\[6, 2, 3, 3\]"):
        load_loldu(wrong, tmp_path)
    assert type(wrong.conv) is nn.Conv2d and type(wrong.embed) is nn.Embedding


def test_seed_config_with_from_conv2d_and_from_embedding():
    torch.manual_seed(0)
    model = TinyConvLM()
    idx = torch.randint(0, 50, (4, 3))
    y_base = model(idx)
    add_loldu(model, loldu_config={
        nn.Conv2d: {"weight": partial(LoLDUParametrization.from_conv2d, rank=4)},
        nn.Embedding: {"weight": partial(LoLDUParametrization.from_embedding, rank=5)},
    })
    assert isinstance(model.conv, LoLDUConv2d) and model.conv.rank == 4 and model.embed.rank == 5
    assert type(model.head) is nn.Linear
    assert torch.equal(model(idx), y_base)


def test_conv_gradients_match_float64_dense_reference():
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1, dtype=torch.float64)
    layer = LoLDUConv2d.from_base(conv, 4)
    with torch.no_grad():
        layer.d.mul_(1.3)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, d: _conv_with(layer, d)(x), [x, layer.d.detach().double().requires_grad_()])


def _conv_with(layer, d):
    def run(x):
        e = layer.s.double() * d - layer.s0.double() * layer.d0.double()
        w = layer.weight + ((layer.L * e) @ layer.U).view_as(layer.weight)
        return layer._conv_forward(x, w, layer.bias)
    return run


def test_conv_layer_gradient_equals_the_dense_formula():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1, dtype=torch.float64)
    layer = LoLDUConv2d.from_base(conv, 4)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    layer(x).pow(2).sum().backward()

    def dense_grad(layer, x, d):
        d = d.requires_grad_(True)
        _conv_with(layer, d)(x).pow(2).sum().backward()
        return d.grad

    # d, s and e are float32 in the layer: the dense float64 run, its roundoff drawn at float32's size
    assert_float64_close(layer.d.grad, dense_grad, layer, x, layer.d.detach().double(), dtype=torch.float32)


def test_bad_inputs_name_the_layer():
    with pytest.raises(ValueError, match=r"tok: nn.Embedding with max_norm renormalizes its weight"):
        LoLDUEmbedding.from_base(nn.Embedding(10, 4, max_norm=1.0), 2, name="tok")
    layer = LoLDUConv2d.from_base(nn.Conv2d(3, 4, 3), 2, name="stem")
    with pytest.raises(ValueError, match=r"stem: input of shape \(1, 5, 8, 8\) has channel dim 5, expected 3"):
        layer(torch.randn(1, 5, 8, 8))
