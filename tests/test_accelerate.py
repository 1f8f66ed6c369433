"""Models dispatched by accelerate (device_map=): layers carrying hooks are adapted with the hook kept on the
LoLDU layer; offloaded layers are refused by name. CPU only: a cpu + disk device_map gives both kinds."""
import copy

import pytest
import torch
import torch.nn as nn

from loldu_triton import (
    LoLDUConfig,
    LoLDULinear,
    add_loldu,
    get_loldu_model,
    get_loldu_params,
    load_loldu,
    loldu_layers,
    merge_loldu,
    remove_loldu,
    save_loldu,
)
from test_api import TinyLM
from conftest import tiny_llama
from kernel_checks import Float64Reference, float64_copy

hooks = pytest.importorskip("accelerate.hooks")
accelerate = pytest.importorskip("accelerate")


class CastInputs(hooks.ModelHook):
    """Stands in for a device move we can see on a CPU: float64 inputs arrive as float32, and are counted."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return tuple(a.float() for a in args), kwargs


def hooked_tiny_lm():
    torch.manual_seed(0)
    model = TinyLM()
    cast = CastInputs()
    hooks.add_hook_to_module(model.layers[0].q_proj, hooks.SequentialHook(
        hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True), cast))
    return model, cast


def test_a_hooked_layer_is_adapted_and_its_hook_still_runs_around_the_loldu_layer():
    model, cast = hooked_tiny_lm()
    hook = model.layers[0].q_proj._hf_hook
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError):  # without the hook's cast, float64 would not reach this float32 layer
        model.layers[0].q_proj._old_forward(x.double())
    y_base = model.layers[0].q_proj(x.double())
    get_loldu_model(model, LoLDUConfig(rank=4, target_modules=["q_proj"]))
    layer = model.layers[0].q_proj
    assert isinstance(layer, LoLDULinear) and layer._hf_hook is hook
    calls = cast.calls
    assert torch.equal(layer(x.double()), y_base) and cast.calls == calls + 1
    # training: the hook runs in every forward, and the gradient reaches d and s through it
    opt = torch.optim.Adam(get_loldu_params(model), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and cast.calls == calls + 6 and layer.d.grad is not None
    # back to a plain layer: the hook goes with it, and the base comes back bit for bit
    remove_loldu(model)
    plain = model.layers[0].q_proj
    assert type(plain) is nn.Linear and plain._hf_hook is hook
    assert torch.equal(plain(x.double()), y_base) and cast.calls == calls + 7


def test_merge_keeps_the_hook_on_the_merged_layer():
    model, cast = hooked_tiny_lm()
    add_loldu(model, rank=4, target_modules=["q_proj"])
    with torch.no_grad():
        model.layers[0].q_proj.d.mul_(1.5)
    x = torch.randn(3, 16)
    y = model(x)
    unhooked = hooks.remove_hook_from_module(float64_copy(model), recurse=True)  # its cast would undo float64
    reference = Float64Reference(lambda m, x: m(x), unhooked, x.double())
    merge_loldu(model)
    assert type(model.layers[0].q_proj) is nn.Linear and "_hf_hook" in vars(model.layers[0].q_proj)
    calls = cast.calls
    merged = model(x)
    assert cast.calls == calls + 1
    reference.assert_close(y, "adapted")  # each against float64
    reference.assert_close(merged, "merged")


def test_other_forward_replacements_are_still_refused():
    model = TinyLM()
    model.layers[0].q_proj.forward = lambda x: x
    with pytest.raises(ValueError, match="forward is replaced on the instance"):
        add_loldu(model, rank=2, target_modules=["layers.0.q_proj"])


def snapshot(model):
    """Types, hooks and tensors by name; meta tensors (offloaded weights) by identity."""
    return {n: (type(m), vars(m).get("_hf_hook"),
                {k: v if v.is_meta else v.clone() for k, v in m.state_dict(keep_vars=True).items()})
            for n, m in model.named_modules()}


def assert_same(model, before):
    after = snapshot(model)
    assert list(after) == list(before)
    for name, (cls, hook, state) in before.items():
        assert after[name][0] is cls and after[name][1] is hook, name
        assert list(after[name][2]) == list(state), name
        for k, v in state.items():
            assert after[name][2][k] is v if v.is_meta else torch.equal(after[name][2][k], v), (name, k)


def dispatched_llama(offload_dir):
    """A tiny Llama dispatched as device_map= leaves it: layer 0 on the CPU (a hook on every leaf), layer 1
    offloaded to disk (hooks, and weights on the meta device)."""
    model = tiny_llama().eval()
    base = copy.deepcopy(model)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    return accelerate.dispatch_model(model, device_map=device_map, offload_dir=offload_dir), base


def test_device_map_model_trains_its_hooked_layers_and_refuses_offloaded_ones(tmp_path):
    model, base = dispatched_llama(tmp_path / "offload")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_base = model(input_ids=ids).logits
    assert torch.equal(y_base, base(input_ids=ids).logits)
    q_hook = model.model.layers[0].self_attn.q_proj._hf_hook

    before = snapshot(model)
    for target in ("all-linear", ["q_proj"], r"model\.layers\.1\.mlp\.up_proj"):
        with pytest.raises(ValueError, match=r"cannot adapt .*'model.layers.1.self_attn.q_proj'|"
                                             r"cannot adapt 'model.layers.1.mlp.up_proj'"):
            add_loldu(model, rank=4, target_modules=target)
        assert_same(model, before)
    with pytest.raises(ValueError, match=r"offloaded by accelerate .* Load the model so that the layer stays on a "
                                         r"device"):
        add_loldu(model, rank=4, target_modules="all-linear")

    get_loldu_model(model, LoLDUConfig(rank=4, target_modules=r"model\.layers\.0\..*_proj"))
    adapted = [n for n, _ in loldu_layers(model)]
    assert len(adapted) == 7 and all(".layers.0." in n for n in adapted)
    assert model.model.layers[0].self_attn.q_proj._hf_hook is q_hook
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, y_base)  # at init: the base, through the hooks
    opt = torch.optim.Adam(get_loldu_params(model), lr=3e-2)
    model.train()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    with torch.no_grad():
        trained = model(input_ids=ids).logits

    # the adapter file, loaded into an undispatched copy of the base, gives the same model: bit for bit, as the
    # dispatched base gave the base's logits above (the hooks only place tensors)
    save_loldu(model, tmp_path / "adapter")
    load_loldu(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, trained)
    # load_loldu into a dispatched model refuses offloaded layers the same way
    other, _ = dispatched_llama(tmp_path / "offload2")
    add_loldu(base, rank=4, target_modules=r"model\.layers\.1\.self_attn\.q_proj")
    save_loldu(base, tmp_path / "layer1", adapter_name="default")
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"cannot adapt 'model.layers.1.self_attn.q_proj': its weight is offloaded"):
        load_loldu(other, tmp_path / "layer1")
    assert_same(other, before)
