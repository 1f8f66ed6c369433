import re
import warnings
from functools import partial

import pytest
import torch
import torch.nn as nn

from kernel_checks import Float64Reference, assert_linear_close, float64_copy
from loldu_triton import (
    LoLDULinear,
    LoLDUParametrization,
    add_loldu,
    disable_loldu,
    enable_loldu,
    get_loldu_params,
    get_loldu_state_dict,
    merge_loldu,
    print_trainable_parameters,
    remove_loldu,
)


class MyModel(nn.Module):  # the seed README's example model
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(in_features=15, out_features=15))

    def forward(self, x):
        return self.model(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x):
        return self.mlp(self.q_proj(x) * torch.sigmoid(self.k_proj(x)) + self.v_proj(x))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 6)

    def forward(self, x):
        for block in self.layers:
            x = x + block(x)
        return self.lm_head(x)


def train(model, x, steps=5, lr=1e-2):
    opt = torch.optim.Adam(get_loldu_params(model), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def seed_config(rank):
    return {nn.Linear: {"weight": partial(LoLDUParametrization.from_linear, rank=rank)}}


def test_seed_readme_examples_run_as_written():
    # Quick Start + Usage Examples of the seed README, with minloldu replaced by loldu_triton
    from loldu_triton import LoLDUParametrization, add_loldu, get_loldu_params, merge_loldu

    model = MyModel()
    x = torch.randn(8, 15)
    y_base = model(x)
    loldu_config = {
        nn.Linear: {
            "weight": partial(LoLDUParametrization.from_linear, rank=15),
        },
    }
    add_loldu(model, loldu_config=loldu_config)
    assert isinstance(model.model[0], LoLDULinear)  # the fused layer, not a parametrization
    for param in model.parameters():
        param.requires_grad = False
    for param in get_loldu_params(model):
        param.requires_grad = True
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 15 + 1
    assert torch.equal(model(x), y_base)
    train(model, x)
    y_trained = model(x)

    state_dict_to_save = get_loldu_state_dict(model)
    assert set(state_dict_to_save) == {"model.0.d", "model.0.s"}
    torch.save(state_dict_to_save, "/tmp/_loldu_seed_state.pth")
    fresh = MyModel()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k.endswith(("weight", "bias"))})
    add_loldu(fresh, loldu_config=loldu_config)
    loaded_state = torch.load("/tmp/_loldu_seed_state.pth")
    fresh.load_state_dict(loaded_state, strict=False)
    assert torch.equal(fresh(x), y_trained)

    reference = (float64_copy(model), x.double())
    merge_loldu(model)
    assert type(model.model[0]) is nn.Linear and not get_loldu_params(model)
    assert_merged_matches(model(x), y_trained, *reference)


def test_disable_remove_are_bit_exact_and_enable_restores():
    model = TinyLM()
    x = torch.randn(4, 16)
    y_base = model(x)
    flags = [p.requires_grad for p in model.parameters()]
    add_loldu(model, rank=4)
    train(model, x)
    y_trained = model(x)
    assert not torch.allclose(y_trained, y_base)
    disable_loldu(model)
    assert torch.equal(model(x), y_base)
    enable_loldu(model)
    assert torch.equal(model(x), y_trained)
    remove_loldu(model)
    assert not any(isinstance(m, LoLDULinear) for m in model.modules())
    assert torch.equal(model(x), y_base)
    plain = nn.Linear(16, 16)
    for layer in (model.layers[0].q_proj, model.lm_head):  # nothing of LoLDU is left on the layer
        assert type(layer) is nn.Linear and set(vars(layer)) == set(vars(plain))
        assert set(layer._parameters) == {"weight", "bias"} and not layer._buffers
        assert not layer._non_persistent_buffers_set
    assert [p.requires_grad for p in model.parameters()] == flags


def assert_merged_matches(y_merged, y_trained, model64, x64):
    """The merged model computes the trained one: both against the trained model run in float64."""
    reference = Float64Reference(lambda m, x: m(x), model64, x64)
    reference.assert_close(y_trained, "trained")
    reference.assert_close(y_merged, "merged")


def test_merge_gives_plain_linears_with_the_trained_function():
    model = TinyLM()
    x = torch.randn(4, 16)
    add_loldu(model, rank=8, target_modules="all-linear")
    train(model, x)
    y_trained = model(x)
    reference = (float64_copy(model), x.double())
    merge_loldu(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert not any(n.endswith((".d", ".s")) for n in model.state_dict())
    assert_merged_matches(model(x), y_trained, *reference)


def adapted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoLDULinear))


@pytest.mark.parametrize(
    "targets,expected",
    [
        (["q_proj", "v_proj"], ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]),
        (r"layers\.1\..*_proj", ["layers.1.k_proj", "layers.1.q_proj", "layers.1.v_proj"]),
        (["layers.0.mlp.0"], ["layers.0.mlp.0"]),
    ],
)
def test_target_modules_by_suffix_and_regex(targets, expected):
    model = TinyLM()
    add_loldu(model, rank=4, target_modules=targets)
    assert adapted(model) == expected


def test_all_linear_leaves_out_lm_head_and_default_takes_every_linear():
    a, b = TinyLM(), TinyLM()
    add_loldu(a, rank=4, target_modules="all-linear")
    add_loldu(b, rank=4)
    assert "lm_head" not in adapted(a) and len(adapted(a)) == 10
    assert "lm_head" in adapted(b) and len(adapted(b)) == 11


def test_unknown_target_is_an_error_naming_it_and_nothing_changes():
    model = TinyLM()
    with pytest.raises(ValueError, match="'o_proj' matches no nn.Linear"):
        add_loldu(model, rank=4, target_modules=["q_proj", "o_proj"])
    with pytest.raises(ValueError, match="regex 'attn.*' matches no"):
        add_loldu(model, rank=4, target_modules="attn.*")
    assert adapted(model) == []


def test_both_routes_clamp_a_rank_a_layer_cannot_hold_alike():
    # The reference route (the seed README's partial(..., rank=15)) on layers narrower than the rank behaves
    # as rank=: lowered to the layer's full rank, one warning naming the layer, the same layers built.
    torch.manual_seed(0)
    by_rank, by_seed = TinyLM(), TinyLM()
    by_seed.load_state_dict(by_rank.state_dict())
    messages = []
    for model, kwargs in ((by_rank, dict(rank=10)), (by_seed, dict(loldu_config=seed_config(10)))):
        with pytest.warns(UserWarning) as record:
            add_loldu(model, **kwargs)
        messages.append([str(w.message) for w in record if "holds at most" in str(w.message)])
    assert messages[0] == messages[1] == ["add_loldu: 'lm_head' (6x16) holds at most rank 6; using 6 instead of 10"]
    for (name, a), (_, b) in zip(by_rank.named_modules(), by_seed.named_modules()):
        assert type(a) is type(b), name
        if isinstance(a, LoLDULinear):
            assert a.rank == b.rank and torch.equal(a.L, b.L) and torch.equal(a.d, b.d), name
    with pytest.warns(UserWarning, match=r"from_linear: Linear weight \(6x16\) holds at most rank 6"):
        assert LoLDUParametrization.from_linear(nn.Linear(16, 6), rank=15).rank == 6


def test_model_wide_rank_is_clamped_per_layer_with_one_warning_naming_it():
    model = TinyLM()
    with pytest.warns(UserWarning) as record:
        add_loldu(model, rank=10)
    clamp = [str(w.message) for w in record if "holds at most" in str(w.message)]
    assert clamp == ["add_loldu: 'lm_head' (6x16) holds at most rank 6; using 6 instead of 10"]
    assert model.lm_head.rank == 6 and model.layers[0].q_proj.rank == 10 and model.layers[0].mlp[0].rank == 10


def test_adding_twice_never_stacks():
    model = TinyLM()
    add_loldu(model, rank=4)
    layer = model.layers[0].q_proj
    with pytest.warns(UserWarning, match="already have LoLDU; left as they are"):
        add_loldu(model, rank=8)
    assert model.layers[0].q_proj is layer and layer.rank == 4
    assert isinstance(layer.weight, nn.Parameter) and not isinstance(layer.weight, LoLDULinear)
    assert len(get_loldu_params(model)) == 2 * 11


class ScaledLinear(nn.Linear):  # overrides forward: LoLDULinear would silently drop the scaling
    def forward(self, x):
        return 2 * super().forward(x)


class PlainSubclass(nn.Linear):  # only a new type name: safe to adapt
    pass


def test_linear_subclasses_and_multihead_attention_are_handled_deliberately():
    model = nn.Sequential(ScaledLinear(8, 8), PlainSubclass(8, 8))
    model.attn = nn.MultiheadAttention(8, 2)
    with pytest.warns(UserWarning, match=r"left out \['0', 'attn.out_proj'\].*overrides nn.Linear.forward.*"
                                         r"MultiheadAttention reads its out_proj"):
        add_loldu(model, rank=2)
    assert adapted(model) == ["1"]
    with pytest.raises(ValueError, match="cannot adapt '0': ScaledLinear overrides"):
        add_loldu(model, rank=2, target_modules=["0"])
    with pytest.raises(ValueError, match="cannot adapt 'attn.out_proj'"):
        add_loldu(model, rank=2, target_modules=["out_proj"])


def test_failure_part_way_leaves_the_model_exactly_as_it_was():
    model = TinyLM()
    with torch.no_grad():
        model.layers[1].v_proj.weight[0, 0] = float("inf")
    before = {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"layers\.1\.v_proj: weight of shape \(16, 16\) contains NaN or Inf"):
        add_loldu(model, rank=4)
    assert adapted(model) == []
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for n, (value, grad) in before.items():
        assert torch.equal(after[n], value) and after[n].requires_grad == grad


def test_seed_config_errors_name_the_layer_and_reject_other_types():
    bad_init = {nn.Linear: {"weight": partial(LoLDUParametrization.from_linear, rank=2, init="bogus")}}
    model = TinyLM()
    with pytest.raises(ValueError, match=r"layer 'layers.0.q_proj': .*init must be one of"):
        add_loldu(model, loldu_config=bad_init)
    assert adapted(model) == []
    with pytest.raises(ValueError, match="supported layers are nn.Linear, nn.Conv2d and nn.Embedding"):
        add_loldu(TinyLM(), loldu_config={nn.LayerNorm: {"weight": lambda layer: None}})
    with pytest.raises(ValueError, match="either loldu_config or rank="):
        add_loldu(TinyLM())


def test_print_trainable_parameters_counts_r_plus_one_per_layer(capsys):
    model = TinyLM()
    for p in model.parameters():
        p.requires_grad_(False)
    add_loldu(model, rank=4, target_modules=["q_proj", "v_proj"])
    trainable, total = print_trainable_parameters(model)
    assert trainable == 4 * (4 + 1)
    assert total == sum(p.numel() for p in model.parameters())
    assert re.search(r"trainable params: 20 \|\| all params: [\d,]+ \|\| trainable%: ", capsys.readouterr().out)


def test_parametrization_works_with_torch_parametrize():
    from torch.nn.utils import parametrize

    layer = nn.Linear(10, 6)
    x = torch.randn(3, 10)
    y0 = layer(x)
    p = LoLDUParametrization.from_linear(layer, rank=4)
    parametrize.register_parametrization(layer, "weight", p)
    assert torch.equal(layer(x), y0)
    with torch.no_grad():
        p.d.mul_(1.5)
    fused = LoLDULinear.from_parametrization(nn.Linear(10, 6), p)  # same factors and values
    fused.weight, fused.bias = nn.Parameter(layer.parametrizations.weight.original), layer.bias
    e = p.delta_diagonal().detach()
    for name, y in (("fused", fused(x)), ("parametrized", layer(x))):  # each against float64
        assert_linear_close(y, x, fused.weight, fused.bias, p.L, p.U, e, name)


def test_full_rank_takes_each_layers_min_dimension_without_warning():
    model = TinyLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_loldu(model, rank="full")
    assert model.lm_head.rank == 6 and model.layers[0].mlp[0].rank == 16 and model.layers[0].mlp[2].rank == 16
    with pytest.raises(ValueError, match="rank must be a positive int or 'full', got 0"):
        add_loldu(TinyLM(), rank=0)


def tiny_lm_with_hook():
    model = TinyLM()
    layer = model.layers[0].q_proj
    layer.forward = lambda x, _orig=layer.forward: _orig(x)  # what accelerate's add_hook_to_module does
    return model


def test_layer_with_an_instance_level_forward_hook_is_not_silently_bypassed():
    model = tiny_lm_with_hook()
    hooked = model.layers[0].q_proj
    with pytest.warns(UserWarning, match=r"left out \['layers.0.q_proj'\]: its forward is replaced on the instance"):
        add_loldu(model, rank=2)
    assert model.layers[0].q_proj is hooked and isinstance(model.layers[1].q_proj, LoLDULinear)
    with pytest.raises(ValueError, match=r"cannot adapt 'layers.0.q_proj': its forward is replaced"):
        add_loldu(tiny_lm_with_hook(), rank=2, target_modules=["layers.0.q_proj"])
