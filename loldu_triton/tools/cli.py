"""The ``loldu-triton`` command: ``demo`` (the main job), ``bench`` (layer, per-call and model benchmarks)
and ``compile-check`` (every kernel variant compiled for a GPU target, without a GPU).

Every argument is checked before any work starts: a bad one ends in argparse's one line
``loldu-triton bench: error: argument --ranks: ...`` and exit code 2. Single values are checked by the ``type=``
functions below; what depends on other arguments or on the machine (a rank above a shape's, CUDA asked for
without one) by each subcommand's ``check``, through the same ``parser.error``."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .._version import __version__
from . import arguments

# ---------------------------------------------------------------------------------------------------------------
# Values of one argument. Each raises ArgumentTypeError, which argparse prints as "argument --x: <message>".
# ---------------------------------------------------------------------------------------------------------------


def _torch_device(parser, name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"argument --device: {name} asked for, but CUDA is not available here (torch "
                         f"{torch.__version__}); use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {name} asked for, but there are {torch.cuda.device_count()} CUDA "
                         f"devices (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def _needs(parser, modules, install: str):
    """Exit 1 with one line when a library the command runs with is missing (an install, not an argument)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        parser.exit(1, f"{parser.prog}: error: needs {', '.join(missing)}, not installed: {install}\n")


def _check_demo(args):
    _needs(args.parser, ("sklearn", "matplotlib", "tqdm"), "pip install -e '.[demo]'")
    args.device = str(_torch_device(args.parser, args.device))


# Which bench options each mode reads
_MODES = {"layers": "the layer table", "model": "--model", "inference": "--inference",
          "adapters": "--adapter-counts"}
_ONLY = {"shapes": ("layers", "inference"), "methods": ("layers", "model"), "gpu": ("layers",),
         "batch": ("model",), "no_memory": ("model",)}


def _check_bench(args):
    from . import bench, model_bench

    parser = args.parser
    args.mode = ("model" if args.model else "inference" if args.inference else
                 "adapters" if args.adapter_counts else "layers")
    for dest, modes in _ONLY.items():
        if getattr(args, dest) not in (None, False) and args.mode not in modes:
            parser.error(f"argument --{dest.replace('_', '-')}: read only by "
                         f"{' and '.join(_MODES[m] for m in modes)}, not by {_MODES[args.mode]}")
    if args.mode == "inference" and args.device not in ("auto", "cpu"):
        parser.error(f"argument --device: --inference times the CPU only, got {args.device!r}")
    if args.mode == "model":
        _needs(parser, ("transformers",), "pip install -e '.[bench]'")
    device = args.device = _torch_device(parser, args.device)
    gpu = device.type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu and args.mode != "inference" else "float32")
    args.repeats = args.repeats or {"layers": 3 if gpu else 15, "inference": 21, "model": 5, "adapters": 9}[args.mode]
    default_ranks = {"layers": [16, 64, 256, 1024, "full"] if gpu else [16], "inference": [16, "full"],
                     "model": [16, 64, 256], "adapters": [16]}[args.mode]
    args.ranks = args.ranks or default_ranks

    if args.mode == "model":
        largest = model_bench.MAX_RANK[args.model]
        for r in args.ranks:
            if r == "full":
                parser.error("argument --ranks: --model takes integer ranks (LoRA and VeRA have no 'full'), got "
                             "'full'")
            if r > largest:
                parser.error(f"argument --ranks: rank {r} is above {largest}, the smallest in or out width of an "
                             f"adapted layer of {args.model}")
        args.batch = args.batch or model_bench.MODELS[args.model]
        methods = model_bench.METHODS
    else:
        if args.mode == "adapters":
            if len(args.ranks) != 1:
                parser.error(f"argument --ranks: --adapter-counts takes one rank, got {len(args.ranks)}")
            args.shapes = [(max(args.adapter_counts) * 8,) + bench.ADAPTER_BATCH_SHAPE[device.type]]
        args.shapes = args.shapes or {"layers": bench.GPU_SHAPES if gpu else bench.CPU_SHAPES,
                                      "inference": [(1, 64, 64)]}.get(args.mode, args.shapes)
        for M, K, N in args.shapes:
            for r in args.ranks:
                if r != "full" and r > min(K, N):
                    parser.error(f"argument --ranks: rank {r} is above min(K, N) = {min(K, N)} of the layer "
                                 f"{M}x{K}x{N} (a layer holds at most that many; 'full' takes it)")
        if args.mode == "adapters":
            args.ranks = [min(args.shapes[0][1:]) if r == "full" else r for r in args.ranks]
        methods = bench.METHODS
    if args.methods:
        unknown = [m for m in args.methods if m not in methods]
        if unknown:
            parser.error(f"argument --methods: unknown {', '.join(unknown)}; choose from {', '.join(methods)}")
        if "peft_lora" in args.methods or "peft_vera" in args.methods:
            _needs(parser, ("peft",), "pip install -e '.[bench]'")
        if args.mode == "layers":
            import torch

            if "loldu_torch" in args.methods and not gpu:
                parser.error("argument --methods: loldu_torch runs on a GPU only (on the CPU it is what loldu runs)")
            if "loldu_fp8" in args.methods and gpu and torch.cuda.get_device_capability(device) < (8, 9):
                parser.error("argument --methods: loldu_fp8 needs compute capability 8.9 or newer, this GPU has "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}")
            if "linear" not in args.methods:
                args.methods.insert(0, "linear")  # the floor every ratio needs


def _check_compile_check(args):
    if args.quick and args.scope not in (None, "quick"):
        args.parser.error(f"argument --quick: not allowed with --scope {args.scope} (--quick is --scope quick)")
    args.scope = "quick" if args.quick else args.scope or "full"
    _needs(args.parser, ("triton",), "pip install triton (Linux)")


# ---------------------------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------------------------


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, pretrain_epochs=args.pretrain_epochs, seed=args.seed,
             device=args.device, progress=not args.no_progress)
    return 0


def _bench(args) -> int:
    if args.mode == "model":
        from .model_bench import run_model_bench

        run_model_bench(args)
    elif args.mode == "inference":
        from .bench_inference import run_inference_bench

        run_inference_bench(args)
    else:
        from .bench import run_bench

        run_bench(args)
    return 0


def _compile_check(args) -> int:
    from .compile_check import main as check

    return check(args.arch, scope=args.scope, json_path=args.json, jobs=args.jobs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loldu-triton", description="LoLDU fine-tuning: demo and benchmarks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="pretrain a small MLP on digits, adapt it to rotated digits with several methods, compare",
        description="Pretrain an MLP on scikit-learn's handwritten digits (shipped offline), adapt it to the "
        "digits rotated by 90 degrees with: a new head only, full fine-tuning, LoRA r=8 and LoLDU at r=1, 16 "
        "and full rank; report trainable parameters, held-out accuracy, training time (epochs x the median "
        "epoch, and the fastest and slowest epoch), adapter file size and the accuracy after merging. Writes "
        "results.json, results.md, accuracy_vs_params.png and adapters/ (each method's trained tensors; LoLDU's "
        "adapter folders) into --out.",
    )
    demo.add_argument("--out", type=arguments.writable_dir, default="./loldu-demo",
                      help="output folder, made if missing (default: ./loldu-demo)")
    demo.add_argument("--epochs", type=arguments.positive_int, default=30, help="adaptation epochs per method (default: 30)")
    demo.add_argument("--pretrain-epochs", type=arguments.positive_int, default=40, help="pretraining epochs (default: 40)")
    demo.add_argument("--seed", type=arguments.seed, default=0, help="seed for data split, init and batches (default: 0)")
    demo.add_argument("--device", type=arguments.device_name, default="auto",
                      help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo, check=_check_demo, parser=demo)

    bench = sub.add_parser(
        "bench",
        help="time LoLDULinear against the frozen nn.Linear and other adapters",
        description="Layer benchmark on whatever device is there: the frozen nn.Linear (the floor), "
        "LoLDULinear, the unfused PyTorch form of LoLDU, a parametrization that rebuilds W with a dense P on "
        "every forward (the reference code's way), and PEFT LoRA / VeRA at the same rank when PEFT is "
        "installed. Rounds alternate the methods; in each, a method's sample times as many calls as make its "
        "forward and its backward (each timed on its own) last 25 ms or more on the CPU (50 ms on CUDA, with "
        "events). Each ratio to the floor is the median over rounds of the ratio within a round, printed with "
        "its range over rounds; 'noisy' names the ratios whose range holds another method's median, which this "
        "run cannot rank. Also: memory saved for backward (and peak GPU memory on CUDA).",
    )
    bench.add_argument("--shapes", type=arguments.shapes, default=None,
                       help="comma-separated MxKxN (tokens x in x out) (default: 2048x1024x1024 on CPU, "
                            "LLaMA-7B shapes on GPU; 1x64x64 for --inference)")
    bench.add_argument("--ranks", type=arguments.ranks, default=None,
                       help="comma-separated ranks, or 'full'; at most min(K, N) of every shape (default: 16 on "
                            "CPU, 16,64,256,1024,full on GPU; 16,full for --inference; 16,64,256 for --model; 16 "
                            "for --adapter-counts, which takes one)")
    bench.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                       help="dtype of the layers and inputs (default: float32 on CPU and for --inference, "
                            "bfloat16 on GPU)")
    bench.add_argument("--device", type=arguments.device_name, default="auto",
                       help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    bench.add_argument("--repeats", type=arguments.positive_int, default=None,
                       help="interleaved rounds per case, each one timed sample of every method (default: 15 on "
                            "CPU, 3 on CUDA; 21 for --inference, 5 for --model, 9 for --adapter-counts)")
    bench.add_argument("--methods", type=arguments.names, default=None,
                       help="comma-separated subset of: linear, loldu (Triton on GPU), loldu_torch (the PyTorch "
                            "path, GPU only), loldu_int8 and loldu_fp8 (quantized base), loldu_unfused, seed_param, "
                            "peft_lora, peft_vera; with --model: base, loldu, peft_lora, peft_vera. The floor "
                            "(linear, base) is always timed (default: all; PEFT's where installed)")
    modes = bench.add_mutually_exclusive_group()
    modes.add_argument("--adapter-counts", type=arguments.counts, default=None,
                       help="instead of the layer table: time one batch (as many rows as the largest count, "
                            "8 tokens each, K = N = 1024 on CPU, 4096 on GPU) whose rows use 1, 10, ... different "
                            "adapters, against one adapter; e.g. 1,10,100,1000 (default: off)")
    bench.add_argument("--gpu", default=None, choices=["H100", "H200", "A100"],
                       help="roofline columns (ideal frozen-layer and LoLDU forward+backward time, their ratio) "
                            "for this GPU (default: the CUDA device's if it is one of these, else none)")
    modes.add_argument("--model", default=None, choices=["minilm", "llama"],
                       help="instead of the layer table: one training step of a whole transformers model built "
                            "from a config (random weights, no download; minilm: MiniLM-L6-H384, a BERT encoder; "
                            "llama: a 4-layer Llama of width 512) with every attention and MLP Linear adapted: "
                            "the frozen base, LoLDU, PEFT LoRA and VeRA at each rank: step time and its ratio to "
                            "the frozen base, trainable values, peak memory (default: off)")
    bench.add_argument("--batch", type=arguments.batch, default=None, metavar="BxS",
                       help="batch x sequence length for --model (default: 16x128 for minilm, 8x128 for llama)")
    bench.add_argument("--no-memory", action="store_true",
                       help="--model without the peak-memory column (it runs each method in a process of its own)")
    modes.add_argument("--inference", action="store_true",
                       help="instead of the layer table: the per-call time of LoLDULinear without autograd "
                            "(torch.no_grad) against nn.Linear on the CPU")
    bench.add_argument("--out", type=arguments.writable_dir, default="./loldu-bench",
                       help="output folder for CSV, markdown and PNG, made if missing; each case's rows are "
                            "written as soon as they are measured (default: ./loldu-bench)")
    bench.set_defaults(func=_bench, check=_check_bench, parser=bench)

    check = sub.add_parser(
        "compile-check",
        help="compile every kernel variant for a GPU target without a GPU; report registers, spills, smem",
        description="Compile every variant the kernel launchers can produce (kernel x autotune config offered "
        "for the target x dtype x route) for sm_90 or sm_80 with the ptxas in the triton wheel; no GPU needed. "
        "Prints a summary per kernel and dtype and every problem found: a variant that does not compile, shared "
        "memory over the target's limit, spills in fp16/bf16, no tensor-core instruction, no wgmma in a 2-byte "
        "GEMM tile on sm_90. Exits 1 if any. On a GPU machine it also fills Triton's cache for the JIT.",
    )
    check.add_argument("--arch", type=arguments.arch, default=90, help="compute capability: 90 or 80 (default: 90)")
    check.add_argument("--json", type=arguments.writable_file, default=None, metavar="FILE",
                       help="write one JSON record per variant to FILE (default: none)")
    check.add_argument("--quick", action="store_true",
                       help="only the widest operands of each dtype class (bf16 with fp32 factors, fp32), side "
                            "route, prefill and decode: every autotune config once, for CI; the same as --scope quick")
    check.add_argument("--scope", default=None, choices=["full", "quick", "gpu-check"],
                       help="full: every dtype, factor dtype, quantized base and route; quick: as --quick; "
                            "gpu-check: what benchmarks/gpu_check.sh runs, to compile it ahead in parallel "
                            "(default: full)")
    check.add_argument("--jobs", type=arguments.positive_int, default=1, help="compile in this many processes (default: 1)")
    check.set_defaults(func=_compile_check, check=_check_compile_check, parser=check)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, checked and with their defaults filled in for this machine; a bad one exits 2 (one line)."""
    args = build_parser().parse_args(argv)
    args.check(args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
