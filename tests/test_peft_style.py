"""The PEFT-like surface: LoLDUConfig, get_loldu_model, disable as a context manager, named adapters (list,
set trainable, delete, save any), merges that refuse to drop adapters, and a reversible merge."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from kernel_checks import Float64Reference, assert_float64_close, float64_copy
from loldu_triton import (
    LoLDUConfig,
    LoLDULinear,
    adapter_batch,
    add_loldu,
    delete_adapter,
    disable_loldu,
    enable_loldu,
    get_active_adapter,
    LoLDUModel,
    get_loldu_model,
    get_loldu_params,
    list_adapters,
    load_loldu,
    loldu_layers,
    merge_loldu,
    print_trainable_parameters,
    remove_loldu,
    save_loldu,
    set_adapter,
    unmerge_loldu,
)
from loldu_triton.core.fileformat import ADAPTER_NAME, serialize
from test_adapters import assert_unchanged, read_file, snapshot
from test_api import TinyLM, train

TARGETS = ["q_proj", "v_proj", "lm_head"]


def full_snapshot(model):
    """Types, every tensor (buffers too) and requires_grad, by name."""
    state = snapshot(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    named = {n: (m.active_adapter, m.adapter_names, m.loldu_enabled, m.loldu_merged)
             for n, m in loldu_layers(model)}
    return state, grads, named


def assert_same(model, before):
    state, grads, named = before
    assert_unchanged(model, state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: (m.active_adapter, m.adapter_names, m.loldu_enabled, m.loldu_merged)
            for n, m in loldu_layers(model)} == named


# ----------------------------------------------------------------------------------------------------------
# LoLDUConfig
# ----------------------------------------------------------------------------------------------------------


def test_config_checks_every_field_when_built_and_when_set():
    config = LoLDUConfig(rank=16, target_modules=("q_proj", "v_proj"))
    assert config.target_modules == ("q_proj", "v_proj") and config.alpha is None and config.init == "lu"
    bad = [dict(rank=0), dict(rank=2.5), dict(rank=True), dict(rank="16"), dict(alpha=float("nan")),
           dict(alpha=-1), dict(init="zeros"), dict(init_seed=1.5), dict(target_modules=[]),
           dict(target_modules=["q", 3]), dict(target_modules="("), dict(base_quantization="int4"),
           dict(backend="cuda")]
    for kwargs in bad:
        field = next(iter(kwargs))
        with pytest.raises(ValueError, match=rf"LoLDUConfig: {field} must|LoLDUConfig: {field} .* not a valid"):
            LoLDUConfig(**kwargs)
        with pytest.raises(ValueError, match=rf"LoLDUConfig: {field}"):
            setattr(config, field, kwargs[field])
    assert config == LoLDUConfig(rank=16, target_modules=["q_proj", "v_proj"])  # no refused value stuck
    with pytest.raises(AttributeError, match="no field 'rnak'"):
        config.rnak = 4
    config.r = 4  # PEFT's name for rank, checked as rank
    assert config.rank == 4 == config.r
    with pytest.raises(ValueError, match="LoLDUConfig: rank must be"):
        config.r = 0
    assert config.rank == 4


def test_config_dict_round_trip_and_hostile_dicts_name_the_source_and_field():
    config = LoLDUConfig(rank="full", alpha=2, init="normal", init_seed=3, target_modules=r".*proj",
                         base_quantization="int8", backend="torch")
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert LoLDUConfig.from_dict(data) == config and LoLDUConfig.from_dict({}) == LoLDUConfig()
    with pytest.raises(ValueError, match=r"my.json: 'lora_alpha' is a LoRA setting with no LoLDU meaning: LoLDU "
                                         r"scales by alpha / rank"):
        LoLDUConfig.from_dict({"rank": 4, "lora_alpha": 8}, "my.json")
    with pytest.raises(ValueError, match=r"my.json: unknown LoLDU config fields \['lora_alfa'\]"):
        LoLDUConfig.from_dict({"rank": 4, "lora_alfa": 8}, "my.json")
    with pytest.raises(ValueError, match=r"my.json: init must be one of"):
        LoLDUConfig.from_dict({"init": ["lu"]}, "my.json")
    with pytest.raises(ValueError, match=r"my.json: a LoLDU config must be a dict, got list"):
        LoLDUConfig.from_dict([], "my.json")
    listed = LoLDUConfig(target_modules=["a"])
    listed.to_dict()["target_modules"].append("b")  # to_dict hands out a copy
    assert listed.target_modules == ("a",)


def test_get_loldu_model_adapts_freezes_the_rest_and_returns_the_model(capsys):
    model = TinyLM()
    config = LoLDUConfig(rank=4, target_modules=["q_proj", "v_proj"])
    wrapped = get_loldu_model(model, config)
    assert wrapped.get_base_model() is model and isinstance(wrapped, LoLDUModel)  # changed in place, wrapped
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"layers.{i}.{m}.{p}" for i in range(2) for m in ("q_proj", "v_proj") for p in "ds"]
    assert print_trainable_parameters(model)[0] == 4 * (4 + 1)
    assert "trainable params: 20 ||" in capsys.readouterr().out
    same = TinyLM()
    same.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith((".d", ".s"))})
    add_loldu(same, rank=4, target_modules=["q_proj", "v_proj"])  # the keyword route builds the same layers
    x = torch.randn(3, 16)
    assert torch.equal(model(x), same(x)) and torch.equal(model.layers[1].v_proj.U, same.layers[1].v_proj.U)
    assert model.layers[0].q_proj.loldu_settings() == LoLDUConfig(rank=4, alpha=4.0)


def test_get_loldu_model_refusals_change_nothing():
    model = TinyLM()
    before = full_snapshot(model)
    with pytest.raises(TypeError, match="config must be a LoLDUConfig or a dict, got list"):
        get_loldu_model(model, [("rank", 4)])
    with pytest.raises(ValueError, match="get_loldu_model: 'lora_alpha' is a LoRA setting"):
        get_loldu_model(model, {"r": 4, "lora_alpha": 8})
    with pytest.raises(ValueError, match="'o_proj' matches no nn.Linear"):
        get_loldu_model(model, LoLDUConfig(rank=4, target_modules=["q_proj", "o_proj"]))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")  # (inf: torch.equal holds for it, unlike NaN)
    before = full_snapshot(model)
    with pytest.raises(ValueError, match="lm_head: weight of shape"):
        get_loldu_model(model, LoLDUConfig(rank=4))
    assert_same(model, before)
    with pytest.raises(ValueError, match=r"not both \(got \['rank'\] next to a LoLDUConfig\)"):
        add_loldu(model, LoLDUConfig(rank=4), rank=8)
    assert_same(model, before)


def test_adapter_file_stores_the_config_and_from_pretrained_reads_it_back(tmp_path):
    model = TinyLM()
    base = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="holds at most rank 6"):
        get_loldu_model(model, LoLDUConfig(rank=10, init="normal", init_seed=7, target_modules=TARGETS))
    save_loldu(model, tmp_path)  # lm_head (6 x 16) was lowered to rank 6: the common config still says 10
    config = LoLDUConfig.from_pretrained(tmp_path)
    assert config == LoLDUConfig(rank=10, alpha=None, init="normal", init_seed=7, target_modules=(
        r"layers\.0\.q_proj|layers\.0\.v_proj|layers\.1\.q_proj|layers\.1\.v_proj|lm_head"))
    fresh = TinyLM()
    fresh.load_state_dict(base)
    with pytest.warns(UserWarning, match="holds at most rank 6"):
        get_loldu_model(fresh, config)
    layer = fresh.lm_head
    load_loldu(fresh, tmp_path)  # the same settings: values copied into the layers get_loldu_model built
    assert fresh.lm_head is layer and torch.equal(layer.d, model.lm_head.d)

    file_config, tensors = read_file(tmp_path)
    assert file_config["layers"]["lm_head"]["rank"] == 6 and file_config["layers"]["lm_head"]["init_seed"] == 7
    file_config["init"] = "bogus"
    (tmp_path / ADAPTER_NAME).write_bytes(serialize(tensors, json.dumps(file_config)))
    other = TinyLM()
    other.load_state_dict(base)
    before = full_snapshot(other)
    for read in (LoLDUConfig.from_pretrained, lambda d: load_loldu(other, d)):
        with pytest.raises(ValueError, match=rf"{ADAPTER_NAME}: config: init must be one of"):
            read(tmp_path)
    assert_same(other, before)


def test_from_pretrained_refuses_an_adapter_no_single_config_gives(tmp_path):
    model = TinyLM()
    add_loldu(model, rank=4, target_modules=["q_proj"])
    add_loldu(model, rank=2, init="uniform", target_modules=["v_proj"])
    save_loldu(model, tmp_path)
    assert read_file(tmp_path)[0]["rank"] is None
    with pytest.raises(ValueError, match="stores no single LoLDUConfig .*'layers.0.q_proj': \\(4, 4.0, 'lu'\\)"):
        LoLDUConfig.from_pretrained(tmp_path)


def test_a_hostile_layer_record_is_refused_naming_the_file_layer_and_field(tmp_path):
    model = TinyLM()
    base = copy.deepcopy(model.state_dict())
    add_loldu(model, rank=4, target_modules=["q_proj"])
    save_loldu(model, tmp_path)
    file_config, tensors = read_file(tmp_path)
    tensors = {k: v.clone() for k, v in tensors.items()}  # (not views of the file rewritten below)
    for field, value, match in [("base_quantization", "int4", "base_quantization must be None or one of"),
                                ("rank", "full", "a layer's rank must be an int"),
                                ("alpha", None, "a layer's rank must be an int and its alpha a number"),
                                ("lora_alpha", 8, r"has unknown fields \['lora_alpha'\]")]:
        hostile = copy.deepcopy(file_config)
        hostile["layers"]["layers.1.q_proj"][field] = value
        (tmp_path / ADAPTER_NAME).write_bytes(serialize(tensors, json.dumps(hostile)))
        other = TinyLM()
        other.load_state_dict(base)
        before = full_snapshot(other)
        with pytest.raises(ValueError, match=rf"{ADAPTER_NAME}: layer 'layers.1.q_proj'.*{match}"):
            load_loldu(other, tmp_path)
        assert_same(other, before)


# ----------------------------------------------------------------------------------------------------------
# disable / enable
# ----------------------------------------------------------------------------------------------------------


def trained(seed=0, targets=TARGETS):
    torch.manual_seed(seed)
    model = TinyLM()
    base = copy.deepcopy(model)
    get_loldu_model(model, LoLDUConfig(rank=4, target_modules=targets))
    train(model, torch.randn(6, 16), steps=4)
    return model, base


def test_disable_works_as_a_call_and_as_a_context_manager():
    model, base = trained()
    x = torch.randn(5, 16)
    y_base, y_trained = base(x), model(x)
    with disable_loldu(model) as inside:
        assert inside is model and torch.equal(model(x), y_base)
    assert torch.equal(model(x), y_trained)
    with pytest.raises(RuntimeError, match="boom"):
        with disable_loldu(model):
            raise RuntimeError("boom")
    assert torch.equal(model(x), y_trained)  # restored after the exception too
    disable_loldu(model)  # the plain call, as in the reference code
    assert torch.equal(model(x), y_base)
    with enable_loldu(model):
        assert torch.equal(model(x), y_trained)
    assert torch.equal(model(x), y_base)  # the state from before the block: disabled
    enable_loldu(model)
    model.lm_head.loldu_enabled = False  # per-layer states come back as they were
    with disable_loldu(model):
        pass
    assert [layer.loldu_enabled for _, layer in loldu_layers(model)] == [True] * 4 + [False]


# ----------------------------------------------------------------------------------------------------------
# Named adapters
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path):
    """A model with the trainable "default" adapter and two named ones, and each adapter's own model."""
    models = {}
    for seed, name in enumerate(["default", "a", "b"]):
        models[name], base = trained(seed=0)
        torch.manual_seed(100 + seed)
        train(models[name], torch.randn(6, 16), steps=3)
        save_loldu(models[name], tmp_path / name)
    serving = copy.deepcopy(base)
    load_loldu(serving, tmp_path / "default")
    load_loldu(serving, tmp_path / "a", adapter_name="a")
    load_loldu(serving, tmp_path / "b", adapter_name="b")
    return serving, models, base, tmp_path


def values(model, name):
    return [tuple(t.clone() for t in layer.adapter_values(name)) for _, layer in loldu_layers(model)]


def test_list_set_and_delete_adapters(served):
    serving, models, base, _ = served
    x = torch.randn(4, 16)
    assert list_adapters(serving) == ["default", "a", "b"] and get_active_adapter(serving) == "default"
    stored = {name: values(serving, name) for name in ("default", "a", "b")}
    d_param = serving.lm_head.d
    set_adapter(serving, "a")
    assert get_active_adapter(serving) == "a" and list_adapters(serving) == ["a", "b", "default"]
    assert serving.lm_head.d is d_param  # in place: the parameter objects stay
    assert torch.equal(serving(x), models["a"](x))
    with adapter_batch(serving, ["default", "a", None, "b"]):
        rows = serving(x)
    for i, name in enumerate(["default", "a", None, "b"]):  # each row against its model alone, in float64
        alone = base if name is None else models[name]
        assert_float64_close(rows[i:i + 1], lambda m, x: m(x), float64_copy(alone), x[i:i + 1].double(),
                             name=f"row {i} ({name})")
    set_adapter(serving, "default")
    for name in ("default", "a", "b"):  # switching there and back is exact
        for got, want in zip(values(serving, name), stored[name]):
            assert all(torch.equal(g, w) for g, w in zip(got, want)), name
    delete_adapter(serving, "a")
    assert list_adapters(serving) == ["default", "b"]
    assert torch.equal(serving(x), models["default"](x))


def test_adapter_refusals_name_the_problem_and_change_nothing(served):
    serving, *_ = served
    before = full_snapshot(serving)
    for call, match in [
        (lambda: set_adapter(serving, "zzz"), r"no adapter 'zzz'; the model has \['default', 'a', 'b'\]"),
        (lambda: set_adapter(serving, 3), "adapter_name must be a non-empty string, got 3"),
        (lambda: delete_adapter(serving, "default"), "'default' is the trainable adapter"),
        (lambda: delete_adapter(serving, "zzz"), "no adapter 'zzz'"),
        (lambda: merge_loldu(serving), r"named adapters that merging would drop: .*'lm_head': \['a', 'b'\]"),
        (lambda: set_adapter(TinyLM(), "a"), "the model has no LoLDU layer"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
        assert_same(serving, before)


def test_save_any_adapter_and_it_loads_back_as_that_adapter_bit_for_bit(served):
    serving, models, base, tmp_path = served
    save_loldu(serving, tmp_path / "a-again", adapter_name="a")
    save_loldu(serving, tmp_path / "default-again", adapter_name="default")
    with pytest.raises(ValueError, match=r"no layer has an adapter 'zzz'"):
        save_loldu(serving, tmp_path / "zzz", adapter_name="zzz")
    assert not (tmp_path / "zzz").exists()
    # as the trainable adapter of a fresh base, and as a named one
    fresh = copy.deepcopy(base)
    load_loldu(fresh, tmp_path / "a-again")
    load_loldu(fresh, tmp_path / "default-again", adapter_name="default-copy")
    for (_, got), (_, want) in zip(loldu_layers(fresh), loldu_layers(models["a"])):
        assert torch.equal(got.d, want.d) and torch.equal(got.s, want.s)
    for got, want in zip(values(fresh, "default-copy"), values(serving, "default")):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), models["a"](x))
    assert read_file(tmp_path / "a-again")[1]["lm_head.d"].equal(read_file(tmp_path / "a")[1]["lm_head.d"])


# ----------------------------------------------------------------------------------------------------------
# Merges
# ----------------------------------------------------------------------------------------------------------


def test_reversible_merge_serves_the_trained_function_and_unmerge_gives_the_base_back_bit_for_bit(served):
    serving, models, base, tmp_path = served
    x = torch.randn(5, 16)
    y = serving(x)
    reference = Float64Reference(lambda m, x: m(x), float64_copy(serving), x.double())
    weights = {n: (m.weight, m.weight.clone()) for n, m in loldu_layers(serving)}
    merge_loldu(serving, reversible=True)
    assert all(m.loldu_merged and m.weight is not weights[n][0] for n, m in loldu_layers(serving))
    reference.assert_close(y, "adapted")  # each against float64
    reference.assert_close(serving(x), "merged")
    assert "merged" in repr(serving.lm_head)
    before = full_snapshot(serving)
    for call in (lambda: set_adapter(serving, "a"),
                 lambda: load_loldu(serving, tmp_path / "a"), lambda: adapter_batch(serving, [None]).__enter__()):
        with pytest.raises(ValueError, match=r"are merged \(merge_loldu\(model, reversible=True\)\); call "
                                             r"unmerge_loldu\(model\) first"):
            call()
        assert_same(serving, before)
    with disable_loldu(serving):  # merged and disabled: the base itself (state rules)
        assert torch.equal(serving(x), base(x)) and serving.lm_head.loldu_merged
    save_loldu(serving, tmp_path / "while-merged")  # the base's fingerprint, not the merged weight's
    unmerge_loldu(serving)
    for n, m in loldu_layers(serving):
        assert m.weight is weights[n][0] and torch.equal(m.weight, weights[n][1]) and not m.loldu_merged
    assert torch.equal(serving(x), y)
    fresh = copy.deepcopy(base)
    load_loldu(fresh, tmp_path / "while-merged")
    assert torch.equal(fresh(x), y)
    # training goes on exactly as if the merge never happened
    twin = copy.deepcopy(serving)
    merge_loldu(serving, reversible=True)
    unmerge_loldu(serving)
    torch.manual_seed(5)
    train(serving, x, steps=2)
    torch.manual_seed(5)
    train(twin, x, steps=2)
    assert torch.equal(serving(x), twin(x))


def test_merged_model_moves_with_to_and_removes_or_merges_for_good(served):
    serving, _, base, _ = served
    x = torch.randn(5, 16)
    y = serving(x)
    reference = Float64Reference(lambda m, x: m(x), float64_copy(serving), x.double())
    merge_loldu(serving, reversible=True)
    serving.to(torch.float64)  # the weight kept aside follows the layer
    unmerge_loldu(serving)
    assert serving.lm_head.weight.dtype == torch.float64
    serving.to(torch.float32)
    assert torch.equal(serving(x), y)
    merged = copy.deepcopy(serving)
    merge_loldu(serving, reversible=True)
    remove_loldu(serving)  # from the merged state: the untouched base
    assert not loldu_layers(serving) and torch.equal(serving(x), base(x))
    merge_loldu(merged, reversible=True)
    for name in ("a", "b"):
        delete_adapter(merged, name)
    merge_loldu(merged)  # for good, from the reversible state
    assert not loldu_layers(merged) and type(merged.lm_head) is nn.Linear
    reference.assert_close(y, "adapted")  # each against float64
    reference.assert_close(merged(x), "merged")


def test_reversible_merge_refuses_a_quantized_base_and_changes_nothing():
    model = TinyLM()
    add_loldu(model, rank=4, target_modules=["q_proj"])
    add_loldu(model, rank=4, target_modules=["v_proj"], base_quantization="int8")
    before = full_snapshot(model)
    with pytest.raises(ValueError, match=r"\['layers.0.v_proj', 'layers.1.v_proj'\] have a quantized base"):
        merge_loldu(model, reversible=True)
    assert_same(model, before)
    with pytest.raises(ValueError, match="reversible must be True or False"):
        merge_loldu(model, reversible="yes")
    assert_same(model, before)
    assert isinstance(model.layers[0].q_proj, LoLDULinear)


def test_every_public_function_and_method_has_a_docstring():
    import inspect

    import loldu_triton

    overrides = {"forward", "extra_repr", "reset_parameters"}  # nn.Module's, documented there
    missing = []
    for name in loldu_triton.__all__ + ["LoLDUCheckpointCallback"]:
        obj = getattr(loldu_triton, name)
        if callable(obj) and not (obj.__doc__ or "").strip():
            missing.append(name)
        if inspect.isclass(obj):
            missing += [f"{name}.{m}" for m, f in vars(obj).items() if not m.startswith("_") and m not in overrides
                        and callable(f) and not (getattr(f, "__doc__", "") or "").strip()]
    assert not missing
