"""export_lora: a LoLDU adapter as a standard PEFT LoRA adapter, checked by loading it with peft itself."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from loldu_triton import LoLDUConfig, add_loldu, get_loldu_model, load_loldu, loldu_layers, merge_loldu, save_loldu
from loldu_triton.files.lora_export import export_lora
from test_adapters import assert_unchanged, snapshot
from test_api import TinyLM, train
from conftest import tiny_llama
from kernel_checks import Float64Reference, assert_close, float64_copy, merge_reference

peft = pytest.importorskip("peft")


class ConvEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12, padding_idx=0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(12, 8)

    def forward(self, idx, img):
        return self.proj(self.emb(idx)).mean(1) + self.conv(img).mean((2, 3))


def nudge(model, seed=0):
    """Trained-looking adapter values: every e nonzero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in loldu_layers(model):
            layer.d.mul_(1 + 0.3 * torch.randn(layer.rank, generator=gen))
            layer.s.mul_(1.1)


def peft_model(base, directory):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def run(model, *inputs):
    with torch.no_grad():
        return model(*inputs)


def assert_same_function(outputs, model, *inputs):
    """Each of {name: output} against model(*inputs) in float64: peft's LoRA and the LoLDU model compute one
    function, up to each one's roundoff."""
    inputs = tuple(i.double() if i.is_floating_point() else i for i in inputs)
    reference = Float64Reference(run, float64_copy(model), *inputs)
    for name, out in outputs.items():
        reference.assert_close(out, name)


def merged_weights(model):
    """{layer name: (W + L diag(e) U in float64, its scale, length)} of every LoLDU layer, before a merge."""
    return {name: merge_reference(layer.weight2d(), layer.L, layer.U, layer.delta_diagonal())
            for name, layer in loldu_layers(model)}


def assert_merged_weights(merged, expected):
    for name, (ref, scale, n) in expected.items():
        weight = merged.get_submodule(name).weight
        assert_close(weight.reshape(ref.shape), ref, scale, n, torch.float32, name)


def test_peft_loads_the_export_and_computes_the_loldu_model(tmp_path):
    torch.manual_seed(0)
    base = TinyLM()
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="holds at most rank 6"):  # lm_head at rank 6: padded to 10
        get_loldu_model(model, LoLDUConfig(rank=10, target_modules=["q_proj", "v_proj", "lm_head"]))
    train(model, torch.randn(6, 16), steps=4, lr=5e-2)
    export_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 10
    assert config["target_modules"] == [n for n, _ in loldu_layers(model)]
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.lm_head.lora_B.weight"].shape == (6, 10)
    assert keys["base_model.model.layers.0.q_proj.lora_A.weight"].shape == (10, 16)

    lora = peft_model(base, tmp_path)
    x = torch.randn(7, 16)
    with torch.no_grad():
        want = model(x)
        assert not torch.allclose(want, base(x), atol=1e-3)  # the adapter does something, far above roundoff
        assert_same_function({"peft": lora(x), "loldu": want}, model, x)
        expected = merged_weights(model)
        merged_lora = lora.merge_and_unload()
        merge_loldu(model)
        assert_merged_weights(merged_lora, expected)
        assert_merged_weights(model, expected)
        for name, module in model.named_modules():  # and the layers without an adapter are the same weights
            if isinstance(module, nn.Linear) and name not in expected:
                assert torch.equal(merged_lora.get_submodule(name).weight, module.weight), name


def test_conv2d_and_embedding_export_with_peft_key_layout(tmp_path):
    torch.manual_seed(0)
    base = ConvEmbed()
    model = copy.deepcopy(base)
    add_loldu(model, rank=4, target_modules=["emb", "conv", "proj"])
    nudge(model)
    export_lora(model, tmp_path)
    lora = peft_model(base, tmp_path)
    assert type(lora.base_model.model.emb).__name__ == "Embedding"  # peft's lora.Embedding
    idx, img = torch.randint(0, 20, (5, 6)), torch.randn(5, 3, 9, 9)
    idx[0, 0] = 0  # the padding row stays the base's
    with torch.no_grad():
        assert_same_function({"peft": lora(idx, img), "loldu": model(idx, img)}, model, idx, img)
        expected = merged_weights(model)
        assert sorted(expected) == ["conv", "emb", "proj"]
        merged = lora.merge_and_unload()
        merge_loldu(model)
        assert_merged_weights(merged, expected)
        assert_merged_weights(model, expected)


# peft 0.21's PeftModel reads transformers' deprecated alias is_gradient_checkpointing on the base model (a
# FutureWarning with transformers 5.x); nothing in this test or in loldu_triton calls it.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_hf_llama_export_round_trips_through_peft(tmp_path):
    base = tiny_llama().eval()
    model = copy.deepcopy(base)
    get_loldu_model(model, LoLDUConfig(rank=8, target_modules="all-linear"))
    nudge(model)
    export_lora(model, tmp_path)
    ids = torch.randint(0, 64, (2, 9))

    def logits(model, ids):
        with torch.no_grad():
            return model(input_ids=ids).logits

    reference = Float64Reference(logits, float64_copy(model), ids)
    reference.assert_close(logits(peft_model(base, tmp_path), ids), "peft")
    reference.assert_close(logits(model, ids), "loldu")


def test_named_adapter_export_and_refusals_write_nothing(tmp_path):
    torch.manual_seed(0)
    base = TinyLM()
    model = copy.deepcopy(base)
    add_loldu(model, rank=4, target_modules=["q_proj"])
    nudge(model, seed=1)
    save_loldu(model, tmp_path / "first")
    nudge(model, seed=2)
    load_loldu(model, tmp_path / "first", adapter_name="first")
    export_lora(model, tmp_path / "lora-first", adapter_name="first")
    reference = copy.deepcopy(base)
    load_loldu(reference, tmp_path / "first")
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert_same_function({"peft": peft_model(base, tmp_path / "lora-first")(x), "loldu": reference(x)},
                             reference, x)

    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 3, dilation=2))
    add_loldu(grouped, rank=2, target_modules=["0", "1"])
    before = snapshot(grouped)
    with pytest.raises(ValueError, match=r"cannot express these layers exactly: '0': groups=2.*; '1': dilation=\(2, 2\)"):
        export_lora(grouped, tmp_path / "grouped")
    for bad, match in [(dict(adapter_name="nope"), "no layer has an adapter 'nope'"),
                       (dict(dtype="float16"), "dtype must be a floating torch.dtype")]:
        with pytest.raises(ValueError, match=match):
            export_lora(model, tmp_path / "bad", **bad)
    with torch.no_grad():
        model.layers[0].q_proj.d[0] = float("inf")
    with pytest.raises(ValueError, match="'layers.0.q_proj' has non-finite adapter values"):
        export_lora(model, tmp_path / "bad")
    with pytest.raises(ValueError, match="has no LoLDU layer"):
        export_lora(TinyLM(), tmp_path / "bad")
    assert not (tmp_path / "grouped").exists() and not (tmp_path / "bad").exists()
    assert_unchanged(grouped, before)


def test_a_name_that_is_also_the_suffix_of_another_module_is_written_as_a_full_match_regex(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))  # "0" and "1.0"
    model = copy.deepcopy(base)
    add_loldu(model, rank=3, target_modules=r"0")
    nudge(model)
    export_lora(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == "(0)"
    lora = peft_model(base, tmp_path)
    assert type(lora.base_model.model[1][0]) is nn.Linear  # "1.0" is left alone
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert_same_function({"peft": lora(x), "loldu": model(x)}, model, x)
