"""Model benchmark: one training step of a whole transformers model, built from a config (random weights, no
download), with every attention and MLP nn.Linear adapted: LoLDU against PEFT LoRA and VeRA at the same rank,
each as a ratio to the frozen base measured in the same interleaved rounds.

The frozen base's step is the floor of any adapter's: forward, then backward to the input embeddings (which
need a gradient there, so backward runs through every layer) with no weight gradient. An adapter's step is
forward, backward and an AdamW step of its trainable values. The loss is the mean square of the last hidden
state (base models, no head).

Peak memory (CPU, Linux): each method runs alone in a fresh process (after one step of the plain model there,
so that the libraries' code is resident); the high-water mark of its resident memory (VmHWM, reset through
/proc/self/clear_refs) over two steps, less its resident memory once the model was built and glibc's free
memory returned (malloc_trim). So it counts activations kept for backward, gradients, optimizer state and
temporaries, not the model's own weights. On CUDA: torch.cuda.max_memory_allocated over the same steps, less
the memory allocated before them.
"""
from __future__ import annotations

import copy
import csv
import multiprocessing
import statistics
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn as nn

from .timing import Clock, calibrate, machine, sample, spread, unranked

METHODS = ("base", "loldu", "peft_lora", "peft_vera")


def _config(name: str):
    import transformers

    if name == "minilm":  # MiniLM-L6-H384 (all-MiniLM-L6-v2): a BERT encoder, 22.6M parameters
        return transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                       num_attention_heads=12, intermediate_size=1536)
    if name == "llama":  # a small Llama: 4 layers of 512, SwiGLU MLP of 1376, 29M parameters (16M embedding)
        return transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)
    raise SystemExit(f"bench: --model must be one of {sorted(MODELS)}, got {name!r}")


# name: default batch x sequence length
MODELS = {"minilm": (16, 128), "llama": (8, 128)}
# name: the smallest min(in, out) of an adapted layer, the largest rank every layer can hold
MAX_RANK = {"minilm": 384, "llama": 512}


def build_base(name: str, seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = _config(name)
    model = (transformers.BertModel(config, add_pooling_layer=False) if name == "minilm"
             else transformers.LlamaModel(config))
    model.requires_grad_(False)
    return model.train()


def adapt(base: nn.Module, method: str, rank: int) -> nn.Module:
    """A copy of ``base`` with ``method`` on every nn.Linear (no pooler, no head: all of them are in the
    attention and MLP blocks); only the adapter trains."""
    model = copy.deepcopy(base)
    if method == "base":
        return model
    if method == "loldu":
        from ..model.adapt import add_loldu, get_loldu_params

        add_loldu(model, rank=rank)
        for p in get_loldu_params(model):
            p.requires_grad_(True)
        return model
    import peft

    config = (peft.LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear") if method == "peft_lora"
              else peft.VeraConfig(r=rank, target_modules="all-linear"))
    with warnings.catch_warnings():  # PEFT calls transformers APIs that transformers 5 marks deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(model, config)


def trainable_values(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_step(model: nn.Module, embeds: torch.Tensor, floor: bool) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    embeds = embeds.detach().clone().requires_grad_(floor)

    def step():
        loss = model(inputs_embeds=embeds).last_hidden_state.float().pow(2).mean()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        embeds.grad = None

    return step


def _inputs(base: nn.Module, batch: int, seq: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=g).to(device)
    with torch.no_grad():
        return base.get_input_embeddings()(ids)


@dataclass
class ModelResult:
    model: str
    device: str
    dtype: str
    batch: int
    seq: int
    rank: int
    method: str
    step_ms: float
    ratio: float  # median over rounds of (method / frozen base) in the same round
    ratio_min: float
    ratio_max: float
    trainable: int
    peak_mb: float = float("nan")
    noisy: str = ""  # "yes" where the ratio's range holds another method's median: not ranked by this run
    rounds: int = 0
    calls: int = 0  # the fewest steps a timed sample of this method made


def _peak_memory(name, method, rank, batch, seq, device, dtype) -> float:
    """MB over the built model during two steps, in a process of its own (see the module docstring)."""
    base = build_base(name).to(device, dtype)
    embeds = _inputs(base, batch, seq, device)
    make_step(copy.deepcopy(base), embeds, True)()  # pages in the libraries' code, which stays resident
    model = adapt(base, method, rank)
    del base
    step = make_step(model, embeds, method == "base")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the baseline may then include freed memory
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the high-water mark starts again at the current resident size
    except OSError:  # then it keeps the warm-up step's, about as high
        pass
    start = _status_kb("VmRSS")
    step()
    step()
    return (_status_kb("VmHWM") - start) / 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory(name, method, rank, batch, seq, device, dtype) -> float:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_peak_memory, (name, method, rank, batch, seq, device, dtype))


def bench_model(name: str, ranks, batch: int, seq: int, device, dtype, repeats: int, methods=METHODS,
                memory: bool = True, log=print) -> List[ModelResult]:
    base = build_base(name).to(device, dtype)
    embeds = _inputs(base, batch, seq, device)
    clock = Clock(device)
    results = []
    for rank in ranks:
        models = {m: adapt(base, m, rank) for m in methods}
        steps = {m: (make_step(models[m], embeds, m == "base"),) for m in methods}
        calls = {m: calibrate(step, clock) for m, step in steps.items()}  # warms up too
        times: Dict[str, List[float]] = {m: [] for m in methods}
        counts: Dict[str, List[int]] = {m: [] for m in methods}
        for _ in range(repeats):  # interleaved rounds: every method sees the same machine state
            for m, step in steps.items():
                per_call, count = sample(step, calls[m], clock)
                times[m] += per_call
                counts[m].append(count)
        # paired: method / frozen base within the same round
        ratios = {m: [a / b for a, b in zip(times[m], times["base"])] for m in methods} if "base" in times else {}
        flags = unranked(ratios) if ratios else {}
        for m in methods:
            ratio, low, high = spread(ratios[m]) if ratios else (float("nan"),) * 3
            peak = peak_memory(name, m, rank, batch, seq, device, dtype) if memory else float("nan")
            results.append(ModelResult(name, device.type, str(dtype).replace("torch.", ""), batch, seq, rank, m,
                                       statistics.median(times[m]), ratio, low, high, trainable_values(models[m]),
                                       peak, noisy="1 round" if repeats < 2 else ("yes" if flags.get(m) else "-"),
                                       rounds=repeats, calls=min(counts[m])))
            log(markdown(results[-1:], header=False))
        del models, steps
    return results


HEADER = ["| model | device | dtype | batch x seq | r | method | step ms | x frozen base | range over rounds | noisy | "
          "rounds x calls | trainable values | peak MB over the model |",
          "|---|---|---|---|---:|---|---:|---:|---|---|---|---:|---:|"]


def markdown(results: List[ModelResult], header: bool = True) -> str:
    lines = list(HEADER) if header else []
    for r in results:
        lines.append(f"| {r.model} | {r.device} | {r.dtype} | {r.batch} x {r.seq} | {r.rank} | {r.method} | "
                     f"{r.step_ms:.1f} | {r.ratio:.3f} | {r.ratio_min:.3f}-{r.ratio_max:.3f} | {r.noisy} | "
                     f"{r.rounds} x {r.calls} | {r.trainable:,} | "
                     f"{r.peak_mb:.1f} |")
    return "\n".join(lines)


def plot(results: List[ModelResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r.rank for r in results})
    methods = [m for m in METHODS if any(r.method == m for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        rows = [next((r for r in results if r.rank == k and r.method == method), None) for k in ranks]
        xs = [i + j * width for i in range(len(ranks))]
        axes[0].bar(xs, [r.ratio if r else float("nan") for r in rows], width, label=method)
        axes[1].bar(xs, [r.peak_mb if r else float("nan") for r in rows], width, label=method)
    for ax, label in zip(axes, ("training step time / frozen base", "peak memory over the model (MB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ranks))])
        ax.set_xticklabels([f"r={k}" for k in ranks])
        ax.set_ylabel(label)
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    axes[0].legend(fontsize=7)
    first = results[0]
    fig.suptitle(f"{first.model}, {first.batch} x {first.seq} tokens, {first.device} {first.dtype}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_model_bench(args) -> List[ModelResult]:
    """args as cli.parse_args leaves them (checked, defaults filled in)."""
    device, dtype, name = args.device, getattr(torch, args.dtype), args.model
    batch, seq = args.batch
    wanted = list(args.methods or METHODS)
    if "base" not in wanted:
        wanted.insert(0, "base")  # the floor every ratio needs
    try:
        import peft  # noqa: F401
    except ImportError:
        print("note: peft is not installed; skipping the peft_lora, peft_vera rows")
        wanted = [m for m in wanted if not m.startswith("peft_")]
    print(f"{name}: {batch} x {seq} tokens, {args.dtype}; {machine(device)}; {args.repeats} interleaved rounds")
    print("\n".join(HEADER), flush=True)
    results = bench_model(name, args.ranks, batch, seq, device, dtype, args.repeats, tuple(wanted),
                          memory=not args.no_memory, log=lambda line: print(line, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model_bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    (out / "model_bench.md").write_text(markdown(results) + "\n")
    plot(results, out / "model_bench.png")
    print(f"wrote {out / 'model_bench.csv'}, {out / 'model_bench.md'}, {out / 'model_bench.png'}")
    return results
