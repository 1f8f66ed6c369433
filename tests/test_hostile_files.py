"""Adapter files under attack: crashes during a save, concurrent readers, damaged, crafted and non-regular
files, other bases. After every refusal the model and the files on disk are as they were."""
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import loldu_triton.core.fileformat as fileformat
from loldu_triton import add_loldu, load_loldu, loldu_layers, save_loldu
from loldu_triton.core.fileformat import ADAPTER_NAME
from test_adapters import assert_unchanged, read_file, rewrite, snapshot, write_legacy
from test_api import TinyLM, train

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj", "lm_head"]


@pytest.fixture
def two_adapters(tmp_path):
    """Two adapters (a, b) of one base, and that base's state."""
    torch.manual_seed(0)
    base = TinyLM()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    out = {}
    for seed, name in ((1, "a"), (2, "b")):
        model = TinyLM()
        model.load_state_dict(state)
        add_loldu(model, rank=3, target_modules=TARGETS)
        torch.manual_seed(seed)
        train(model, torch.randn(4, 16))
        out[name] = model
    return out, state


def fresh(state):
    model = TinyLM()
    model.load_state_dict(state)
    return model


def values(model):
    return {name: (layer.d.detach().clone(), layer.s.detach().clone()) for name, layer in loldu_layers(model)}


def same_values(got, want):
    return got.keys() == want.keys() and all(torch.equal(got[k][0], want[k][0]) and torch.equal(got[k][1], want[k][1])
                                              for k in got)


def files(directory):
    """What a directory holds: the bytes of its regular files, the target of its links, other entries' modes."""
    def content(p):
        if p.is_symlink():
            return ("link", os.readlink(p))
        return p.read_bytes() if p.is_file() else ("special", p.lstat().st_mode)
    return {p.name: content(p) for p in sorted(directory.iterdir())}


# --------------------------------------------------------------------------------------------------------------
# A save interrupted at any point, and readers during saves
# --------------------------------------------------------------------------------------------------------------


def test_a_save_that_fails_before_the_rename_leaves_the_old_adapter(two_adapters, tmp_path, monkeypatch):
    models, state = two_adapters
    save_loldu(models["a"], tmp_path)
    before = files(tmp_path)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileformat.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        save_loldu(models["b"], tmp_path)
    monkeypatch.undo()
    assert files(tmp_path) == before  # no temporary file left behind either
    model = fresh(state)
    load_loldu(model, tmp_path)
    assert same_values(values(model), values(models["a"]))


@pytest.mark.parametrize("stage", ["fsync", "replace"])
def test_a_process_killed_during_a_save_leaves_the_old_adapter_loadable(two_adapters, tmp_path, stage):
    models, state = two_adapters
    save_loldu(models["a"], tmp_path)
    before = (tmp_path / ADAPTER_NAME).read_bytes()
    torch.save(models["b"].state_dict(), tmp_path.parent / "b.pt")
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_api import TinyLM
        import loldu_triton.core.fileformat as fileformat
        from loldu_triton import add_loldu, save_loldu
        model = TinyLM()
        add_loldu(model, rank=3, target_modules={TARGETS!r})
        model.load_state_dict(torch.load({str(tmp_path.parent / 'b.pt')!r}))
        def die(*args):
            os._exit(9)  # as a power cut or kill -9 would, with no cleanup
        setattr(fileformat.os, {stage!r}, die)
        save_loldu(model, {str(tmp_path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert (tmp_path / ADAPTER_NAME).read_bytes() == before
    model = fresh(state)
    load_loldu(model, tmp_path)  # an orphaned temporary file is not read
    assert same_values(values(model), values(models["a"]))


def test_readers_during_saves_get_the_old_or_the_new_adapter(two_adapters, tmp_path):
    models, state = two_adapters
    expected = {name: values(m) for name, m in models.items()}
    save_loldu(models["a"], tmp_path)
    stop, seen, errors = threading.Event(), [], []

    def writer():
        for i in range(40):
            save_loldu(models["ab"[i % 2]], tmp_path)
        stop.set()

    def reader():
        model = fresh(state)
        while not stop.is_set() or len(seen) < 10:
            try:
                load_loldu(model, tmp_path)
            except Exception as err:  # any error at all is a failure here
                errors.append(err)
                return
            got = values(model)
            seen.append(next((n for n, v in expected.items() if same_values(got, v)), "mix"))

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert seen and set(seen) <= {"a", "b"}, seen


# --------------------------------------------------------------------------------------------------------------
# Refusals at save time
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_saving_non_finite_values_is_refused_and_writes_nothing(two_adapters, tmp_path, bad):
    models, _ = two_adapters
    save_loldu(models["a"], tmp_path)
    before = files(tmp_path)
    with torch.no_grad():
        models["b"].layers[1].v_proj.d[0] = bad
    with pytest.raises(ValueError, match=r"save_loldu: layer 'layers.1.v_proj' has non-finite adapter values"):
        save_loldu(models["b"], tmp_path)
    assert files(tmp_path) == before
    with pytest.raises(ValueError, match="non-finite"):
        save_loldu(models["b"], tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(two_adapters, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_loldu(two_adapters[0]["a"], tmp_path)
    finally:
        os.umask(old)
    assert (tmp_path / ADAPTER_NAME).stat().st_mode & 0o777 == mode


def test_a_symlink_at_the_file_name_is_replaced_not_followed(two_adapters, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / ADAPTER_NAME).symlink_to(outside)
    save_loldu(two_adapters[0]["a"], tmp_path / "adapter")
    assert outside.read_text() == "keep me" and not (tmp_path / "adapter" / ADAPTER_NAME).is_symlink()


# --------------------------------------------------------------------------------------------------------------
# Hostile and malformed files
# --------------------------------------------------------------------------------------------------------------


def load_and_expect(directory, state, match, error=ValueError):
    model = fresh(state)
    add_loldu(model, rank=3, target_modules=["q_proj"])
    before, on_disk = snapshot(model), files(directory)
    with pytest.raises(error, match=match):
        load_loldu(model, directory)
    assert_unchanged(model, before)
    assert files(directory) == on_disk


def test_a_fifo_is_refused_without_blocking(two_adapters, tmp_path):
    os.mkfifo(tmp_path / ADAPTER_NAME)
    outcome = []

    def attempt():
        try:
            load_and_expect(tmp_path, two_adapters[1], f"{ADAPTER_NAME} is not a regular file")
            outcome.append("refused")
        except BaseException as err:  # reported below
            outcome.append(err)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "load_loldu blocked on a FIFO"
    assert outcome == ["refused"], outcome


def test_a_link_to_a_device_is_refused(two_adapters, tmp_path):
    (tmp_path / ADAPTER_NAME).symlink_to("/dev/zero")
    load_and_expect(tmp_path, two_adapters[1], f"{ADAPTER_NAME} is not a regular file")


def test_an_oversized_file_is_refused_before_it_is_read(two_adapters, tmp_path, monkeypatch):
    save_loldu(two_adapters[0]["a"], tmp_path)
    monkeypatch.setattr(fileformat, "MAX_FILE_BYTES", 1000)
    load_and_expect(tmp_path, two_adapters[1], r"bytes, more than an adapter file can be \(1000\)")


def test_a_flipped_bit_in_the_settings_fails_the_checksum(two_adapters, tmp_path):
    save_loldu(two_adapters[0]["a"], tmp_path)
    path = tmp_path / ADAPTER_NAME
    data = path.read_bytes()
    at = data.index(b'init_seed\\":0') + len(b'init_seed\\":')
    path.write_bytes(data[:at] + b"1" + data[at + 1:])
    load_and_expect(tmp_path, two_adapters[1], f"{ADAPTER_NAME} fails its checksum")


def crafted(config, tensors):
    """Edits an attacker might make to a valid file (the checksum is recomputed, so only the checks stop them)."""
    layers = config["layers"]
    return {
        "no layers field": (lambda: config.pop("layers"), r"'layers' must be an object .* got NoneType"),
        "layers as a list": (lambda: config.update(layers=list(layers)), r"'layers' must be an object .* got list"),
        "no layers": (lambda: (layers.clear(), [tensors.pop(k) for k in list(tensors)]),
                      r"the adapter has no layers"),
        "empty layer name": (lambda: layers.update({"": layers.pop("lm_head")}),
                             r"layer names must be non-empty strings, got ''"),
        "no base": (lambda: layers["lm_head"].pop("base"), r"layer 'lm_head' has no 'base'"),
        "rank as float": (lambda: layers["lm_head"].update(rank=3.0), r"layer 'lm_head': rank must be a positive int"),
        "alpha nan": (lambda: layers["lm_head"].update(alpha=float("nan")),
                      r"layer 'lm_head': alpha must be a positive finite number"),
        "init bogus": (lambda: layers["lm_head"].update(init="zeros"), r"layer 'lm_head': init must be one of"),
        "type bogus": (lambda: layers["lm_head"].update(type="Bilinear"), r"layer 'lm_head': type must be one of"),
        "shape bogus": (lambda: layers["lm_head"].update(weight_shape=[6, -16]),
                        r"layer 'lm_head': weight_shape must be a number written in ASCII digits, got -16"),
        "precision bogus": (lambda: layers["lm_head"]["base"].update(precision="float8"),
                            r"layer 'lm_head': base precision must be one of"),
        "pivots repeated": (lambda: tensors["lm_head.pivots"].fill_(1), r"lm_head.pivots must be 3 distinct rows"),
        "pivots out of range": (lambda: tensors["lm_head.pivots"].fill_(-7).__setitem__(0, 99),
                                r"lm_head.pivots must be 3 distinct rows in \[0, 6\)"),
        "sketch wrong dtype": (lambda: tensors.update({"lm_head.sketch": tensors["lm_head.sketch"].float()}),
                               r"lm_head.sketch is torch.float32 \(9,\), expected torch.float64"),
        "d too long": (lambda: tensors.update({"lm_head.d": torch.zeros(5)}),
                       r"lm_head.d is torch.float32 \(5,\), expected torch.float32 \(3,\)"),
        "s infinite": (lambda: tensors["lm_head.s"].fill_(float("inf")), r"lm_head.s contains NaN or Inf"),
        "extra tensor": (lambda: tensors.update({"lm_head.payload": torch.zeros(3)}),
                         r"does not match its config .*unexpected \['lm_head.payload'\]"),
        "missing tensor": (lambda: tensors.pop("layers.0.q_proj.s"),
                           r"does not match its config \(missing \['layers.0.q_proj.s'\]"),
    }


@pytest.mark.parametrize("case", list(crafted({"layers": {}}, {})))
def test_crafted_files_are_refused_naming_the_file_and_field(two_adapters, tmp_path, case):
    save_loldu(two_adapters[0]["a"], tmp_path)
    config, tensors = read_file(tmp_path)
    edit, match = crafted(config, tensors)[case]
    edit()
    rewrite(tmp_path, config, tensors)
    load_and_expect(tmp_path, two_adapters[1], f"{ADAPTER_NAME}.*{match}")


@pytest.mark.parametrize("version, match", [("4", "has format version 4, newer than this library"),
                                            ("two", "format_version must be a number written in ASCII digits, got 'two'")])
def test_format_versions_are_checked(two_adapters, tmp_path, version, match):
    from safetensors.torch import save

    save_loldu(two_adapters[0]["a"], tmp_path)
    config, tensors = read_file(tmp_path)
    (tmp_path / ADAPTER_NAME).write_bytes(save(tensors, metadata={
        "format": "loldu-triton-adapter", "format_version": version, "config": json.dumps(config), "checksum": "0"}))
    load_and_expect(tmp_path, two_adapters[1], match)


def test_first_format_files_are_checked_as_strictly(two_adapters, tmp_path):
    models, state = two_adapters
    write_legacy(models["a"], tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["layers"]["lm_head"].pop("base")
    config_path.write_text(json.dumps(config))
    load_and_expect(tmp_path, state, r"adapter_config.json: layer 'lm_head' has no 'base'")
    config["layers"] = ["lm_head"]
    config_path.write_text(json.dumps(config))
    load_and_expect(tmp_path, state, r"adapter_config.json: 'layers' must be an object")
    config_path.write_text(json.dumps({**config, "format_version": "1"}))
    load_and_expect(tmp_path, state, r"adapter_config.json: format_version must be an int, got '1'")
    # a pair mixed from two saves (what the first format's non-atomic save could leave)
    write_legacy(models["a"], tmp_path)
    mixed = TinyLM()
    mixed.load_state_dict(state)
    add_loldu(mixed, rank=2, target_modules=TARGETS)
    other = tmp_path.parent / "other"
    write_legacy(mixed, other)
    (tmp_path / "adapter_model.safetensors").write_bytes((other / "adapter_model.safetensors").read_bytes())
    load_and_expect(tmp_path, state, r"layers.0.q_proj.d is torch.float32 \(2,\), expected torch.float32 \(3,\)")


# --------------------------------------------------------------------------------------------------------------
# Another base
# --------------------------------------------------------------------------------------------------------------


def test_a_base_whose_other_columns_changed_is_refused(two_adapters, tmp_path):
    models, state = two_adapters
    save_loldu(models["a"], tmp_path)
    changed = {k: v.clone() for k, v in state.items()}
    torch.manual_seed(5)
    w = changed["lm_head.weight"]
    w[:, 3:] = torch.randn_like(w[:, 3:]) * w.std()  # the first r = 3 columns, hence the pivots, are the same
    model = fresh(changed)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'lm_head' has a different base weight .*fingerprint differs"):
        load_loldu(model, tmp_path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_cast_of_the_same_base_loads_with_a_warning(two_adapters, tmp_path, dtype):
    models, state = two_adapters
    save_loldu(models["a"], tmp_path)
    model = fresh(state).to(dtype)
    with pytest.warns(UserWarning, match=rf"not byte-identical .*float32 there, {str(dtype)[6:]} here"):
        load_loldu(model, tmp_path)
    assert same_values(values(model), values(models["a"]))
