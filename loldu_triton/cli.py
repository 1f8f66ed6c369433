"""The ``loldu-triton`` command: ``demo`` (the main job), ``bench`` (layer, per-call and model benchmarks)
and ``compile-check`` (every kernel variant compiled for a GPU target, without a GPU)."""
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
    if args.model:
        from .model_bench import run_model_bench

        run_model_bench(args)
    elif args.inference:
        from .bench_inference import run_inference_bench

        run_inference_bench(args)
    else:
        from .bench import run_bench

        run_bench(args)
    return 0


def _compile_check(args) -> int:
    from .kernels.compile_check import main as check

    return check(args.arch, scope="quick" if args.quick else args.scope, json_path=args.json, jobs=args.jobs)


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
    bench.add_argument("--gpu", default=None, choices=["H100", "H200", "A100"],
                       help="roofline columns (ideal frozen-layer and LoLDU forward+backward time, their ratio) "
                            "for this GPU; default: the CUDA device's if it is one of these, else none")
    bench.add_argument("--model", default=None, choices=["minilm", "llama"],
                       help="instead of the layer table: one training step of a whole transformers model built "
                            "from a config (random weights, no download; minilm: MiniLM-L6-H384, a BERT encoder; "
                            "llama: a 4-layer Llama of width 512) with every attention and MLP Linear adapted: "
                            "the frozen base, LoLDU, PEFT LoRA and VeRA at each rank (default ranks 16,64,256): "
                            "step time and its ratio to the frozen base, trainable values, peak memory")
    bench.add_argument("--batch", default=None, metavar="BxS",
                       help="batch x sequence length for --model (default: 16x128 for minilm, 8x128 for llama)")
    bench.add_argument("--no-memory", action="store_true",
                       help="--model without the peak-memory column (it runs each method in a process of its own)")
    bench.add_argument("--inference", action="store_true",
                       help="instead of the layer table: the per-call time of LoLDULinear without autograd "
                            "(torch.no_grad) against nn.Linear on the CPU; default shape 1x64x64 (decode), "
                            "ranks 16,full")
    bench.add_argument("--out", default="./loldu-bench", help="output directory for CSV, markdown and PNG; each "
                       "case's rows are written as soon as they are measured")
    bench.set_defaults(func=_bench)

    check = sub.add_parser(
        "compile-check",
        help="compile every kernel variant for a GPU target without a GPU; report registers, spills, smem",
        description="Compile every variant the kernel launchers can produce (kernel x autotune config offered "
        "for the target x dtype x route) for sm_90 or sm_80 with the ptxas in the triton wheel; no GPU needed. "
        "Prints a summary per kernel and dtype and every problem found: a variant that does not compile, shared "
        "memory over the target's limit, spills in fp16/bf16, no tensor-core instruction, no wgmma in a 2-byte "
        "GEMM tile on sm_90. Exits 1 if any. On a GPU machine it also fills Triton's cache for the JIT.",
    )
    check.add_argument("--arch", type=int, default=90, choices=[90, 80], help="compute capability (default: 90)")
    check.add_argument("--json", default=None, metavar="FILE", help="write one JSON record per variant to FILE")
    check.add_argument("--quick", action="store_true",
                       help="only the widest operands of each dtype class (bf16 with fp32 factors, fp32), side "
                            "route, prefill and decode: every autotune config once, for CI")
    check.add_argument("--scope", default="full", choices=["full", "quick", "gpu-check"],
                       help="full (default): every dtype, factor dtype, quantized base and route; quick: as "
                            "--quick; gpu-check: what benchmarks/gpu_check.sh runs, to compile it ahead in parallel")
    check.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default: 1)")
    check.set_defaults(func=_compile_check)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
