import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from loldu_triton import add_loldu, load_loldu, save_loldu
from test_api import TinyLM, train

REPO = Path(__file__).resolve().parents[1]


def trained_model(rank=4, init="lu", seed=0):
    torch.manual_seed(seed)
    model = TinyLM()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_loldu(model, rank=rank, init=init, target_modules=["q_proj", "v_proj", "lm_head"])
    train(model, torch.randn(6, 16), steps=4)
    return model, base_state


def snapshot(model):
    return {n: (type(m), {k: v.clone() for k, v in m.state_dict().items()}) for n, m in model.named_modules()}


def assert_unchanged(model, before):
    after = snapshot(model)
    assert list(after) == list(before)
    for name, (cls, state) in before.items():
        assert after[name][0] is cls, name
        assert all(torch.equal(after[name][1][k], v) for k, v in state.items()), name


@pytest.mark.parametrize("init", ["lu", "normal"])
def test_round_trip_in_a_fresh_process(tmp_path, init):
    model, base_state = trained_model(init=init)
    x = torch.randn(5, 16)
    torch.save({"base": base_state, "x": x, "y": model(x).detach()}, tmp_path / "ref.pt")
    save_loldu(model, tmp_path / "adapter")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_api import TinyLM
        from loldu_triton import load_loldu
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        model = TinyLM()
        model.load_state_dict(ref["base"])
        load_loldu(model, {str(tmp_path / 'adapter')!r})
        assert torch.equal(model(ref["x"]), ref["y"]), (model(ref["x"]) - ref["y"]).abs().max()
        print("ROUND TRIP OK", type(model.lm_head).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "ROUND TRIP OK LoLDULinear" in out.stdout


def test_loading_onto_a_model_that_already_has_loldu(tmp_path):
    model, base_state = trained_model()
    x = torch.randn(5, 16)
    y = model(x)
    save_loldu(model, tmp_path)
    other = TinyLM()
    other.load_state_dict(base_state)
    add_loldu(other, rank=4, target_modules=["q_proj", "v_proj", "lm_head"])
    layer = other.lm_head
    load_loldu(other, tmp_path)
    assert other.lm_head is layer  # values copied in place, optimizers keep their parameters
    assert torch.equal(other(x), y)


def test_file_holds_r_plus_one_float32_values_per_layer_and_a_small_header(tmp_path):
    model, _ = trained_model(rank=4)
    save_loldu(model, tmp_path)
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    layers = json.loads((tmp_path / "adapter_config.json").read_text())["layers"]
    payload = sum((spec["rank"] + 1) * 4 for spec in layers.values())
    assert len(layers) == 5 and payload == 5 * 5 * 4
    assert len(data) == 8 + header_len + payload
    assert header_len < 150 * 2 * len(layers)


def test_config_records_settings_version_and_base_fingerprints(tmp_path):
    model, _ = trained_model(rank=4)
    save_loldu(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank"] == 4 and config["alpha"] == 4.0 and config["init"] == "lu"
    assert config["library_version"]
    assert config["target_modules"] == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj",
                                        "lm_head"]
    base = config["layers"]["lm_head"]["base"]
    assert base["pivots"] == model.lm_head.pivots.tolist() and len(base["sha256"]) == 64


def test_wrong_base_is_refused_and_the_model_is_unchanged(tmp_path):
    model, _ = trained_model()
    save_loldu(model, tmp_path)
    torch.manual_seed(123)
    other = TinyLM()  # other random weights
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"layer 'layers.0.q_proj' has a different base weight"):
        load_loldu(other, tmp_path)
    assert_unchanged(other, before)


def test_base_in_another_dtype_loads_with_a_warning(tmp_path):
    model, base_state = trained_model()
    save_loldu(model, tmp_path)
    other = TinyLM()
    other.load_state_dict(base_state)
    other.to(torch.bfloat16)
    with pytest.warns(UserWarning, match="not byte-identical"):
        load_loldu(other, tmp_path)
    assert torch.equal(other.lm_head.d, model.lm_head.d)


def test_missing_layer_is_refused_and_the_model_is_unchanged(tmp_path):
    model, base_state = trained_model()
    save_loldu(model, tmp_path)
    other = TinyLM()
    other.load_state_dict(base_state)
    other.lm_head = nn.Identity()
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"has layer 'lm_head', but the model has Identity there"):
        load_loldu(other, tmp_path)
    assert_unchanged(other, before)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "drop_config", "bad_json", "nan"])
def test_damaged_files_are_refused_naming_the_file_and_the_model_is_unchanged(tmp_path, damage):
    model, base_state = trained_model()
    save_loldu(model, tmp_path)
    weights, config = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-7])
        match = "adapter_model.safetensors is truncated or corrupt"
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 50)
        match = "adapter_model.safetensors is truncated or corrupt"
    elif damage == "drop_config":
        config.unlink()
        match = "no adapter config at .*adapter_config.json"
    elif damage == "bad_json":
        config.write_text(config.read_text()[:40])
        match = "adapter_config.json is not valid JSON"
    else:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        tensors["lm_head.d"][1] = float("nan")
        save_file(tensors, str(weights))
        match = "lm_head.d contains NaN or Inf"
    other = TinyLM()
    other.load_state_dict(base_state)
    add_loldu(other, rank=4, target_modules=["q_proj"])
    before = snapshot(other)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_loldu(other, tmp_path)
    assert_unchanged(other, before)


def test_save_without_loldu_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="has no LoLDU layer"):
        save_loldu(TinyLM(), tmp_path)
