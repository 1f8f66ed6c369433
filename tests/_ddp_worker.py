"""One rank of the distributed tests in test_integrations.py (not a test module itself).

Run as ``python _ddp_worker.py {ddp|fsdp2|fsdp2-inplace} OUT_FILE`` with the torchrun-style environment variables RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Each rank trains on its share of one batch (gloo, CPU); rank 0
writes the trained d and s of every LoLDU layer and the per-step global losses to OUT_FILE (torch.save).
On an error every rank writes its traceback to OUT_FILE.rank<N>.err and exits with status 1.

The test imports this file too, for the model, the batch and the training settings, so that its
single-process reference is built exactly as every rank builds its copy.
"""
from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.nn as nn

STEPS = 3
LR = 0.5
BATCH = 16
IN, HIDDEN, OUT = 12, 24, 6


class InplaceResidual(nn.Module):
    """An MLP that modifies its layers' (2-D) outputs in place, as many hand-written blocks do."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(IN, HIDDEN)
        self.mid = nn.Linear(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, OUT)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        y = self.mid(h)
        y += h  # in place, on the output of a (sharded) layer
        return self.out(torch.tanh(y))


def build_model(kind: str = "mlp") -> nn.Module:
    """The same adapted model on every rank: seeded base weights, LoLDU on every layer, only d and s trainable."""
    from loldu_triton import add_loldu, get_loldu_params

    torch.manual_seed(1234)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                              nn.Linear(HIDDEN, OUT))
    else:
        model = InplaceResidual()
    add_loldu(model, rank=4)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in get_loldu_params(model):
        p.requires_grad_(True)
    return model


def make_batch():
    g = torch.Generator().manual_seed(99)
    return torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)


def loss_fn(y, target):
    return (y - target).pow(2).mean()


def train(model, params, x, target, reduce_loss=None):
    """STEPS of plain SGD; returns the loss of each step (averaged over ranks when reduce_loss is given)."""
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        losses.append(reduce_loss(loss.detach()) if reduce_loss else float(loss.detach()))
    return losses


def adapter_values(model) -> dict:
    """{layer name: (d, s)} as plain float32 CPU tensors (DTensors are gathered)."""
    from loldu_triton import loldu_layers

    def plain(t):
        t = t.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        return t.clone().cpu()

    return {name: (plain(layer.d), plain(layer.s)) for name, layer in loldu_layers(model)}


def main(mode: str, out_file: str) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build_model("residual" if mode == "fsdp2-inplace" else "mlp")
        x, target = make_batch()
        share = BATCH // world
        x, target = x[rank * share:(rank + 1) * share], target[rank * share:(rank + 1) * share]

        def reduce_loss(loss):
            dist.all_reduce(loss)
            return float(loss) / world

        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)  # find_unused_parameters=False: every d and s is used
            params = [p for p in wrapped.parameters() if p.requires_grad]
        elif mode in ("fsdp2", "fsdp2-inplace"):
            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:  # torch < 2.6
                from torch.distributed._composable.fsdp import fully_shard
            from loldu_triton import loldu_layers

            for _, layer in loldu_layers(model):
                fully_shard(layer)
            wrapped = fully_shard(model)
            params = [p for p in wrapped.parameters() if p.requires_grad]
        else:
            raise ValueError(f"unknown mode {mode!r}")
        losses = train(wrapped, params, x, target, reduce_loss)
        values = adapter_values(model)
        if rank == 0:
            torch.save({"values": values, "losses": losses}, out_file)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise


def _exit_now(code: int) -> None:
    # Gloo's threads can abort the process in C++ teardown ("terminate called without an active exception",
    # SIGABRT) after the work is done and saved; an exit without teardown reports the work's own outcome.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2])
    except BaseException:
        with open(f"{sys.argv[2]}.rank{os.environ.get('RANK', '?')}.err", "w") as f:
            f.write(traceback.format_exc())
        traceback.print_exc()
        _exit_now(1)
    _exit_now(0)
