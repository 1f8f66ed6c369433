"""LoLDU on a 4-bit base (bitsandbytes nf4) against PEFT LoRA on the same base: memory and training-step time.

    PYTHONPATH=. python benchmarks/quantized_base.py [--rounds 7] [--out FILE]

1. Memory of one 4096x4096 layer (LLaMA-7B's q and v shape; the model has 64 of them) with an nf4 base (block
   64, double quant, bf16 compute dtype) at r = 16 and r = 1024: the base's bytes, the adapter's frozen bytes
   (LoLDU's L and U in the compute dtype), its trainable bytes, their gradients and Adam's two states, and what
   autograd saves for backward of 1024 bf16 tokens beyond what the base alone saves. Counted from the tensors
   themselves.
2. The time of a training step (forward, loss, backward, Adam) of a small Llama whose q/v layers are nf4 (float32
   compute dtype: bitsandbytes' CPU backend), LoLDU against PEFT LoRA at the same rank, and the frozen base alone
   (forward, and backward down to the input embeddings' output, no optimizer) as the floor. Medians of interleaved rounds, in one process.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from loldu_triton import LoLDUConfig, get_loldu_model, get_loldu_params

import bitsandbytes as bnb  # noqa: E402  (the bench extra has it, via the quant extra)
import peft  # noqa: E402
import transformers as tf  # noqa: E402


def nf4(linear: nn.Linear, compute_dtype) -> nn.Module:
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone())
    return q.to("cpu")


def quantize_qv(model: nn.Module, compute_dtype) -> nn.Module:
    for name, module in list(model.named_modules()):
        if name.endswith(("q_proj", "v_proj")) and type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, nf4(module, compute_dtype))
    return model


def nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def saved_bytes(module: nn.Module, x: torch.Tensor, exclude) -> int:
    """Bytes autograd keeps for backward of one forward (distinct storages, parameters and buffers excluded)."""
    kept = []
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = module(x)
    y.float().sum().backward()
    return nbytes(t for t in kept if t.untyped_storage().data_ptr() not in skip)


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.q_proj = layer

    def forward(self, x):
        return self.q_proj(x)


def memory_rows(tokens: int = 1024):
    rows = []
    torch.manual_seed(0)
    linear = nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    x = torch.randn(tokens, 4096, dtype=torch.bfloat16, requires_grad=True)
    base = Holder(nf4(copy.deepcopy(linear), torch.bfloat16))
    base_bytes = nbytes(list(base.state_dict().values()))
    base_saved = saved_bytes(base, x, list(base.parameters()) + list(base.buffers()))
    for rank in (16, 1024):
        for method in ("LoLDU", "LoRA"):
            model = Holder(nf4(copy.deepcopy(linear), torch.bfloat16))
            if method == "LoLDU":
                get_loldu_model(model, LoLDUConfig(rank=rank, target_modules=["q_proj"]))
            else:
                model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj"]))
            trainable = [p for p in model.parameters() if p.requires_grad]
            base_tensors = {t.untyped_storage().data_ptr() for t in base_tensors_of(model)}
            frozen = [t for t in list(model.parameters()) + list(model.buffers())
                      if not t.requires_grad and t.untyped_storage().data_ptr() not in base_tensors]
            train_b = nbytes(trainable)
            optimizer_b = 2 * sum(p.numel() * 4 for p in trainable)  # Adam's exp_avg and exp_avg_sq, float32
            saved = saved_bytes(model, x, list(model.parameters()) + list(model.buffers())) - base_saved
            rows.append((rank, method, base_bytes, nbytes(frozen), train_b, train_b, optimizer_b, saved))
    return rows


def base_tensors_of(model):
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            yield from module.parameters(recurse=False)
            yield from module.buffers(recurse=False)
            state = module.weight.quant_state
            yield from (v for v in state.as_dict(packed=True).values() if isinstance(v, torch.Tensor))


def small_llama():
    config = tf.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config)


def step_fn(model, ids, params):
    """Forward, loss, backward and an Adam step of ``params`` (none: the frozen base's floor, whose backward
    runs down to the input embeddings' output)."""
    opt = torch.optim.Adam(params, lr=1e-3) if params else None

    def step():
        loss = model(ids, labels=ids).loss
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt is not None:
            opt.step()
    return step


def time_rows(rank: int, rounds: int, batch: int = 4, length: int = 128):
    reference = small_llama()
    ids = torch.randint(0, 2048, (batch, length), generator=torch.Generator().manual_seed(1))
    variants = {}
    base = quantize_qv(copy.deepcopy(reference), torch.float32)
    for p in base.parameters():
        p.requires_grad_(False)
    base.enable_input_require_grads()  # the embeddings' output needs a gradient: backward runs through all
    variants["frozen base"] = step_fn(base, ids, [])
    loldu = get_loldu_model(quantize_qv(copy.deepcopy(reference), torch.float32),
                            LoLDUConfig(rank=rank, target_modules=["q_proj", "v_proj"]))
    variants["LoLDU"] = step_fn(loldu, ids, get_loldu_params(loldu))
    lora = peft.get_peft_model(quantize_qv(copy.deepcopy(reference), torch.float32),
                               peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"]))
    variants["LoRA"] = step_fn(lora, ids, [p for p in lora.parameters() if p.requires_grad])
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = [f"# 4-bit base: LoLDU vs PEFT LoRA ({platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__})", "",
             "## Memory of one 4096x4096 layer, nf4 base (double quant, bf16 compute), 1024 bf16 tokens (MiB)", "",
             "| rank | method | base | adapter frozen | trainable | grads | Adam states | saved for backward (beyond "
             "the base's) | adapter total | x 64 (LLaMA-7B q and v) |", "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for rank, method, base_b, frozen, train_b, grads, opt_b, saved in memory_rows():
        total = frozen + train_b + grads + opt_b + saved
        row = (f"| {rank} | {method} | {mb(base_b)} | {mb(frozen)} | {mb(train_b)} | {mb(grads)} | {mb(opt_b)} | "
               f"{mb(saved)} | {mb(total)} | {total * 64 / 2**30:.2f} GiB |")
        lines.append(row)
        print(row, flush=True)
    head = ["", f"## Training step of a small Llama (2 layers, hidden 512, MLP 1376, vocab 2048; q/v nf4, float32 "
                f"compute), batch 4 x 128 tokens, medians of {args.rounds} interleaved rounds", "",
            "| rank | frozen base (s) | LoLDU (s) | LoRA (s) | LoLDU / LoRA | LoLDU / base | LoRA / base |",
            "|---|---|---|---|---|---|---|"]
    lines += head
    print("\n".join(head), flush=True)
    for rank in args.ranks:
        t = time_rows(rank, args.rounds)
        row = (f"| {rank} | {t['frozen base']:.3f} | {t['LoLDU']:.3f} | {t['LoRA']:.3f} | "
               f"{t['LoLDU'] / t['LoRA']:.2f} | {t['LoLDU'] / t['frozen base']:.2f} | "
               f"{t['LoRA'] / t['frozen base']:.2f} |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
