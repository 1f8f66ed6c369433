"""The model benchmark (loldu-triton bench --model) and the per-call one (--inference), at tiny sizes: what they
build, count and write. Their timings are the benchmark's business, not the tests'."""
import csv
import importlib.util
import math

import pytest
import torch

pytest.importorskip("transformers")

from loldu_triton.tools import timing  # noqa: E402
from loldu_triton.tools.bench_inference import run_inference_bench  # noqa: E402
from loldu_triton.tools.cli import parse_args  # noqa: E402
from loldu_triton.tools.model_bench import adapt, build_base, peak_memory, run_model_bench  # noqa: E402

PEFT = importlib.util.find_spec("peft") is not None
# nn.Linear layers per model and their (in, out): every attention and MLP projection
LINEARS = {"minilm": 6 * [(384, 384)] * 4 + 6 * [(384, 1536), (1536, 384)],
           "llama": 4 * [(512, 512)] * 4 + 4 * [(512, 1376), (512, 1376), (1376, 512)]}


@pytest.fixture(autouse=True)
def short_samples(monkeypatch):
    """Samples of 1 ms: the tests check what the benchmarks measure and write, not how fast anything is."""
    monkeypatch.setitem(timing.SAMPLE_MS, "cpu", 1.0)


def args(tmp_path, *argv):
    return parse_args(["bench", "--device", "cpu", "--out", str(tmp_path), *argv])


@pytest.mark.parametrize("name", ["minilm", "llama"])
def test_model_bench_adapts_every_linear_and_counts_trainable_values(tmp_path, name):
    results = run_model_bench(args(tmp_path, "--model", name, "--batch", "2x8", "--ranks", "4", "--repeats", "2",
                                   "--no-memory"))
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "model_bench.csv"))}
    assert list(rows) == ["base", "loldu"] + (["peft_lora", "peft_vera"] if PEFT else [])
    assert len(results) == len(rows)
    r = 4
    assert int(rows["base"]["trainable"]) == 0 and float(rows["base"]["ratio"]) == 1.0
    assert int(rows["loldu"]["trainable"]) == len(LINEARS[name]) * (r + 1)
    if PEFT:  # LoRA adds r * (in + out) per layer: the same layers as LoLDU
        assert int(rows["peft_lora"]["trainable"]) == sum(r * (i + o) for i, o in LINEARS[name])
    for row in rows.values():
        assert float(row["step_ms"]) > 0 and math.isnan(float(row["peak_mb"]))
        assert 0 < float(row["ratio_min"]) <= float(row["ratio"]) <= float(row["ratio_max"])
        assert row["noisy"] in ("yes", "-") and int(row["rounds"]) == 2 and int(row["calls"]) >= 1
    assert "| loldu |" in (tmp_path / "model_bench.md").read_text()
    assert (tmp_path / "model_bench.png").read_bytes()[:4] == b"\x89PNG"


def test_each_method_computes_the_base_model_at_init():
    base = build_base("minilm")
    x = torch.randn(2, 5, 384)
    with torch.no_grad():
        base.eval()
        want = base(inputs_embeds=x).last_hidden_state
        for method in ("loldu",) + (("peft_lora",) if PEFT else ()):  # VeRA starts at its base too, to rounding
            model = adapt(base, method, 4).eval()
            torch.testing.assert_close(model(inputs_embeds=x).last_hidden_state, want, rtol=1e-5, atol=1e-5)


def test_peak_memory_runs_in_a_process_of_its_own_and_is_positive():
    mb = peak_memory("minilm", "loldu", 4, 2, 8, torch.device("cpu"), torch.float32)
    assert 0 < mb < 1000


def test_inference_bench_writes_one_row_per_shape_and_rank(tmp_path):
    lines = run_inference_bench(args(tmp_path, "--inference", "--shapes", "1x16x12,3x16x12", "--ranks", "4,full",
                                     "--repeats", "2"))
    assert [line.split("|")[1:4] for line in lines] == [[" 1 ", " 16 x 12 ", " 4 "], [" 1 ", " 16 x 12 ", " 12 "],
                                                        [" 3 ", " 16 x 12 ", " 4 "], [" 3 ", " 16 x 12 ", " 12 "]]
    for line in lines:
        cells = line.split("|")
        low, high = map(float, cells[8].split("-"))
        assert float(cells[5]) > 0 and float(cells[6]) > 0 and 0 < low <= float(cells[7]) <= high
        assert cells[9].strip() in ("yes", "-")
    assert (tmp_path / "inference.md").read_text().count("\n") == 6
