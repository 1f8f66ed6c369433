"""The ``loldu-triton`` command: ``demo`` (the main job) and ``bench`` (layer benchmark)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._version import __version__


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, pretrain_epochs=args.pretrain_epochs, seed=args.seed,
             device=args.device, progress=not args.no_progress)
    return 0


def _bench(args) -> int:
    from .bench import run_bench

    run_bench(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loldu-triton", description="LoLDU fine-tuning: demo and benchmarks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="pretrain a small MLP on digits, adapt it to rotated digits with several methods, compare",
        description="Pretrain an MLP on scikit-learn's handwritten digits (shipped offline), adapt it to the "
        "digits rotated by 90 degrees with: a new head only, full fine-tuning, LoRA r=8 and LoLDU at r=1, 16 "
        "and full rank; report trainable parameters, held-out accuracy, training time, adapter file size and "
        "the accuracy after merging. Writes results.json, results.md, accuracy_vs_params.png and adapters/ (each "
        "method's trained tensors; LoLDU's adapter folders) into --out.",
    )
    demo.add_argument("--out", default="./loldu-demo", help="output directory (default: ./loldu-demo)")
    demo.add_argument("--epochs", type=int, default=30, help="adaptation epochs per method (default: 30)")
    demo.add_argument("--pretrain-epochs", type=int, default=40, help="pretraining epochs (default: 40)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data split, init and batches (default: 0)")
    demo.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu' or 'cuda'")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser(
        "bench",
        help="time LoLDULinear against the frozen nn.Linear and other adapters",
        description="Layer benchmark on whatever device is there: the frozen nn.Linear (the floor), "
        "LoLDULinear, the unfused PyTorch form of LoLDU, a parametrization that rebuilds W with a dense P on "
        "every forward (the reference code's way), and PEFT LoRA / VeRA at the same rank when PEFT is "
        "installed. Forward, backward and forward+backward medians, interleaved, with the ratio to the floor "
        "measured in the same run; memory saved for backward (and peak GPU memory on CUDA).",
    )
    bench.add_argument("--shapes", default=None,
                       help="comma-separated MxKxN (tokens x in x out); default: 2048x1024x1024 on CPU, "
                            "LLaMA-7B shapes on GPU")
    bench.add_argument("--ranks", default=None, help="comma-separated ranks, or 'full' (default: 16 on CPU)")
    bench.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                       help="default: float32 on CPU, bfloat16 on GPU")
    bench.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    bench.add_argument("--repeats", type=int, default=None, help="timed repeats per case (CPU; default 15)")
    bench.add_argument("--methods", default=None,
                       help="comma-separated subset of: linear, loldu (Triton on GPU), loldu_torch (the PyTorch "
                            "path, GPU only), loldu_int8 and loldu_fp8 (quantized base), loldu_unfused, seed_param, "
                            "peft_lora, peft_vera (default: all)")
    bench.add_argument("--adapter-counts", default=None,
                       help="instead of the layer table: time one batch (as many rows as the largest count, "
                            "8 tokens each) whose rows use 1, 10, ... different adapters, against one adapter; "
                            "e.g. 1,10,100,1000")
    bench.add_argument("--out", default="./loldu-bench", help="output directory for CSV, markdown and PNG")
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
