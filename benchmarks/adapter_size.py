"""Size of LoLDU adapter files, measured: one 4096 x 4096 layer at r = 1024, and the paper's LLaMA2-7B setting
(r = 1024 on q_proj and v_proj of 32 blocks: 64 layers of 4096 x 4096) with LLaMA's layer names.

    python benchmarks/adapter_size.py [--out DIR]

The 64 layers share one random base weight and its factors (sharing changes nothing in the file: each layer
still writes its own d, s, pivots and fingerprint), so this runs in seconds and in ~1 GB of memory.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from loldu_triton import LoLDULinear, save_loldu
from loldu_triton.core.fileformat import ADAPTER_NAME


def measure(names, K=4096, N=4096, rank=1024, out=None) -> int:
    torch.manual_seed(0)
    base = nn.Linear(K, N, bias=False)
    first = LoLDULinear.from_linear(base, rank)
    model = nn.Module()
    for i, name in enumerate(names):
        layer = first if i == 0 else LoLDULinear.from_parametrization(base, first)
        with torch.no_grad():
            layer.d.mul_(1.01)  # a trained adapter
        parent = model
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name.split(".")[-1], layer)
    directory = Path(out or tempfile.mkdtemp()) / f"{len(names)}-layers"
    save_loldu(model, directory)
    return (directory / ADAPTER_NAME).stat().st_size


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="where to write the files (default: a temporary folder)")
    args = parser.parse_args()
    start = time.perf_counter()
    one = measure(["model.layers.0.self_attn.q_proj"], out=args.out)
    llama = [f"model.layers.{i}.self_attn.{m}_proj" for i in range(32) for m in ("q", "v")]
    sixty_four = measure(llama, out=args.out)
    print(f"one 4096x4096 layer, r=1024: {one:,} bytes")
    print(f"LLaMA2-7B q_proj + v_proj (64 layers of 4096x4096), r=1024: {sixty_four:,} bytes "
          f"({sixty_four / 64:,.0f} per layer)")
    print(f"(torch {torch.__version__}, {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
