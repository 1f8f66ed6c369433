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


# ---- files -----------------------------------------------------------------------------------------------


def folder(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()} if directory.exists() else None


@pytest.fixture
def adapted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    add_loldu(model, rank=2)
    with torch.no_grad():
        for _, layer in loldu_layers(model):
            layer.d.add_(1.0)
    return model


def test_export_lora_refuses_a_folder_holding_a_loldu_adapter_of_either_format(adapted, tmp_path):
    from loldu_triton import export_lora
    from test_adapters import write_legacy

    write_legacy(adapted, tmp_path / "first")
    save_loldu(adapted, tmp_path / "second")
    for kind, match in (("first", "a LoLDU adapter of the first format"), ("second", "a LoLDU adapter")):
        directory = tmp_path / kind
        on_disk = folder(directory)
        with pytest.raises(ValueError, match=rf"export_lora: .*{kind} holds {match} .*nothing was written.*"
                                             rf"overwrite=True"):
            export_lora(adapted, directory)
        assert folder(directory) == on_disk
    export_lora(adapted, tmp_path / "lora")
    export_lora(adapted, tmp_path / "lora")  # its own kind: replaced
    export_lora(adapted, tmp_path / "first", overwrite=True)
    assert b"LORA" in (tmp_path / "first" / "adapter_config.json").read_bytes()
    with pytest.raises(ValueError, match="export_lora: overwrite must be True or False, got 'yes'"):
        export_lora(adapted, tmp_path / "x", overwrite="yes")
    assert not (tmp_path / "x").exists()


def test_save_loldu_refuses_a_folder_holding_a_lora_adapter(adapted, tmp_path):
    from loldu_triton import export_lora, load_loldu
    from test_adapters import write_legacy

    export_lora(adapted, tmp_path / "lora")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text('{"peft_type": "VERA"}')
    for kind, match in (("lora", "a PEFT LoRA adapter"), ("other", "another kind of adapter")):
        on_disk = folder(tmp_path / kind)
        with pytest.raises(ValueError, match=rf"save_loldu: .*{kind} holds {match}.*overwrite=True"):
            save_loldu(adapted, tmp_path / kind)
        assert folder(tmp_path / kind) == on_disk
    save_loldu(adapted, tmp_path / "lora", overwrite=True)
    assert set(folder(tmp_path / "lora")) == {"adapter_config.json", "adapter_model.safetensors",
                                              "loldu_adapter.safetensors"}  # the LoRA files stay
    write_legacy(adapted, tmp_path / "first")
    save_loldu(adapted, tmp_path / "first")  # LoLDU's own first format: replaced, as before
    assert set(folder(tmp_path / "first")) == {"loldu_adapter.safetensors"}
    load_loldu(copy.deepcopy(adapted), tmp_path / "first")


@pytest.mark.parametrize("value", ["²", "1²", "-1", " 1", "1.0", True, -1, 1.0, None, "1" * 19])
def test_every_number_of_a_file_goes_through_one_strict_parser(value):
    from loldu_triton.core.fileformat import parse_count

    with pytest.raises(ValueError, match=r"^my.file: field must be a number written in ASCII digits, got "):
        parse_count(value, "my.file: field")


def test_a_superscript_version_names_the_file_and_field(adapted, tmp_path):
    import json

    from loldu_triton import load_loldu
    from test_adapters import read_file, write_legacy
    from safetensors.torch import save

    save_loldu(adapted, tmp_path / "new")
    config, tensors = read_file(tmp_path / "new")
    (tmp_path / "new" / "loldu_adapter.safetensors").write_bytes(save(tensors, metadata={
        "format": "loldu-triton-adapter", "format_version": "²", "config": json.dumps(config), "checksum": "0"}))
    write_legacy(adapted, tmp_path / "first")
    legacy = json.loads((tmp_path / "first" / "adapter_config.json").read_text())
    legacy["layers"]["0"]["weight_shape"] = [5, True]
    (tmp_path / "first" / "adapter_config.json").write_text(json.dumps(legacy))
    for directory, match in ((tmp_path / "new", r"loldu_adapter.safetensors: format_version must be a number "
                                                r"written in ASCII digits, got '²'"),
                             (tmp_path / "first", r"adapter_config.json: layer '0': weight_shape must be a number "
                                                  r"written in ASCII digits, got True")):
        model = copy.deepcopy(adapted)
        before = snapshot(model)
        with pytest.raises(ValueError, match=match):
            load_loldu(model, directory)
        assert_unchanged(model, before)


# ---- adapter_batch under torch.compile ---------------------------------------------------------------------


def test_adapter_batch_under_compile_fullgraph_is_refused_by_name_and_without_fullgraph_runs_exactly(adapted):
    from kernel_checks import mismatches
    from loldu_triton import adapter_batch
    from loldu_triton.layers.batch import batches_open
    from test_state_machine import reference

    torch._dynamo.reset()
    for _, layer in loldu_layers(adapted):
        layer.set_named_adapter("a", layer.d.detach() + 0.5)
    x = torch.randn(3, 6)
    names = ["a", None, "default"]
    strict = torch.compile(adapted, fullgraph=True, backend="aot_eager")
    strict(x)
    before = snapshot(adapted)
    with pytest.raises(RuntimeError, match=r"^adapter_batch does not run under torch.compile\(fullgraph=True\) .*"
                                           r"call the model that was not compiled"):
        with adapter_batch(adapted, names):
            strict(x)
    assert_unchanged(adapted, before)
    assert batches_open() == 0 and strict(x).shape == (3, 4)

    loose = torch.compile(adapted, backend="aot_eager")  # the LoLDU layers break the graph and run eagerly
    layers = dict(loldu_layers(adapted))
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n, layer in layers.items()]
    with adapter_batch(adapted, names):
        loose(x)
    for h in hooks:
        h.remove()
    for n, layer in layers.items():
        inputs, y = seen[n]
        for row, name in enumerate(names):
            values = None if name is None else layer.adapter_values(name)
            ref, scale, k = reference(inputs[row:row + 1], layer, values)
            assert not mismatches(y[row:row + 1], ref, scale, k, torch.float32, f"{n} row {row}")


def test_a_compiled_model_follows_every_state_change():
    # The compiled graph must be re-traced when a flag changes: a missing guard served W0 + 2 delta once merged.
    from kernel_checks import mismatches
    from loldu_triton import disable_loldu, enable_loldu, merge_loldu, unmerge_loldu
    from test_state_machine import reference

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    add_loldu(model, rank=2)
    layer = model[0]
    with torch.no_grad():
        layer.d.add_(1.0)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 6)

    def check(enabled):
        ref, scale, n = reference(x, layer, (layer.d, layer.s) if enabled else None)
        with torch.no_grad():
            bad = mismatches(compiled(x), ref, scale, n, torch.float32, f"enabled={enabled}")
        assert not bad, "\n".join(bad)

    check(True)
    with disable_loldu(model):
        check(False)
    merge_loldu(model, reversible=True)
    check(True)
    disable_loldu(model)
    check(False)
    enable_loldu(model)
    check(True)
    unmerge_loldu(model)
    check(True)
