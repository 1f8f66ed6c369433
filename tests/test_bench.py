import csv
import importlib.util

import pytest
import torch

from loldu_triton.tools import timing
from loldu_triton.tools.bench import ideal_ms, run_bench
from loldu_triton.tools.peers import build_methods, saved_bytes
from loldu_triton.tools.timing import Clock, calibrate, sample, time_calls, unranked
from loldu_triton.tools.cli import parse_args


@pytest.fixture(autouse=True)
def short_samples(monkeypatch):
    """Samples of 1 ms: the tests check what the bench measures and writes, not how fast anything is."""
    monkeypatch.setitem(timing.SAMPLE_MS, "cpu", 1.0)


def bench_args(tmp_path, *argv):
    return parse_args(["bench", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path), *argv])


class FakeClock(Clock):
    """A clock that moves only when a phase says so: what each phase's span holds, exactly."""

    def __init__(self, device="cpu"):
        super().__init__(torch.device(device))
        self.now = 0.0

    def mark(self):
        return self.now

    def ms(self, start, end):
        return end - start

    def sync(self):
        pass

    def advance(self, ms, value=None):
        self.now += ms
        return value


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
    # t and e, and the one value s0 by which e's FMA-safe formula (core.formulas.delta_diagonal) multiplies d - d0
    assert saved_bytes(modules["loldu"], x) == M * r * 4 + r * 4 + 4
    assert saved_bytes(modules["seed_param"], x) >= M * K * 4  # rebuilding W makes autograd keep x


def test_each_phase_is_timed_on_its_own_and_resets_are_not_timed():
    clock = FakeClock()
    forward = lambda: clock.advance(3.0, "y")  # noqa: E731
    backward = lambda y: clock.advance(5.0 if y == "y" else 1e9)  # gets what forward returned  # noqa: E731
    reset = lambda: clock.advance(100.0)  # noqa: E731
    assert time_calls((forward, backward), 4, clock, reset) == [3.0, 5.0]
    assert time_calls((forward,), 4, clock) == [3.0]
    # a sample goes on until every phase lasted the target: forward needs 7 calls of 3 ms to reach 20 ms
    assert sample((forward, backward), 1, clock, reset, target_ms=20.0) == ([3.0, 5.0], 7)
    assert sample((forward, backward), 4, clock, reset, target_ms=20.0) == ([3.0, 5.0], 8)  # whole chunks
    assert calibrate((forward, backward), clock, reset) == 1  # the CPU reads its clock after every call


def test_a_cuda_chunk_is_calibrated_to_last_the_target():
    # CUDA events are read after a synchronize, so a chunk is as many calls as make each phase last the target
    clock = FakeClock("cuda")  # no GPU needed: the fake clock only names the device
    forward = lambda: clock.advance(3.0, "y")  # noqa: E731
    backward = lambda y: clock.advance(5.0)  # noqa: E731
    calls = calibrate((forward, backward), clock, target_ms=50.0)
    assert 3.0 * calls >= 50.0 and 3.0 * calls / 2 < 50.0  # the forward, the shorter phase, lasts 50 ms
    assert sample((forward, backward), calls, clock, target_ms=50.0) == ([3.0, 5.0], calls)


def test_a_time_that_is_not_positive_is_refused_not_reported():
    clock = FakeClock()
    with pytest.raises(RuntimeError, match="not positive"):
        time_calls((lambda: clock.advance(-1.0),), 3, clock)
    with pytest.raises(RuntimeError, match="not positive"):
        time_calls((lambda: None, lambda _: clock.advance(0.0)), 3, clock)


def test_a_method_is_unranked_where_its_range_holds_another_median():
    ratios = {"linear": [1.0, 1.0, 1.0], "a": [1.1, 1.2, 1.3], "b": [1.15, 1.5, 1.6], "c": [0.9, 2.1, 2.2]}
    # a's range (1.1-1.3) holds no other median; b's (1.15-1.6) holds a's 1.2; c's (0.9-2.2) holds all
    assert unranked(ratios) == {"linear": False, "a": False, "b": True, "c": True}


def test_bench_writes_csv_markdown_and_plot_with_ratios_to_the_floor(tmp_path, capsys):
    results = run_bench(bench_args(tmp_path, "--shapes", "16x32x24", "--ranks", "4,full", "--repeats", "2"))
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
            assert float(r["fwd_bwd_ratio"]) == float(r["fwd_bwd_ratio_min"]) == float(r["fwd_bwd_ratio_max"]) == 1
        for kind in ("forward", "backward", "fwd_bwd"):  # measured, never a difference: positive
            assert float(r[f"{kind}_ms"]) > 0
            assert 0 < float(r[f"{kind}_ratio_min"]) <= float(r[f"{kind}_ratio"]) <= float(r[f"{kind}_ratio_max"])
        assert int(r["rounds"]) == 2 and int(r["calls"]) >= 1
        assert set(filter(None, r["noisy"].split(","))) <= {"fwd", "bwd", "fwd+bwd"}
    assert {r["rank"] for r in rows} == {"4", "24"}
    md = (tmp_path / "bench.md").read_text().splitlines()
    assert "| noisy | rounds x calls |" in md[0]
    loldu = next(line for line in md if "| loldu |" in line).split("|")
    column = md[0].split("|").index(" fwd+bwd x (range) ")
    median, low, high = map(float, loldu[column].replace("(", " ").replace(")", " ").replace("-", " ").split())
    assert 0 < low <= median <= high
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_adapter_batch_bench_reports_every_count_with_its_range(tmp_path):
    run_bench(bench_args(tmp_path, "--ranks", "4", "--repeats", "2", "--adapter-counts", "1,3,12"))
    lines = (tmp_path / "adapter_batch.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["1", "3", "12"]
    for line in lines[2:]:
        cells = line.split("|")
        assert float(cells[5]) > 0
        median, low, high = map(float, cells[6].replace("(", " ").replace(")", " ").replace("-", " ").split())
        assert 0 < low <= median <= high and cells[7].strip() in ("yes", "-")


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
    run_bench(bench_args(tmp_path, "--shapes", "16x32x24", "--ranks", "4", "--methods", "loldu", "--repeats", "1",
                         "--gpu", "H100"))
    floor, ideal = ideal_ms(16, 32, 24, 4, "float32", "H100")
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert [r["method"] for r in rows] == ["linear", "loldu"]  # the floor is always timed
    assert all(float(r["ideal_floor_ms"]) == pytest.approx(floor) for r in rows)
    assert all(float(r["ideal_loldu_ms"]) == pytest.approx(ideal) for r in rows)
    md = (tmp_path / "bench.md").read_text().splitlines()
    assert md[0].endswith("| ideal floor ms | ideal LoLDU ms | ideal x |") and len(md) == 4
    assert md[3].split("|")[-2].strip() == f"{ideal / floor:.3f}"
    assert md[3].split("|")[md[0].split("|").index(" noisy ")].strip() == "1 round"  # one round ranks nothing
    assert "roofline columns: H100" in capsys.readouterr().out


def test_bench_plot_has_a_title_and_plain_ratio_ticks(tmp_path, monkeypatch):
    import matplotlib.container
    import matplotlib.figure

    from loldu_triton.tools.bench import Result, plot

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    rows = [Result("cpu", "float32", 16, 32, 24, r, m, 1.0, 1.0, 2.0, fwd_bwd_ratio=x, fwd_bwd_ratio_min=x / 1.1,
                   fwd_bwd_ratio_max=x * 1.2) for r in (4, 24) for m, x in (("linear", 1.0), ("loldu", 1.7))]
    plot(rows, tmp_path / "bench.png")
    ax = figures[0].axes[0]
    bars = [c for c in ax.containers if isinstance(c, matplotlib.container.BarContainer)]
    assert [b.errorbar is not None for b in bars] == [True, True]  # each bar shows its range
    assert "frozen nn.Linear" in ax.get_title() and "cpu, float32" in ax.get_title()
    figures[0].canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert "1x" in labels and "2x" in labels, labels
    assert [t.get_text() for t in ax.get_xticklabels()] == ["M=16\n32x24\nr=4", "M=16\n32x24\nr=24"]
