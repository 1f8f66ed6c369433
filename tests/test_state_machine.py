"""The state rules (README, "Guarantees") as a state machine: random sequences of every verb that changes a
model's LoLDU state, on a two-layer model. After each step the state is the one the rules say, and each layer's
float32 output equals, element by element, a float64 model of that state computed from the base weights and
the (d, s) the state says are active. A refused verb must name itself and change nothing."""
import copy
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kernel_checks import mismatches
from loldu_triton import (add_loldu, adapter_batch, delete_adapter, disable_loldu, enable_loldu, load_loldu,
                          loldu_layers, merge_loldu, save_loldu, set_adapter, unmerge_loldu)
from loldu_triton.model.manage import loldu_state
from test_adapters import assert_unchanged, snapshot

NAMES = ["default", "a", "b"]
BATCH = 3


def reference(x, layer, values):
    """Float64 output of ``layer`` on input x for (d, s) = values, or of its base for values None; and the
    scale (sum of |terms|) and length each element's tolerance needs."""
    X = x.detach().double()
    W = layer.base_weight().detach().double()
    b = layer.bias.detach().double()
    A = W.abs()
    if values is not None:
        d, s = (v.detach().double() for v in values)
        e = s * d - layer.s0.double() * layer.d0.double()
        L, U = layer.L.double(), layer.U.double()
        W = W + (L * e) @ U
        A = A + (L.abs() * e.abs()) @ U.abs()
    return X @ W.T + b, X.abs() @ A.T + b.abs(), W.shape[1] + layer.rank + 1


class LoLDUStates(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
        add_loldu(self.model, rank=3)
        self.layers = dict(loldu_layers(self.model))
        for layer in self.layers.values():
            with torch.no_grad():  # a trained start, so that the adapter's effect is visible
                layer.d.add_(torch.randn_like(layer.d) * 0.3)
        self.tmp = Path(tempfile.mkdtemp())
        # The float64 model's own record of the state: the rules, written out once more.
        self.enabled = {n: True for n in self.layers}
        self.merged = False
        self.active = "default"
        self.values = {"default": self.read_active()}  # adapter name -> {layer: (d, s)}
        self.values["a"] = {}
        for n, layer in self.layers.items():  # one named adapter from the start, so that every verb has work
            layer.set_named_adapter("a", layer.d.detach() - 0.2, layer.s.detach() * 1.5)
            self.values["a"][n] = tuple(v.clone() for v in layer.adapter_values("a"))
        self.saved = []  # what each saved folder holds: {layer: (d, s)}
        self.switches = []  # [switch object, pending 'before' or None]
        self.stack = []  # (switch index, {layer: enabled before}) per open block
        self.x = torch.Generator().manual_seed(1)

    def teardown(self):
        while self.stack:
            self.exit_block()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def read_active(self):
        return {n: (layer.d.detach().clone(), layer.s.detach().clone()) for n, layer in self.layers.items()}

    def refused(self, call, where):
        before, state = snapshot(self.model), loldu_state(self.model)
        with pytest.raises(ValueError, match=where):
            call()
        assert_unchanged(self.model, before)
        assert loldu_state(self.model) == state

    def blocks_open(self):
        return bool(self.stack)

    # ---- switches --------------------------------------------------------------------------------------------

    @rule(on=st.booleans())
    def switch_call(self, on):
        sw = (enable_loldu if on else disable_loldu)(self.model)
        self.switches.append([sw, dict(self.enabled), on])
        self.enabled = {n: on for n in self.layers}

    @precondition(lambda self: self.switches)
    @rule(data=st.data())
    def enter_block(self, data):
        i = data.draw(st.integers(0, len(self.switches) - 1))
        sw, pending, on = self.switches[i]
        before = pending if pending is not None else dict(self.enabled)
        self.switches[i][1] = None
        self.enabled = {n: on for n in self.layers}
        assert sw.__enter__() is self.model
        self.stack.append((i, before))

    @precondition(blocks_open)
    @rule()
    def exit_block(self):
        i, before = self.stack.pop()
        self.switches[i][0].__exit__(None, None, None)
        self.enabled = dict(before)

    # ---- merging ---------------------------------------------------------------------------------------------

    @rule()
    def merge_reversible(self):
        merge_loldu(self.model, reversible=True)
        self.merged = True

    @rule()
    def unmerge(self):
        unmerge_loldu(self.model)
        self.merged = False

    @rule()
    def merge_for_good(self):
        if self.stack:
            return self.refused(lambda: merge_loldu(self.model), "merge_loldu: .* inside a `with")
        if not all(self.enabled.values()):
            return self.refused(lambda: merge_loldu(self.model), "merge_loldu: .* are disabled")
        if len(self.values) > 1:
            return self.refused(lambda: merge_loldu(self.model), "merge_loldu: layers hold named adapters")
        twin = copy.deepcopy(self.model)
        merge_loldu(twin)
        assert not loldu_layers(twin) and type(twin[0]) is nn.Linear
        self.check_outputs(lambda row, n: self.values[self.active][n], twin)

    # ---- adapters --------------------------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES))
    def set_trainable(self, name):
        if self.merged:
            return self.refused(lambda: set_adapter(self.model, name), "set_adapter: .* are merged")
        if name not in self.values:
            return self.refused(lambda: set_adapter(self.model, name), "set_adapter: no adapter")
        set_adapter(self.model, name)
        self.active = name

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name):
        if name == self.active:
            return self.refused(lambda: delete_adapter(self.model, name), "delete_adapter: .* is the trainable")
        if name not in self.values:
            return self.refused(lambda: delete_adapter(self.model, name), "delete_adapter: no adapter")
        delete_adapter(self.model, name)
        del self.values[name]

    @rule(name=st.sampled_from(NAMES))
    def save(self, name):
        folder = self.tmp / str(len(self.saved))
        if name not in self.values:
            return self.refused(lambda: save_loldu(self.model, folder, adapter_name=name), "save_loldu: no layer")
        save_loldu(self.model, folder, adapter_name=name)
        self.saved.append({n: tuple(v.clone() for v in ds) for n, ds in self.values[name].items()})

    @precondition(lambda self: self.saved)
    @rule(data=st.data(), name=st.sampled_from([None] + NAMES))
    def load(self, data, name):
        i = data.draw(st.integers(0, len(self.saved) - 1))
        folder = self.tmp / str(i)
        if self.merged:
            return self.refused(lambda: load_loldu(self.model, folder, adapter_name=name), "load_loldu: .* merged")
        load_loldu(self.model, folder, adapter_name=name)
        self.values[self.active if name is None else name] = {n: tuple(v.clone() for v in ds)
                                                              for n, ds in self.saved[i].items()}

    @rule()
    def train_step(self):
        if self.merged or not all(self.enabled.values()):
            return  # no adapter value takes part in the forward: no step to take
        self.model.zero_grad()
        self.model(self.input()).pow(2).sum().backward()
        with torch.no_grad():
            for layer in self.layers.values():
                layer.d.sub_(0.05 * layer.d.grad)
                layer.s.sub_(0.05 * layer.s.grad)
        self.values[self.active] = self.read_active()

    @rule(names=st.lists(st.sampled_from([None] + NAMES), min_size=BATCH, max_size=BATCH))
    def batch(self, names):
        if self.merged:
            return self.refused(lambda: adapter_batch(self.model, names).__enter__(), "adapter_batch: .* merged")
        if not all(self.enabled.values()):
            return self.refused(lambda: adapter_batch(self.model, names).__enter__(), "adapter_batch: .* disabled")
        unknown = [n for n in names if n is not None and n not in self.values]
        if unknown:
            return self.refused(lambda: adapter_batch(self.model, names).__enter__(), "adapter_batch: unknown")
        with adapter_batch(self.model, names):
            self.check_outputs(lambda row, n: None if names[row] is None else self.values[names[row]][n])

    # ---- what every state must give --------------------------------------------------------------------------

    def input(self):
        return torch.randn(BATCH, 6, generator=self.x)

    def check_outputs(self, values_of, model=None):
        """Each layer's output against the float64 model, on the input that layer actually received."""
        model = self.model if model is None else model
        seen = {}
        hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
                 for n in self.layers]
        try:
            for grad in (False, True):
                with torch.set_grad_enabled(grad):
                    model(self.input())
                for n, layer in self.layers.items():
                    x, y = seen[n]
                    for row in range(BATCH):
                        ref, scale, k = reference(x[row:row + 1], layer, values_of(row, n))
                        bad = mismatches(y[row:row + 1], ref, scale, k, torch.float32, f"{n} row {row}")
                        assert not bad, "\n".join(bad)
        finally:
            for h in hooks:
                h.remove()

    @invariant()
    def state_is_what_the_rules_say(self):
        named = tuple(n for n in self.values if n != self.active)
        state = loldu_state(self.model)
        assert {n: (s[0], s[1], s[2]) for n, s in state.items()} == {
            n: (self.enabled[n], self.merged, self.active) for n in self.layers}
        assert all(sorted(s[3]) == sorted(named) for s in state.values())
        for name, per_layer in self.values.items():
            for n, (d, s) in per_layer.items():
                got = self.layers[n].adapter_values(name)
                assert torch.equal(got[0], d) and torch.equal(got[1], s), (name, n)

    @invariant()
    def outputs_are_what_the_state_says(self):
        self.check_outputs(lambda row, n: self.values[self.active][n] if self.enabled[n] else None)


LoLDUStates.TestCase.settings = settings(max_examples=40, stateful_step_count=25, derandomize=True, deadline=None)
TestLoLDUStates = LoLDUStates.TestCase


# ---- the examples of issue 19, one by one ------------------------------------------------------------------


@pytest.fixture
def trained():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    base = copy.deepcopy(model)
    add_loldu(model, rank=3)
    for _, layer in loldu_layers(model):
        with torch.no_grad():
            layer.d.add_(torch.randn_like(layer.d))
    return model, base, torch.randn(7, 6)


def test_reversible_merge_inside_a_disable_block_is_exact_after_the_block_and_after_unmerge(trained):
    model, base, x = trained
    y = model(x)
    with disable_loldu(model):
        merge_loldu(model, reversible=True)
        assert torch.equal(model(x), base(x))  # disabled and merged: the base itself
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)  # the delta once, not twice
    unmerge_loldu(model)
    assert torch.equal(model(x), y)
    assert all(s[:2] == (True, False) for s in loldu_state(model).values())


def test_disabled_model_merged_inside_an_enable_block_stays_disabled_after_unmerge(trained):
    model, base, x = trained
    disable_loldu(model)
    with enable_loldu(model):
        merge_loldu(model, reversible=True)
    assert torch.equal(model(x), base(x))
    unmerge_loldu(model)
    assert torch.equal(model(x), base(x))
    assert all(s[:2] == (False, False) for s in loldu_state(model).values())


def test_the_switch_object_disables_again_in_every_block(trained):
    model, base, x = trained
    y = model(x)
    switch = disable_loldu(model)
    with switch:
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), y)
    for _ in range(2):
        with switch:
            assert torch.equal(model(x), base(x))
            with switch:  # nested in itself
                assert torch.equal(model(x), base(x))
            assert torch.equal(model(x), base(x))
        assert torch.equal(model(x), y)
