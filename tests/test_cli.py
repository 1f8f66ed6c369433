import json
import subprocess
import sys

import pytest

from loldu_triton.tools.cli import build_parser, main

ROW_KEYS = {"method", "rank", "trainable_params", "accuracy", "train_seconds", "adapter_bytes"}


def test_help_explains_every_option_and_shows_its_default():
    for name, sub in build_parser()._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help and len(action.help) > 10, (name, action.dest)
            if action.nargs != 0:  # flags are off unless given
                assert "(default: " in action.help, (name, action.dest)
    bench_help = subprocess.run([sys.executable, "-m", "loldu_triton.tools.cli", "bench", "--help"], capture_output=True,
                                text=True).stdout
    assert "(default: ./loldu-bench)" in " ".join(bench_help.split())


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "loldu_triton.tools.cli", "demo", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "--out" in out.stdout and "--epochs" in out.stdout


def test_short_demo_writes_results_and_merging_keeps_accuracy(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "3", "--pretrain-epochs", "5", "--no-progress",
                 "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["rank"]) for r in rows] == [
        ("head only", None), ("full fine-tuning", None), ("LoRA", 8), ("LoLDU", 1), ("LoLDU", 16), ("LoLDU", "full")]
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["adapter_bytes"] > 0
        # epochs x the median epoch, within the fastest and the slowest epoch
        assert 0 < r["epoch_seconds_min"] <= r["train_seconds"] / 3 <= r["epoch_seconds_max"]
        if r["merged_accuracy"] is not None:
            assert r["merged_accuracy"] == pytest.approx(r["accuracy"], abs=2e-3)  # one sample at most
    params = {(r["method"], r["rank"]): r["trainable_params"] for r in rows}
    head = params[("head only", None)]
    assert params[("LoLDU", 1)] == head + 3 * (1 + 1)  # r + 1 per adapted layer
    assert params[("LoLDU", 16)] == head + 3 * (16 + 1)
    assert params[("LoLDU", "full")] == head + (64 + 1) + 2 * (256 + 1)
    assert (tmp_path / "results.md").read_text().count("| LoLDU |") == 3
    assert "| train s | epoch s (min-max) |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"


def test_version_flag_prints_the_package_version():
    from loldu_triton import __version__

    out = subprocess.run([sys.executable, "-m", "loldu_triton.tools.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"loldu-triton {__version__}"
