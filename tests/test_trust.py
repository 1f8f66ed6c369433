"""Issue 19, beyond the state rules (tests/test_state_machine.py): configs that round-trip exactly, adapters on
quantized bases of another rank, folders holding another kind of adapter, numbers in files, a checkpoint that
fails to save, and adapter_batch under torch.compile."""
import copy
import os

import pytest
import torch
import torch.nn as nn

from loldu_triton import LoLDUConfig, add_loldu, get_loldu_model, loldu_layers, save_loldu
from test_adapters import assert_unchanged, snapshot


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = nn.Module()
        self.blk.fc = nn.Linear(6, 5)
        self.outer = nn.Module()
        self.outer.blk = nn.Module()
        self.outer.blk.fc = nn.Linear(6, 5)


# ---- configs ---------------------------------------------------------------------------------------------


def test_from_pretrained_selects_exactly_the_layers_the_adapter_holds(tmp_path):
    torch.manual_seed(0)
    model = Outer()
    base = copy.deepcopy(model)
    add_loldu(model, rank=2, target_modules=r"blk\.fc")  # the inner one only; "blk.fc" would pick both
    assert [n for n, _ in loldu_layers(model)] == ["blk.fc"]
    save_loldu(model, tmp_path)
    config = LoLDUConfig.from_pretrained(tmp_path)
    get_loldu_model(base, config)
    assert [n for n, _ in loldu_layers(base)] == ["blk.fc"]
    assert LoLDUConfig.from_dict(config.to_dict()) == config


def test_a_checked_config_cannot_be_changed_behind_its_checks():
    config = LoLDUConfig(rank=2, target_modules=["fc"])
    with pytest.raises(AttributeError):
        config.target_modules.append(3)
    assert config.target_modules == ("fc",)
    with pytest.raises(ValueError, match="LoLDUConfig: target_modules must be"):
        config.target_modules = ["fc", 3]
    assert config.target_modules == ("fc",)


# ---- quantized bases -------------------------------------------------------------------------------------


def test_an_adapter_of_another_rank_is_refused_on_a_quantized_base_and_loads_on_the_full_one(tmp_path):
    from loldu_triton import load_loldu
    from loldu_triton.model.manage import loldu_state

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    trained = copy.deepcopy(base)
    add_loldu(trained, rank=4, base_quantization="int8")
    with torch.no_grad():
        for _, layer in loldu_layers(trained):
            layer.d.mul_(1.5)
    save_loldu(trained, tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = copy.deepcopy(base)
    add_loldu(other, rank=2, base_quantization="int8")
    before, state = snapshot(other), loldu_state(other)
    with pytest.raises(ValueError, match=r"load_loldu: layer '0' has a quantized \(int8\) base with LoLDU at "
                                         r"\(rank, alpha, init, init_seed\) = \(2, 2.0, 'lu', 0\); the adapter in "
                                         r".* needs \(4, 4.0, 'lu', 0\)"):
        load_loldu(other, tmp_path)
    assert_unchanged(other, before)
    assert loldu_state(other) == state
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    # what the error says to do: the adapter's settings, on the full-precision base
    fixed = copy.deepcopy(base)
    get_loldu_model(fixed, LoLDUConfig.from_pretrained(tmp_path))
    load_loldu(fixed, tmp_path)
    x = torch.randn(5, 16)
    assert torch.equal(fixed(x), trained(x))
