"""LoLDU on bases other libraries quantized: bitsandbytes Linear4bit (nf4, fp4, double quant, compute dtypes)
and Linear8bitLt on its CPU backend, torchao int8 (and int4 where it runs) weight-only nn.Linear.

How numbers are compared: the layer's output is the quantized base's own output plus the rank-r term. Each
adapted layer's output is compared, element by element, with a float64 reference of
``base_output + ((x U^T) e) L^T`` in which base_output is the quantized layer's own output for the same input
(the wrapper adds to that very tensor), under the tolerance of the terms summed (tests/kernel_checks.py). The
base part itself is compared separately with x dequant(W0)^T + b in float64 under the tolerance of the dtype its
kernel computes in. A test skips, with the reason, only where a package cannot be imported or run here.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from conftest import tiny_llama
from kernel_checks import assert_close, outside, tolerance
from loldu_triton import (LoLDUConfig, adapter_batch, add_loldu, disable_loldu, export_lora, get_loldu_model,
                          get_loldu_params, load_loldu, loldu_layers, merge_loldu, remove_loldu, save_loldu,
                          set_adapter, unmerge_loldu)
from loldu_triton.core.fileformat import read_adapter
from loldu_triton.factors.quantized_bases import dequantized_weight, logical_shape, quantized_kind
from loldu_triton.layers.quantized import LoLDUQuantizedLinear

ATTN = ["q_proj", "v_proj"]


def bnb_or_skip():
    try:
        import bitsandbytes
    except Exception as err:  # (ImportError, or a backend that fails to load)
        pytest.skip(f"bitsandbytes does not import here: {err}")
    return bitsandbytes


def torchao_or_skip():
    try:
        from torchao import quantization
    except Exception as err:
        pytest.skip(f"torchao does not import here: {err}")
    return quantization


def linears(model):
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith("lm_head")]


def swap(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_by_hand(model, kind, compute_dtype=torch.float32, double_quant=False):
    """``model`` (changed in place) with every nn.Linear but lm_head quantized as ``kind``."""
    if kind.startswith("torchao"):
        q = torchao_or_skip()
        config = q.Int8WeightOnlyConfig() if kind == "torchao-int8" else q.Int4WeightOnlyConfig(group_size=32)
        try:
            q.quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn)
        except Exception as err:
            pytest.skip(f"torchao {kind} does not run on this CPU: {type(err).__name__}: {str(err)[:200]}")
        left = [name for name, lin in linears(model) if quantized_kind(lin) != kind]
        if left:
            pytest.skip(f"torchao {kind} left {left} unquantized on this CPU")
        return model
    bnb = bnb_or_skip()
    for name, lin in linears(model):
        if kind == "bnb-int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False, threshold=0.0)
            q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            quant_type = kind.split("-")[1]
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=quant_type, compress_statistics=double_quant)
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                         compress_statistics=double_quant)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone())
        swap(model, name, q.to("cpu"))
    return model


# (kind, compute dtype, double quant): every bitsandbytes variant the issue names, and torchao
VARIANTS = [("bnb-nf4", torch.float32, False), ("bnb-nf4", torch.bfloat16, True), ("bnb-fp4", torch.float32, True),
            ("bnb-fp4", torch.float16, False), ("bnb-int8", torch.float32, False),
            ("torchao-int8", torch.float32, False), ("torchao-int4", torch.float32, False)]
IDS = [f"{k}-{str(d).replace('torch.', '')}{'-dq' if q else ''}" for k, d, q in VARIANTS]


def quantized_llama(kind, compute_dtype=torch.float32, double_quant=False, seed=0):
    return quantize_by_hand(tiny_llama(seed), kind, compute_dtype, double_quant)


def ids(seed=1, batch=2, length=9):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def train(model, steps=3, lr=3e-2):
    opt = torch.optim.Adam(get_loldu_params(model), lr=lr)
    x = ids()
    for _ in range(steps):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def assert_layers_match_float64(model, x):
    """Every LoLDU layer's output of a forward of ``model`` against base_output + ((x U^T) e) L^T in float64,
    and its base part against x dequant(W0)^T + b in float64 (the tolerance of its kernel's dtype)."""
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen[name] = (args[0], out)
        return hook

    hooks = [layer.register_forward_hook(keep(name)) for name, layer in loldu_layers(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert set(seen) == {n for n, _ in loldu_layers(model)}
    for name, layer in loldu_layers(model):
        xin, y = seen[name]
        with torch.no_grad():
            base = layer.base_layer(xin)
        X = xin.reshape(-1, xin.shape[-1]).double()
        U, L, e = layer.U.double(), layer.L.double(), layer.delta_diagonal().detach().double()
        assert e.abs().max() > 0, f"{name}: training left e at zero"
        ref = base.reshape(-1, base.shape[-1]).double() + ((X @ U.T) * e) @ L.T
        scale = base.reshape(ref.shape).double().abs() + ((X.abs() @ U.abs().T) * e.abs()) @ L.abs().T
        # the rank-r term runs in the factors' dtype (the base's compute dtype), added to the output's
        side_dtype = min(y.dtype, layer.U.dtype, key=lambda t: torch.finfo(t).bits)
        assert_close(y.reshape(ref.shape), ref, scale, X.shape[1] + U.shape[0] + 1, side_dtype, f"{name}: y")
        W = dequantized_weight(layer.base_layer, layer.quantized_by).double()
        b = layer.bias.double() if layer.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
        kernel_dtype = getattr(layer.base_layer, "compute_dtype", None) or y.dtype
        exact = X @ W.T + b
        tol = tolerance(exact, X.abs() @ W.abs().T + b.abs(), X.shape[1] + 1, kernel_dtype)
        if layer.quantized_by == "bnb-int8":
            # LLM.int8 (threshold > 0, as from_pretrained sets it) casts x to float16 and rounds each row of it to
            # int8 steps of absmax / 127, keeping outlier columns in float16: half a step per entry at most
            half_step = X.abs().amax(dim=1, keepdim=True) / 254
            tol = tol + half_step * W.abs().sum(1)[None, :] + 2.0**-10 * (X.abs() @ W.abs().T)
        bad = outside(base.reshape(ref.shape), exact, tol, f"{name}: base part")
        assert not bad, "\n".join(bad)


@pytest.mark.parametrize("targets", [ATTN, "all-linear"], ids=["q_v", "all_linear"])
@pytest.mark.parametrize("kind,compute_dtype,double_quant", VARIANTS, ids=IDS)
def test_quantized_llama_trains_and_matches_float64_and_moves_to_the_full_model_and_back(
        kind, compute_dtype, double_quant, targets, tmp_path):
    full = tiny_llama()
    model = quantized_llama(kind, compute_dtype, double_quant)
    x = ids(2)
    with torch.no_grad():
        before = model(x).logits
    get_loldu_model(model, LoLDUConfig(rank=6, target_modules=targets))
    layers = loldu_layers(model)
    assert layers and all(isinstance(layer, LoLDUQuantizedLinear) and layer.quantized_by == kind
                          for _, layer in layers)
    assert len(layers) == (2 * 2 if targets == ATTN else 2 * 7)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{n}.{p}" for n, _ in layers for p in ("d", "s")]
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)  # at init: the quantized model's output bit for bit
    train(model)
    assert_layers_match_float64(model, x)
    with torch.no_grad(), disable_loldu(model):
        assert torch.equal(model(x).logits, before)

    # onto the full-precision model: a warning per layer, the same d and s, factors in the adapter's pivot order
    save_loldu(model, tmp_path / "q")
    with pytest.warns(UserWarning, match=rf"not byte-identical.*\({kind} there, float32 here"):
        load_loldu(full, tmp_path / "q")
    for (name, q), (name2, f) in zip(layers, loldu_layers(full)):
        assert name == name2 and torch.equal(q.d, f.d) and torch.equal(q.s, f.s)
        assert torch.equal(q.pivots.cpu(), f.pivots.cpu())
    # ... and back onto a fresh quantized copy: the same d and s, the trained model's outputs bit for bit
    save_loldu(full, tmp_path / "f")
    again = quantized_llama(kind, compute_dtype, double_quant)
    with pytest.warns(UserWarning, match=rf"not byte-identical.*\(float32 there, {kind} here"):
        load_loldu(again, tmp_path / "f")
    for (_, q), (_, a) in zip(layers, loldu_layers(again)):
        assert torch.equal(q.d, a.d) and torch.equal(q.s, a.s)
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8", "torchao-int8"])
def test_same_quantized_base_loads_without_warning_and_named_adapters_batch_per_row(kind, tmp_path):
    model = quantized_llama(kind)
    add_loldu(model, rank=4, target_modules=ATTN)
    train(model)
    save_loldu(model, tmp_path / "a")
    x = ids(3, batch=3)
    with torch.no_grad():
        trained = model(x).logits
    other = quantized_llama(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_loldu(other, tmp_path / "a", adapter_name="tuned")  # byte-identical base: no warning
    with torch.no_grad(), adapter_batch(other, ["tuned", None, "default"]):
        rows = other(x).logits
        base_rows = other(x).logits
    with torch.no_grad():
        base = other(x).logits
    assert torch.equal(base_rows, rows)
    set_adapter(other, "tuned")
    with torch.no_grad():
        tuned = other(x).logits
    assert torch.equal(tuned, trained)
    for i, want in enumerate([trained, base, base]):
        row = rows[i]
        scale = want[i].abs() + (trained[i] - base[i]).abs() + 1e-6
        assert_close(row, want[i].double(), scale.double(), 64, torch.float32, f"row {i}")


def test_adapter_of_a_4bit_base_loads_into_a_full_model_that_already_has_loldu(tmp_path):
    model = quantized_llama("bnb-fp4")
    add_loldu(model, rank=6, target_modules=ATTN)
    train(model)
    save_loldu(model, tmp_path / "q")
    full = tiny_llama()
    add_loldu(full, rank=6, target_modules=ATTN)
    own = {name: layer.pivots.clone() for name, layer in loldu_layers(full)}
    with pytest.warns(UserWarning, match="not byte-identical"):
        load_loldu(full, tmp_path / "q")
    for (name, q), (_, f) in zip(loldu_layers(model), loldu_layers(full)):
        assert torch.equal(f.pivots, q.pivots) and torch.equal(f.d, q.d) and torch.equal(f.s, q.s), name
    assert any(not torch.equal(own[name], layer.pivots) for name, layer in loldu_layers(full))
    # a named adapter would need the layer's own factors: refused, and nothing changed
    other = tiny_llama()
    add_loldu(other, rank=6, target_modules=ATTN)
    before = {name: (layer.pivots.clone(), layer.d.clone()) for name, layer in loldu_layers(other)}
    with pytest.raises(ValueError, match="its LU pivots differ"):
        load_loldu(other, tmp_path / "q", adapter_name="tuned")
    for name, layer in loldu_layers(other):
        assert torch.equal(layer.pivots, before[name][0]) and torch.equal(layer.d, before[name][1])
        assert layer.adapter_names == ()


@pytest.mark.parametrize("kind", ["bnb-int8", "torchao-int8"])  # (bitsandbytes' 4-bit state does not reload on
def test_a_base_loaded_through_load_state_dict_gives_new_factors(kind):  # the CPU: a plain 4-bit model fails too)
    model = quantized_llama(kind)
    add_loldu(model, rank=4, target_modules=ATTN)
    other = quantized_llama(kind, seed=3)
    add_loldu(other, rank=4, target_modules=ATTN)
    train(other)
    x = ids(6)
    layer = model.model.layers[0].self_attn.q_proj
    # the other model's base weights only (no d): new factors, back at init (its own base's output)
    base_only = {k: v for k, v in other.state_dict().items() if not k.endswith((".d", ".s"))}
    missing = model.load_state_dict(base_only, strict=False).missing_keys
    assert sorted(missing) == sorted(k for k in other.state_dict() if k.endswith((".d", ".s")))
    want = other.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.pivots, want.pivots) and torch.equal(layer.L, want.L) and torch.equal(layer.U, want.U)
    assert layer.base_fingerprint()[0] == want.base_fingerprint()[0]
    assert float(layer.delta_diagonal().detach().abs().max()) == 0.0
    # everything, d and s included: the other model itself
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x).logits, other(x).logits)


def test_export_lora_gives_the_same_delta_and_merge_gives_a_full_precision_linear(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = quantized_llama("bnb-nf4")
    add_loldu(model, rank=5, target_modules=ATTN)
    train(model)
    export_lora(model, tmp_path / "lora")
    tensors = safetensors.load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    for name, layer in loldu_layers(model):
        A = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        L, U, e = layer.L.double(), layer.U.double(), layer.delta_diagonal().detach().double()
        delta = (L * e) @ U
        scale = (L.abs() * e.abs()) @ U.abs()
        assert_close(B @ A, delta, scale, U.shape[0], torch.float32, f"{name}: B A")
    x = ids(4)
    with torch.no_grad():
        want = model(x).logits
    expected = {name: layer.merged_weight() for name, layer in loldu_layers(model)}
    with pytest.raises(ValueError, match=r"\['model.layers.0.self_attn.q_proj'.*have a quantized base"):
        merge_loldu(model, reversible=True)
    assert all(not layer.loldu_merged for _, layer in loldu_layers(model))
    with pytest.warns(UserWarning, match="become full-precision nn.Linear layers"):
        merge_loldu(model)
    assert not loldu_layers(model)
    for name, weight in expected.items():
        merged = model.get_submodule(name)
        assert type(merged) is nn.Linear and torch.equal(merged.weight, weight)
    with torch.no_grad():
        got = model(x).logits
    assert float((got - want).abs().max()) < 1e-3 * float(want.abs().max())  # only the 4-bit kernel's rounding
    with pytest.raises(ValueError, match="unmerge_loldu: the model has no LoLDU layer"):
        unmerge_loldu(model)


def test_remove_gives_back_the_quantized_module_itself():
    model = quantized_llama("bnb-fp4")
    q = model.model.layers[0].self_attn.q_proj
    add_loldu(model, rank=3, target_modules=ATTN)
    assert model.model.layers[0].self_attn.q_proj.base_layer is q
    remove_loldu(model)
    assert model.model.layers[0].self_attn.q_proj is q


def test_refusals_name_the_layer_and_change_nothing():
    bnb = bnb_or_skip()
    model = quantized_llama("bnb-nf4")
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is already quantized \(bnb-nf4\); "
                                         r"base_quantization='int8' would quantize it again"):
        add_loldu(model, rank=4, target_modules=ATTN, base_quantization="int8")
    assert dict(model.named_modules()) == before
    with pytest.raises(ValueError, match="is quantized \\(bnb-nf4\\); the reference code's loldu_config"):
        from functools import partial
        from loldu_triton import LoLDUParametrization
        add_loldu(model, {nn.Linear: {"weight": partial(LoLDUParametrization.from_linear, rank=2)}})
    assert dict(model.named_modules()) == before
    with pytest.raises(ValueError, match="add_loldu: progress must be None, True or False, got 'yes'"):
        add_loldu(model, rank=4, target_modules=ATTN, progress="yes")
    # a 4-bit layer not quantized yet (never moved to a device), one on the meta device
    raw = nn.Sequential(bnb.nn.Linear4bit(32, 16, quant_type="nf4"))
    with pytest.raises(ValueError, match=r"cannot adapt '0': its 4-bit weight is not quantized yet"):
        add_loldu(raw, rank=2, target_modules=["0"])
    assert type(raw[0]).__name__ == "Linear4bit"
    with torch.device("meta"):
        meta = nn.Sequential(bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False))
    with pytest.raises(ValueError, match=r"cannot adapt '0': its quantized weight is on the meta device"):
        add_loldu(meta, rank=2, target_modules=["0"])
    # left out with a warning under None / all-linear
    with pytest.warns(UserWarning, match=r"left out \['0'\]: its 4-bit weight is not quantized yet"):
        with pytest.raises(ValueError, match="no layer to adapt"):
            add_loldu(raw, rank=2)
    # a rank the layer cannot hold: the logical shape, not the packed one
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, min\(out, in\)\] = \[1, 16\] for weight "
                                         r"16x32"):
        LoLDUQuantizedLinear.from_base(quantize_by_hand(nn.Sequential(nn.Linear(32, 16)), "bnb-nf4")[0], 17)


def test_a_4bit_weight_repacked_for_the_cpu_kernel_is_refused_by_name(tmp_path):
    model = quantize_by_hand(nn.Sequential(nn.Linear(128, 64)), "bnb-nf4")
    if not getattr(model[0], "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack 4-bit weights here")
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 128))
    with pytest.raises(ValueError, match=r"cannot adapt '0': bitsandbytes repacked its 4-bit weight"):
        add_loldu(model, rank=2, target_modules=["0"])
    # added before: the fingerprint was taken then, so the adapter still saves after such a forward (as after a
    # Trainer's evaluation or generate)
    model = quantize_by_hand(nn.Sequential(nn.Linear(128, 64)), "bnb-nf4")
    add_loldu(model, rank=2)
    with torch.no_grad():
        model[0].d.mul_(1.5)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 128))
    save_loldu(model, tmp_path)
    _, tensors, _ = read_adapter(tmp_path)
    assert torch.equal(tensors["0.d"], model[0].d.detach()) and torch.equal(tensors["0.s"], model[0].s.detach())
    with pytest.raises(ValueError, match="repacked its 4-bit weight"):
        merge_loldu(model)
    assert isinstance(model[0], LoLDUQuantizedLinear)


@pytest.mark.parametrize("kind", ["bnb-int8", "bnb-nf4"])  # (no bias; nf4 with bitsandbytes' float32 default)
def test_a_merge_of_a_bf16_quantized_model_gives_layers_in_the_models_dtype(kind, tmp_path):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = quantize_by_hand(tf.LlamaForCausalLM(config).to(torch.bfloat16), kind)
    wrapped = get_loldu_model(model, LoLDUConfig(rank=8, target_modules=["q_proj", "v_proj"]))
    assert model.model.layers[0].self_attn.q_proj.L.dtype == torch.float32  # the factors: the base's compute dtype
    with pytest.warns(UserWarning, match="round"):
        plain = wrapped.merge_and_unload()
    q_proj = plain.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.bfloat16
    assert plain(ids()).logits.dtype == torch.bfloat16  # runs in the model's dtype


def test_a_quantized_bases_adapter_loads_as_a_named_adapter_onto_a_plain_model(tmp_path):
    model = quantized_llama("bnb-nf4")
    add_loldu(model, rank=4, target_modules=ATTN)
    train(model)
    save_loldu(model, tmp_path)
    full = tiny_llama()
    with pytest.warns(UserWarning, match="not byte-identical"):
        load_loldu(full, tmp_path, adapter_name="tuned")  # new layers: they take the adapter's pivot order
    saved = {name: layer.d.detach() for name, layer in loldu_layers(model)}
    for name, layer in loldu_layers(full):
        assert torch.equal(layer.adapter_values("tuned")[0].cpu(), saved[name].cpu())


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8"])
def test_a_quantized_weight_that_dequantizes_to_nan_is_refused_by_name(kind):
    model = quantized_llama(kind)
    layer = model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        if kind == "bnb-nf4":
            state = layer.weight.quant_state
            (state.state2.absmax if state.nested else state.absmax)[0] = float("nan")
        else:
            layer.weight.SCB[3] = float("inf")
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.v_proj: weight of shape \(16, 32\) contains "
                                         r"NaN or Inf"):
        add_loldu(model, rank=2, target_modules=ATTN)
    assert dict(model.named_modules()) == before and not loldu_layers(model)


def test_wrong_inputs_are_refused_by_name():
    model = quantized_llama("bnb-int8")
    add_loldu(model, rank=2, target_modules=ATTN)
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: input of shape \(3, 31\) has last dim "
                                         r"31, expected 32"):
        layer(torch.randn(3, 31))
    assert quantized_kind(layer) is None and quantized_kind(layer.base_layer) == "bnb-int8"
    assert logical_shape(layer) == (32, 32) == logical_shape(layer.base_layer)
    with pytest.raises(ValueError, match="not a quantized layer"):
        LoLDUQuantizedLinear.from_base(nn.Linear(4, 4), 2)
    with pytest.raises(ValueError, match="cannot wrap str: it is not a quantized layer"):
        LoLDUQuantizedLinear.from_base("q_proj", 2)


FROM_PRETRAINED = {"nf4-double-quant": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32),
                   "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
                   "int8": dict(load_in_8bit=True)}


@pytest.mark.parametrize("settings", list(FROM_PRETRAINED))
def test_from_pretrained_with_bitsandbytes_config_on_cpu(settings, tmp_path):
    bnb_or_skip()
    tf = pytest.importorskip("transformers")
    tiny_llama().save_pretrained(tmp_path / "base")
    x = ids(5)
    try:
        model = tf.LlamaForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu",
                                                    quantization_config=tf.BitsAndBytesConfig(**FROM_PRETRAINED[settings]))
        # train mode: in eval mode a forward without gradients lets bitsandbytes repack 4-bit weights for its
        # CPU kernel (on CPUs with AVX512-BF16), which fails for these small shapes (and cannot be read back)
        model.train()
        with torch.no_grad():
            before = model(x).logits
    except Exception as err:  # the quantized model itself, before LoLDU
        pytest.skip(f"from_pretrained with BitsAndBytesConfig({settings}) does not run on this CPU: "
                    f"{type(err).__name__}: {str(err)[:200]}")
    get_loldu_model(model, LoLDUConfig(rank=4, target_modules="all-linear"))
    assert len(loldu_layers(model)) == 14
    assert all(isinstance(layer, LoLDUQuantizedLinear) for _, layer in loldu_layers(model))
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    train(model, steps=2)
    assert_layers_match_float64(model, x)


def test_progress_bar_names_the_layers_when_asked_and_stays_off_otherwise(capsys, monkeypatch, tmp_path):
    model = tiny_llama()
    add_loldu(model, rank=2, target_modules=ATTN, progress=True)
    err = capsys.readouterr().err
    assert "add_loldu" in err and "model.layers.1.self_attn.v_proj (16x32)" in err and "4/4" in err
    save_loldu(model, tmp_path / "a")
    load_loldu(tiny_llama(), tmp_path / "a", progress=True)
    assert "load_loldu" in capsys.readouterr().err
    monkeypatch.setenv("LOLDU_PROGRESS", "1")
    add_loldu(tiny_llama(), rank=2, target_modules=ATTN)
    assert "add_loldu" in capsys.readouterr().err
    monkeypatch.setenv("LOLDU_PROGRESS", "0")
    add_loldu(tiny_llama(), rank=2, target_modules=ATTN)
    add_loldu(tiny_llama(), rank=2, target_modules=ATTN, progress=False)
    load_loldu(tiny_llama(), tmp_path / "a")
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("LOLDU_PROGRESS")
    add_loldu(tiny_llama(), rank=2, target_modules=ATTN)  # stderr is captured, not a terminal: no bar
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="load_loldu: progress must be None, True or False, got 1"):
        load_loldu(tiny_llama(), tmp_path / "a", progress=1)
