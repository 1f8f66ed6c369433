"""LoLDULinear without autograd: the shortcut through the cached diag(e) U. Its outputs against float64, and
the cache against every way d and s (or the factors) change, so that it never serves a stale e."""
import copy
import io
import pickle
import threading

import pytest
import torch
import torch.nn as nn

from kernel_checks import assert_linear_close
from loldu_triton import LoLDULinear, get_loldu_params, load_loldu, save_loldu


def trained_layer(dtype=torch.float32, K=24, N=16, r=6, bias=True, **kwargs):
    torch.manual_seed(0)
    layer = LoLDULinear.from_linear(nn.Linear(K, N, bias=bias).to(dtype), rank=r, **kwargs)
    with torch.no_grad():  # a trained state: e != 0
        layer.d.add_(0.1 * torch.randn(r))
        layer.s.mul_(1.3)
    return layer


def assert_dense(y, layer, x):
    """y against the layer in float64 from its current d and s (e = s d - s0 d0 as the layer forms it, float32),
    element by element in y's dtype."""
    assert_linear_close(y, x, layer.dense_weight(), layer.bias, layer.L, layer.U, layer.delta_diagonal().detach())


def infer(layer, x):
    with torch.no_grad():
        return layer(x)


def cached(layer):
    return layer.__dict__.get("_scaled_u_entry") is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])  # e is float32
@pytest.mark.parametrize("shape", [(1, 24), (3, 5, 24), (24,), (0, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_no_grad_output_matches_float64_and_the_training_forward(dtype, shape, bias):
    layer = trained_layer(dtype, bias=bias)
    x = torch.randn(shape).to(dtype)
    y = infer(layer, x)
    assert cached(layer) and y.shape == (*shape[:-1], 16) and y.dtype == dtype and y.grad_fn is None
    if x.numel():
        assert_dense(y, layer, x)
        assert_dense(layer(x), layer, x)  # the training forward (another route, same values)


def test_at_init_the_shortcut_gives_the_base_output_exactly():
    base = nn.Linear(24, 16)
    layer = LoLDULinear.from_linear(base, rank=6, alpha=3.0)  # s0 != 1
    x = torch.randn(4, 24)
    assert torch.equal(infer(layer, x), base(x)) and cached(layer)


def sgd(layer):
    opt = torch.optim.SGD(get_loldu_params(layer), lr=0.1)
    layer(torch.randn(3, 24)).pow(2).sum().backward()
    opt.step()


def adam(**kwargs):
    def step(layer):
        opt = torch.optim.Adam(get_loldu_params(layer), lr=0.05, **kwargs)
        for _ in range(2):
            opt.zero_grad()
            layer(torch.randn(3, 24)).pow(2).sum().backward()
            opt.step()
    return step


def copy_in(layer):
    with torch.no_grad():
        layer.d.copy_(torch.randn(6))


def load_state(layer):
    layer.load_state_dict({"d": torch.randn(6), "s": torch.tensor([0.7])}, strict=False)


def replace_data(layer):
    for _ in range(3):  # whatever addresses the allocator hands out meanwhile
        layer.d.data = torch.randn(6)
        layer.s.data = torch.rand(1)


def replace_parameter(layer):
    layer.d = nn.Parameter(torch.randn(6))


def new_base_weight(layer):
    layer.load_state_dict({"weight": torch.randn(16, 24), "bias": torch.randn(16)}, strict=False)
    with torch.no_grad():
        layer.d.add_(0.1)


def to_double(layer):
    layer.double()
    with torch.no_grad():
        layer.d.mul_(1.1)


CHANGES = {"sgd": sgd, "adam": adam(), "adam_foreach": adam(foreach=True), "adam_fused": adam(fused=True),
           "copy_": copy_in, "load_state_dict": load_state, "reset_loldu": lambda layer: layer.reset_loldu(),
           ".data =": replace_data, "new Parameter": replace_parameter, "new base weight": new_base_weight,
           ".double()": to_double}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_the_cache_follows_every_change_of_d_s_and_the_factors(change):
    layer = trained_layer()
    x = torch.randn(2, 24)
    before = infer(layer, x)
    assert cached(layer)
    change(layer)
    x = x.to(layer.weight.dtype)
    after = infer(layer, x)
    assert not torch.allclose(after, before.to(after.dtype))
    assert_dense(after, layer, x)


def test_load_loldu_reaches_a_cached_layer(tmp_path):
    layer = trained_layer()
    model = nn.Sequential(layer)
    x = torch.randn(2, 24)
    save_loldu(model, tmp_path / "a")
    infer(layer, x)
    with torch.no_grad():
        layer.d.add_(1.0)
    infer(layer, x)  # cached at the new values
    load_loldu(model, tmp_path / "a")
    assert_dense(infer(layer, x), layer, x)


def test_functional_call_with_other_values_is_not_served_from_the_cache():
    layer = trained_layer()
    x = torch.randn(2, 24)
    infer(layer, x)
    other = {"d": torch.randn(6), "s": torch.tensor([0.5])}
    with torch.no_grad():
        y = torch.func.functional_call(layer, other, (x,))
    ref = trained_layer()
    with torch.no_grad():
        ref.d.copy_(other["d"])
        ref.s.copy_(other["s"])
    assert_dense(y, ref, x)
    assert_dense(infer(layer, x), layer, x)  # and the layer's own values again


@pytest.mark.parametrize("make_copy", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)),
                                       lambda m: torch.load(_saved(m), weights_only=False)],
                         ids=["deepcopy", "pickle", "torch.save"])
def test_a_copy_never_uses_the_originals_cache(make_copy):
    """A copy's d starts a new version counter: stepping it as often as the original's was when cached must not
    make the stored key match."""
    layer = trained_layer()
    x = torch.randn(2, 24)
    infer(layer, x)
    clone = make_copy(layer)
    assert not cached(clone)
    version = layer.d._version
    while clone.d._version < version:
        with torch.no_grad():
            clone.d.add_(0.05)
    assert_dense(infer(clone, x), clone, x)


def _saved(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


def test_a_training_call_drops_the_cache():
    layer = trained_layer()
    infer(layer, torch.randn(2, 24))
    assert cached(layer)
    layer(torch.randn(2, 24)).sum().backward()
    assert not cached(layer)


def test_threads_share_the_layer_and_each_gets_the_current_values():
    layer = trained_layer()
    x = torch.randn(3, 24)
    errors = []
    barrier = threading.Barrier(4, timeout=30)

    def worker():
        try:
            for _ in range(3):
                barrier.wait()  # the main thread changed d meanwhile
                for _ in range(20):
                    y = infer(layer, x)
                    assert_dense(y, layer, x)
                barrier.wait()
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(3):
        with torch.no_grad():
            layer.d.add_(0.3)
        barrier.wait()
        barrier.wait()
    for t in threads:
        t.join()
    assert not errors, errors


def test_inference_mode_uses_the_cache_and_plain_no_grad_can_reuse_it():
    layer = trained_layer()
    x = torch.randn(2, 24)
    with torch.inference_mode():
        y = layer(x)
    assert_dense(y, layer, x)
    assert_dense(infer(layer, x), layer, x)
    layer(x).sum().backward()  # and training still works afterwards
    assert layer.d.grad is not None


@pytest.mark.parametrize("setup", ["float16", "autocast", "int8", "many rows"])
def test_where_the_shortcut_does_not_apply_the_general_path_answers(setup):
    layer = trained_layer(torch.float16 if setup == "float16" else torch.float32)
    x = torch.randn(3000 if setup == "many rows" else 2, 24).to(layer.weight.dtype)
    if setup == "int8":
        layer.quantize_base("int8")
    if setup == "autocast":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        assert_dense(y, layer, x)
    else:
        y = infer(layer, x)
        assert_dense(y, layer, x)
        if setup == "int8":
            assert_dense(layer(x), layer, x)  # the training forward
    assert not cached(layer) or setup in ("autocast", "many rows")


@pytest.mark.parametrize("x, match", [
    (torch.tensor(1.0), r"my.layer: input is a 0-d tensor"),
    (torch.randn(3, 7), r"my.layer: input of shape \(3, 7\) has last dim 7, expected 24"),
    (torch.randn(3, 24, device="meta"), r"my.layer: input is on meta, the layer's weight on cpu"),
    (torch.randn(3, 24, dtype=torch.float64), r"my.layer: input dtype torch.float64 differs"),
])
def test_bad_inputs_without_grad_still_name_the_layer(x, match):
    layer = trained_layer(name="my.layer")
    infer(layer, torch.randn(2, 24))
    with pytest.raises(ValueError, match=match):
        infer(layer, x)


def test_torch_compile_without_grad_traces_the_general_path():
    """One graph (fullgraph), the traced math against float64, and no recompile when d changes in place: the
    graph reads d, not a cached e. aot_eager runs that graph without inductor's C++ (whose own code runs in
    tests/test_integrations.py, in a process of its own)."""
    from torch._dynamo.backends.registry import lookup_backend

    torch._dynamo.reset()
    layer = trained_layer()
    x = torch.randn(3, 24)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(layer, backend=counting, fullgraph=True)
    with torch.no_grad():
        y = compiled(x)
        assert_dense(y, layer, x)
        layer.d.add_(0.3)
        assert_dense(compiled(x), layer, x)
    assert len(graphs) == 1
