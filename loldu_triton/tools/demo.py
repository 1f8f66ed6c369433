"""A small version of the paper's comparison on real data that ships offline (scikit-learn's digits).

An MLP is pretrained on upright digits, then adapted to rotated digits (a shifted task) by: a new head only
(linear probe), full fine-tuning, LoRA, and LoLDU at several ranks. Every method trains a new head.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from ..files.adapters import load_loldu, save_loldu
from ..model.adapt import add_loldu, get_loldu_params
from ..model.manage import merge_loldu

HIDDEN = 256


@dataclass
class Method:
    name: str
    rank: Optional[object]  # int, "full" or None
    lr: float


# Learning rates: the best of a small sweep per method on this task (Adam, 30 epochs, seed 0; sweep in README).
DEFAULT_METHODS = [
    Method("head only", None, 1e-2),
    Method("full fine-tuning", None, 3e-3),
    Method("LoRA", 8, 1e-2),
    Method("LoLDU", 1, 3e-2),
    Method("LoLDU", 16, 1e-2),
    Method("LoLDU", "full", 1e-2),
]


@dataclass
class Row:
    method: str
    rank: Optional[object]
    trainable_params: int
    accuracy: float
    train_seconds: float  # epochs x the median epoch: one stalled epoch on a shared machine does not count
    adapter_bytes: int
    lr: float
    merged_accuracy: Optional[float] = None
    epoch_seconds_min: float = float("nan")  # the spread of the epochs' times
    epoch_seconds_max: float = float("nan")


class LoRALinear(nn.Module):
    """Minimal LoRA (Hu et al.): y = base(x) + (alpha / r) * x A^T B^T, B = 0 at init."""

    def __init__(self, base: nn.Linear, rank: int, alpha: Optional[float] = None):
        super().__init__()
        self.base = base
        self.scale = (alpha or rank) / rank
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.base.in_features, self.base.out_features, device=self.base.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.scale * self.B @ self.A)
            linear.bias.copy_(self.base.bias)
        return linear


class MLP(nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(64, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU()
        )
        self.head = nn.Linear(HIDDEN, n_classes)

    def forward(self, x):
        return self.head(self.body(x))


def load_digits_tasks(seed: int, device):
    """Pretraining task: upright digits. Shifted task: the same digits rotated by 90 degrees."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    x, y = x[order], y[order]
    split = int(0.6 * len(x))
    upright = x.reshape(len(x), -1)
    rotated = torch.rot90(x, 1, dims=(1, 2)).reshape(len(x), -1)

    def to(t):
        return t.to(device)

    pretrain = (to(upright[:split]), to(y[:split]))
    # the shifted task uses the other 40% of the images: 60% of those to adapt, 40% held out
    rest = len(x) - split
    cut = split + int(0.6 * rest)
    adapt = (to(rotated[split:cut]), to(y[split:cut]))
    held_out = (to(rotated[cut:]), to(y[cut:]))
    return pretrain, adapt, held_out


def epochs_of(model, params, data, lr, seed, head_lr=1e-2, batch=64):
    """Trains in place, one epoch per next(); yields that epoch's seconds (synchronized on CUDA) and last loss."""
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    head = list(model.head.parameters())
    head_ids = {id(p) for p in head}
    groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": lr}, {"params": head, "lr": head_lr}]
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    while True:
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=gen).to(x.device)
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        yield time.perf_counter() - start, loss


def train(model, params, data, epochs, lr, seed, head_lr=1e-2, progress=None, batch=64) -> List[float]:
    """Trains in place; returns each epoch's seconds."""
    run = epochs_of(model, params, data, lr, seed, head_lr, batch)
    seconds = []
    for _ in range(epochs):
        epoch_s, loss = next(run)
        seconds.append(epoch_s)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    return seconds


@torch.no_grad()
def accuracy(model, data) -> float:
    x, y = data
    return float((model(x).argmax(-1) == y).float().mean())


def trainable_bytes(model, directory: Path, tag: str) -> int:
    """Size of a safetensors file holding exactly the trainable tensors."""
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    path = directory / f"{tag}.safetensors"
    save_file(tensors, str(path))
    return path.stat().st_size


def prepare(method: Method, pretrained: MLP, seed):
    """The pretrained MLP with a new head and `method` applied; returns it and its trainable parameters."""
    torch.manual_seed(seed)
    model = MLP().to(next(pretrained.parameters()).device)
    model.load_state_dict(pretrained.state_dict())
    model.head.reset_parameters()  # a new head for the new task
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)
    if method.name == "full fine-tuning":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method.name == "LoRA":
        for i, layer in enumerate(model.body):
            if isinstance(layer, nn.Linear):
                model.body[i] = LoRALinear(layer, method.rank)
    elif method.name == "LoLDU":
        add_loldu(model.body, rank=method.rank)
        for p in get_loldu_params(model):
            p.requires_grad_(True)
    return model, [p for p in model.parameters() if p.requires_grad]


def finish(method: Method, model, params, epoch_seconds, pretrained: MLP, held_out, workdir: Path) -> Row:
    """The row of a trained method: accuracy, time, adapter size; LoLDU's adapter reloaded, merges checked."""
    model.eval()
    label = method.name + (f" r={method.rank}" if method.rank is not None else "")
    row = Row(method.name, method.rank, sum(p.numel() for p in params), accuracy(model, held_out),
              len(epoch_seconds) * statistics.median(epoch_seconds),
              trainable_bytes(model, workdir, label.replace(" ", "_").replace("=", "")), method.lr,
              epoch_seconds_min=min(epoch_seconds), epoch_seconds_max=max(epoch_seconds))
    if method.name == "LoLDU":
        # the adapter file alone reproduces the model on a fresh copy of the pretrained body
        save_loldu(model.body, workdir / f"loldu_r{method.rank}")
        fresh = MLP().to(next(pretrained.parameters()).device)
        fresh.load_state_dict(pretrained.state_dict())
        fresh.head.load_state_dict(model.head.state_dict())
        load_loldu(fresh.body, workdir / f"loldu_r{method.rank}")
        if accuracy(fresh, held_out) != row.accuracy:
            raise RuntimeError(f"LoLDU r={method.rank}: reloaded adapter gives another accuracy")
        merge_loldu(model.body)
        row.merged_accuracy = accuracy(model, held_out)
    elif method.name == "LoRA":
        for i, layer in enumerate(model.body):
            if isinstance(layer, LoRALinear):
                model.body[i] = layer.merged()
        row.merged_accuracy = accuracy(model, held_out)
    return row


def markdown_table(rows: List[Row]) -> str:
    lines = [
        "| method | rank | trainable params | accuracy | merged accuracy | train s | epoch s (min-max) | "
        "adapter bytes | lr |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        merged = "" if r.merged_accuracy is None else f"{r.merged_accuracy:.4f}"
        lines.append(
            f"| {r.method} | {'' if r.rank is None else r.rank} | {r.trainable_params:,} | {r.accuracy:.4f} | "
            f"{merged} | {r.train_seconds:.2f} | {r.epoch_seconds_min:.3f}-{r.epoch_seconds_max:.3f} | "
            f"{r.adapter_bytes:,} | {r.lr:g} |"
        )
    return "\n".join(lines)


def plot(rows: List[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        label = r.method + ("" if r.rank is None else f" r={r.rank}")
        ax.scatter(r.trainable_params, r.accuracy, s=40)
        ax.annotate(label, (r.trainable_params, r.accuracy), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.25)
    ax.set_xlabel("trainable parameters (log scale; every method trains a 2,570-parameter head)")
    ax.set_ylabel("held-out accuracy, rotated digits")
    ax.set_title("Adapting a digits MLP to rotated digits")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(out: Path, epochs: int = 30, pretrain_epochs: int = 40, seed: int = 0, device: str = "auto",
             progress: bool = True) -> List[Row]:
    from tqdm import tqdm

    def bars(*args, **kwargs):
        # disable=None: bars on a terminal only, so a log piped to a file holds no carriage-return updates
        return tqdm(*args, disable=None if progress else True, **kwargs)

    tqdm_cls = bars
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "adapters"
    workdir.mkdir(exist_ok=True)
    pretrain, adapt, held_out = load_digits_tasks(seed, device)

    pretrained = MLP().to(device)
    start = time.perf_counter()
    with tqdm_cls(total=pretrain_epochs, desc="pretrain (upright)", leave=False) as bar:
        train(pretrained, list(pretrained.parameters()), pretrain, pretrain_epochs, 1e-3, seed, head_lr=1e-3,
              progress=bar)
    pretrained.eval()
    rotated_before = accuracy(pretrained, held_out)
    print(f"pretrained on upright digits in {time.perf_counter() - start:.1f} s on {device}; "
          f"accuracy on the held-out rotated digits before adapting: {rotated_before:.4f}")

    models = [prepare(m, pretrained, seed) for m in DEFAULT_METHODS]
    runs = [epochs_of(model, params, adapt, m.lr, seed) for m, (model, params) in zip(DEFAULT_METHODS, models)]
    seconds: List[List[float]] = [[] for _ in runs]
    # One epoch of each method in turn: every method's epochs see the same machine, so their times compare on a
    # shared one (trained one after another, a busy spell of the machine fell on one method's time alone).
    with tqdm_cls(total=epochs * len(runs), desc=f"adapting ({len(runs)} methods)", leave=False) as bar:
        for _ in range(epochs):
            for run, times in zip(runs, seconds):
                times.append(next(run)[0])
                bar.update(1)
    rows = [finish(m, model, params, times, pretrained, held_out, workdir)
            for m, (model, params), times in zip(DEFAULT_METHODS, models, seconds)]
    table = markdown_table(rows)
    print(table)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    (out / "results.md").write_text(
        f"Digits MLP (64-{HIDDEN}-{HIDDEN}-{HIDDEN}-10) pretrained on upright digits, adapted to digits rotated "
        f"by 90 degrees; {epochs} epochs, seed {seed}, device {device}. train s: epochs x the median epoch's "
        f"time; epoch s: the fastest and the slowest epoch.\n\n{table}\n"
    )
    plot(rows, out / "accuracy_vs_params.png")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy_vs_params.png'}")
    return rows
