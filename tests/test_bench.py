import csv
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from loldu_triton.bench import build_methods, ideal_ms, run_bench, saved_bytes


def test_every_peer_computes_the_same_layer():
    modules = build_methods(K=24, N=40, rank=6, dtype=torch.float64, device=torch.device("cpu"),
                            wanted=["linear", "loldu", "loldu_unfused", "seed_param"])
    x = torch.randn(7, 24, dtype=torch.float64)
    y = modules["loldu"](x)
    assert not torch.allclose(y, modules["linear"](x))  # the benchmarked adapter is not at its init
    for name in ("loldu_unfused", "seed_param"):
        torch.testing.assert_close(modules[name](x), y, rtol=1e-9, atol=1e-9)


def test_loldu_keeps_only_t_for_backward():
    M, K, N, r = 32, 48, 40, 4  # the side path (where W_eff or x is kept instead: test_routes.py)
    modules = build_methods(K, N, r, torch.float32, torch.device("cpu"), ["linear", "loldu", "seed_param"])
    x = torch.randn(M, K, requires_grad=True)
    assert saved_bytes(modules["linear"], x) == 0
    assert saved_bytes(modules["loldu"], x) == M * r * 4 + r * 4  # t and e
    assert saved_bytes(modules["seed_param"], x) >= M * K * 4  # rebuilding W makes autograd keep x


def test_bench_writes_csv_markdown_and_plot_with_ratios_to_the_floor(tmp_path, capsys):
    args = SimpleNamespace(device="cpu", dtype="float32", shapes="16x32x24", ranks="4,full", methods=None,
                           repeats=2, out=str(tmp_path))
    results = run_bench(args)
    printed = capsys.readouterr()
    # piped (not a terminal): the header once, each row once, no progress-bar carriage returns
    assert printed.out.count("| method |") == 1 and printed.out.count("| loldu |") == 2
    assert "\r" not in printed.out + printed.err
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    # linear, loldu, loldu_int8, loldu_fp8, loldu_unfused, seed_param, and PEFT LoRA and VeRA where installed
    peft = importlib.util.find_spec("peft") is not None
    assert len(rows) == len(results) == 2 * (6 + 2 * peft)
    stored = {(r["rank"], r["method"]): float(r["weights_mb"]) for r in rows}
    for rank in ("4", "24"):  # a 1-byte base saves 3 of every 4 bytes of the float32 weight
        saved = stored[(rank, "loldu")] - stored[(rank, "loldu_int8")]
        assert saved == stored[(rank, "loldu")] - stored[(rank, "loldu_fp8")] > 0
        assert abs(saved - (24 * 32 * 3 - 24 * 4) / 2**20) < 1e-9  # minus the float32 scales
    for r in rows:
        if r["method"] == "linear":
            assert float(r["fwd_bwd_ratio"]) == 1.0
        assert float(r["fwd_bwd_ms"]) > 0
    assert {r["rank"] for r in rows} == {"4", "24"}
    assert "| loldu |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_adapter_batch_bench_reports_every_count(tmp_path):
    args = SimpleNamespace(device="cpu", dtype="float32", shapes=None, ranks="4", methods=None, repeats=2,
                           out=str(tmp_path), adapter_counts="1,3,12")
    run_bench(args)
    lines = (tmp_path / "adapter_batch.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["1", "3", "12"]
    assert all(float(line.split("|")[6]) > 0 for line in lines[2:])


def test_roofline_matches_the_design_numbers_for_h200():
    # DESIGN.md section 5: bf16, M=8192, K=N=4096: one GEMM 278 us, the frozen layer's forward plus input
    # gradient 556 us, compute-bound; the rank-r extras 8*M*K*r FLOPs: 1.008x at r=16, 1.031x at r=64
    floor, ideal16 = ideal_ms(8192, 4096, 4096, 16, "bfloat16", "H200")
    assert floor == pytest.approx(2 * 2 * 8192 * 4096**2 / 989e12 * 1e3)
    assert abs(floor - 0.556) < 0.001
    assert ideal16 / floor == pytest.approx(1 + 8 * 8192 * 4096 * 16 / (4 * 8192 * 4096**2), rel=1e-3)
    assert ideal_ms(8192, 4096, 4096, 64, "bfloat16", "H200")[1] / floor == pytest.approx(1.031, abs=1e-3)
    # decode is memory-bound: W read once per pass (33.6 MB at 4.8 TB/s, 7 us), plus L and U for LoLDU
    floor1, ideal1 = ideal_ms(1, 4096, 4096, 4096, "bfloat16", "H200")
    assert floor1 == pytest.approx(2 * (4096**2 + 2 * 4096) * 2 / 4.8e12 * 1e3)
    assert ideal1 / floor1 == pytest.approx(3.0, rel=1e-3)  # full rank: L and U are as large as W
    assert ideal_ms(8192, 4096, 4096, 16, "bfloat16", "A100")[0] > floor  # 312 TFLOP/s


def test_bench_prints_roofline_columns_for_a_named_gpu_and_writes_rows_as_measured(tmp_path, capsys):
    args = SimpleNamespace(device="cpu", dtype="float32", shapes="16x32x24", ranks="4", methods="linear,loldu",
                           repeats=1, out=str(tmp_path), gpu="H100")
    run_bench(args)
    floor, ideal = ideal_ms(16, 32, 24, 4, "float32", "H100")
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert [r["method"] for r in rows] == ["linear", "loldu"]
    assert all(float(r["ideal_floor_ms"]) == pytest.approx(floor) for r in rows)
    assert all(float(r["ideal_loldu_ms"]) == pytest.approx(ideal) for r in rows)
    md = (tmp_path / "bench.md").read_text().splitlines()
    assert md[0].endswith("| ideal floor ms | ideal LoLDU ms | ideal x |") and len(md) == 4
    assert md[3].split("|")[-2].strip() == f"{ideal / floor:.3f}"
    assert "roofline columns: H100" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--gpu must be one of"):
        run_bench(SimpleNamespace(**{**vars(args), "gpu": "V100"}))


def test_bench_plot_has_a_title_and_plain_ratio_ticks(tmp_path, monkeypatch):
    import matplotlib.figure

    from loldu_triton.bench import Result, plot

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    rows = [Result("cpu", "float32", 16, 32, 24, r, m, 1.0, 1.0, 2.0, fwd_bwd_ratio=x)
            for r in (4, 24) for m, x in (("linear", 1.0), ("loldu", 1.7))]
    plot(rows, tmp_path / "bench.png")
    ax = figures[0].axes[0]
    assert "frozen nn.Linear" in ax.get_title() and "cpu, float32" in ax.get_title()
    figures[0].canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert "1x" in labels and "2x" in labels, labels
    assert [t.get_text() for t in ax.get_xticklabels()] == ["M=16\n32x24\nr=4", "M=16\n32x24\nr=24"]
