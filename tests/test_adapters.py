import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from loldu_triton import add_loldu, load_loldu, loldu_layers, save_loldu
from loldu_triton.core.fileformat import ADAPTER_NAME, serialize
from loldu_triton.factors.fingerprint import weight_sketch
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


def read_file(directory):
    """(config, tensors) of a saved adapter, read without the library's checks."""
    from safetensors import safe_open

    with safe_open(str(directory / ADAPTER_NAME), "pt") as f:
        return json.loads(f.metadata()["config"]), {k: f.get_tensor(k) for k in f.keys()}


def rewrite(directory, config, tensors):
    """Write an adapter file as an attacker who knows the format would: valid checksum, chosen contents."""
    (directory / ADAPTER_NAME).write_bytes(serialize(tensors, json.dumps(config)))


def test_one_file_holds_d_s_pivots_and_a_sketch_per_layer(tmp_path):
    model, _ = trained_model(rank=4)
    save_loldu(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_NAME]
    data = (tmp_path / ADAPTER_NAME).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    config, tensors = read_file(tmp_path)
    layers = config["layers"]
    # d and s (r + 1 float32), pivots (r int32), sketch (9 float64)
    payload = sum((spec["rank"] + 1) * 4 + spec["rank"] * 4 + 9 * 8 for spec in layers.values())
    assert len(layers) == 5 and len(data) == 8 + header_len + payload
    assert header_len < 700 * len(layers)
    assert torch.equal(tensors["lm_head.d"], model.lm_head.d.detach())


def test_config_records_settings_version_and_base_fingerprints(tmp_path):
    model, _ = trained_model(rank=4)
    save_loldu(model, tmp_path)
    config, tensors = read_file(tmp_path)
    assert config["rank"] == 4 and config["alpha"] == 4.0 and config["init"] == "lu"
    assert config["library_version"]
    assert config["target_modules"] == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj",
                                        "lm_head"]
    base = config["layers"]["lm_head"]["base"]
    assert tensors["lm_head.pivots"].tolist() == model.lm_head.pivots.tolist() and len(base["sha256"]) == 64
    assert base["precision"] == "float32"
    assert torch.equal(tensors["lm_head.sketch"], weight_sketch(model.lm_head.weight))


def write_legacy(model, directory):
    """The first file format (adapter_config.json + adapter_model.safetensors), as version 0.1 wrote it."""
    from safetensors.torch import save_file

    layers = {name: {"rank": layer.rank, "alpha": layer.alpha, "init": layer.init, "init_seed": layer.init_seed,
                     "type": layer.base_class.__name__, "weight_shape": list(layer.weight.shape),
                     "base": {"pivots": layer.pivots.tolist(), "pivot_values": layer.pivot_values.tolist(),
                              "sha256": layer.base_fingerprint()[0], "dtype": "float32"}}
              for name, layer in loldu_layers(model)}
    config = {"format": "loldu-triton-adapter", "format_version": 1, "library_version": "0.1.0", "layers": layers}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({f"{n}.{p}": getattr(layer, p).detach().reshape(-1).clone() for n, layer in loldu_layers(model)
               for p in ("d", "s")}, str(directory / "adapter_model.safetensors"))


def test_first_format_still_loads_and_a_new_save_replaces_it(tmp_path):
    model, base_state = trained_model()
    x = torch.randn(5, 16)
    write_legacy(model, tmp_path)
    fresh = TinyLM()
    fresh.load_state_dict(base_state)
    load_loldu(fresh, tmp_path)
    assert torch.equal(fresh(x), model(x))
    save_loldu(fresh, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_NAME]
    again = TinyLM()
    again.load_state_dict(base_state)
    load_loldu(again, tmp_path)
    assert torch.equal(again(x), model(x))


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


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing", "flipped_bit", "bad_config", "nan"])
def test_damaged_files_are_refused_naming_the_file_and_the_model_is_unchanged(tmp_path, damage):
    model, base_state = trained_model()
    save_loldu(model, tmp_path)
    path = tmp_path / ADAPTER_NAME
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-7])
        match = f"{ADAPTER_NAME} is truncated or corrupt"
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 50)
        match = f"{ADAPTER_NAME} is truncated or corrupt"
    elif damage == "missing":
        path.unlink()
        match = f"no adapter at .*{ADAPTER_NAME}"
    elif damage == "flipped_bit":
        path.write_bytes(data[:-30] + bytes([data[-30] ^ 0x04]) + data[-29:])
        match = f"{ADAPTER_NAME} fails its checksum"
    elif damage == "bad_config":
        config, tensors = read_file(tmp_path)
        del config["layers"]["lm_head"]["init_seed"]
        rewrite(tmp_path, config, tensors)
        match = f"{ADAPTER_NAME}: layer 'lm_head' has no 'init_seed'"
    else:
        config, tensors = read_file(tmp_path)
        tensors["lm_head.d"][1] = float("nan")
        rewrite(tmp_path, config, tensors)
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


def test_a_4096_square_layer_at_rank_1024_takes_well_under_16_kb(tmp_path):
    # The paper's LLaMA2-7B setting, one layer: d and s (4,100 B), pivots (4,096 B), the sketch (72 B) and the
    # settings; nothing grows with the layer's width. (benchmarks/adapter_size.py measures the 64 layers.)
    model = nn.Module()
    model.q_proj = nn.Linear(4096, 4096, bias=False)
    add_loldu(model, rank=1024)
    save_loldu(model, tmp_path)
    size = (tmp_path / ADAPTER_NAME).stat().st_size
    assert size < 10_000, size
