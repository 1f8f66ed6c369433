import csv
import importlib.util
from types import SimpleNamespace

import torch

from loldu_triton.bench import build_methods, run_bench, saved_bytes


def test_every_peer_computes_the_same_layer():
    modules = build_methods(K=24, N=40, rank=6, dtype=torch.float64, device=torch.device("cpu"),
                            wanted=["linear", "loldu", "loldu_unfused", "seed_param"])
    x = torch.randn(7, 24, dtype=torch.float64)
    y = modules["loldu"](x)
    assert not torch.allclose(y, modules["linear"](x))  # the benchmarked adapter is not at its init
    for name in ("loldu_unfused", "seed_param"):
        torch.testing.assert_close(modules[name](x), y, rtol=1e-9, atol=1e-9)


def test_loldu_keeps_only_t_for_backward():
    M, K, N, r = 64, 48, 40, 4
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
    # linear, loldu, loldu_int8, loldu_fp8, loldu_unfused, seed_param; peft_lora and peft_vera when PEFT is there
    methods = 6 + (2 if importlib.util.find_spec("peft") else 0)
    assert len(rows) == len(results) == 2 * methods
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
