"""Where the time of one training step of `python -m trainer train` goes: `python bench/profile_step.py`.

Builds the trainer's own samples, model, adapter and micro-batch (trainer.data, trainer.train,
trainer.batching: the same functions the trainer runs), warms up, then profiles a few steps with
torch.profiler and prints the self time per operator group, the achieved rate of the matrix products
alone, and the top operators. Defaults: the default model, the demo raw text, cutoff 256, micro batch 4,
LoRA r=8/alpha=16, dropout 0 on q,k,v,o with the trainer's fused LoRA forward, packing on (the benchmark's
set-up for the 60% goal).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GROUPS = [
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn", "mkldnn")),
    ("attention (sdpa)", ("scaled_dot_product", "flash_attention", "_efficient_attention", "math_attention")),
    ("softmax / cross-entropy", ("log_softmax", "nll_loss", "softmax", "cross_entropy")),
    ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "addcmul", "sqrt", "clip")),
    ("copies / layout", ("copy_", "contiguous", "clone", "cat", "to", "empty", "zeros", "fill_", "index",
                         "gather", "scatter", "embedding", "transpose", "reshape", "view", "expand", "slice",
                         "narrow", "select", "t", "permute", "unsqueeze", "as_strided", "split")),
]


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, keys in GROUPS:
        if group == "copies / layout":
            short = lowered.removeprefix("aten::")
            if any(short == k or short.startswith(k + "_") or short == "_" + k for k in keys):
                return group
        elif any(k in lowered for k in keys):
            return group
    return "elementwise / norms / other"


def profile_batch(args, **overrides):
    """The parameters of `args` (with `overrides`) and one typical micro-batch of the trainer's own samples."""
    import torch

    from trainer import batching
    from trainer.data import build_samples
    from trainer.home import HOME_ENV
    from trainer.models import load_tokenizer
    from trainer.params import DEFAULT_MODEL, TrainingParameters
    from trainer.train import keep_freed_memory_for_reuse

    os.environ.pop(HOME_ENV, None)
    params = TrainingParameters.from_dict({
        "base_model": args.model or DEFAULT_MODEL, "cutoff_len": args.cutoff_len,
        **({"raw_text_file": "user-guide.txt"} if args.dataset == "raw" else
           {"dataset": "dashboard-instructions.json", "format": "alpaca-format", "skip_unmatched_rows": True}),
        "overlap_len": min(128, args.cutoff_len // 2), "micro_batch_size": args.micro_batch_size,
        "batch_size": args.micro_batch_size, "lora_rank": 8, "lora_alpha": 16, "target_modules": "q-k-v-o",
        "lora_dropout": args.lora_dropout,
        "packing": not args.no_packing, "seed": 0, **overrides})
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))  # as the trainer does
    keep_freed_memory_for_reuse()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(params.base_model)
    samples = build_samples(params, tokenizer).samples
    lengths = [s.n_tokens for s in samples]
    units = batching.training_units(lengths, params)
    row_lengths = [sum(lengths[i] for i in u) for u in units]
    # Without packing, a typical length-grouped micro-batch (rows near the median length); with it, the
    # fullest rows (a full-width batch, as nearly every packed batch is).
    order = sorted(range(len(units)), key=lambda u: -row_lengths[u])
    at = 0 if params.packing else max(0, len(order) // 2 - args.micro_batch_size // 2)
    micro = order[at:at + args.micro_batch_size]
    batch = batching.collate([[samples[i] for i in units[u]] for u in micro], tokenizer.pad_token_id, "cpu")
    return params, batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model name under models/ (default: the default model)")
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after one warm-up step)")
    parser.add_argument("--no-packing", action="store_true")
    parser.add_argument("--dataset", choices=["raw", "alpaca"], default="raw",
                        help="the demo raw text (default) or the demo Alpaca-style set")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="LoRA dropout (default 0, the trainer's default; 0.05 draws peft's dropout masks)")
    parser.add_argument("--peft-forward", action="store_true",
                        help="peft's own LoRA forward instead of the trainer's fused one (trainer/fusedlora.py)")
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from trainer import batching
    from trainer.fusedlora import fuse_lora_layers
    from trainer.lora import build_optimizer, build_peft_model
    from trainer.loss import causal_lm_loss_sum
    from trainer.models import load_model

    params, batch = profile_batch(args)
    model = build_peft_model(params, load_model(params.base_model, "full", "cpu"), None)
    if not args.peft_forward:
        print(fuse_lora_layers(model).describe())  # as the trainer runs its layers (trainer/lora.py)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer("adamw_torch", trainable, 3e-4, 0.0)
    targets = batching.trained_targets(batch["labels"])

    phases = defaultdict(float)

    def step(timed: bool) -> None:
        t0 = time.perf_counter()
        loss = causal_lm_loss_sum(model, batch) / max(targets, 1)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if timed:
            phases["forward (incl. loss)"] += t1 - t0
            phases["backward"] += t2 - t1
            phases["clip + optimizer"] += t3 - t2

    step(False)
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for _ in range(args.steps):
        step(True)
    plain = (time.perf_counter() - started) / args.steps
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    page_faults = (usage_after.ru_minflt - usage_before.ru_minflt) / args.steps
    kernel_s = (usage_after.ru_stime - usage_before.ru_stime) / args.steps
    user_s = (usage_after.ru_utime - usage_before.ru_utime) / args.steps
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(args.steps):
            step(False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = defaultdict(float)
    for e in events:
        groups[group_of(e.key)] += e.self_cpu_time_total
    mm_time = sum(e.self_cpu_time_total for e in events if group_of(e.key) == "matrix products")
    mm_flops = sum(e.flops or 0 for e in events if group_of(e.key) == "matrix products")

    n_rows, n_positions = batch["input_ids"].shape
    real = batch["real_tokens"]
    print(f"Model {params.base_model}; micro-batch {n_rows} rows x {n_positions} positions, {real} real tokens "
          f"({'packed' if params.packing else 'one sample per row'}); torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"Step time without profiler: {plain:.2f} s = {real / plain:.0f} useful tokens/s, "
          f"{n_rows * n_positions / plain:.0f} computed positions/s")
    for name, seconds in phases.items():
        print(f"  {name:<24} {seconds / args.steps:6.2f} s  {100 * seconds / args.steps / plain:5.1f} %")
    print(f"Per step: {user_s:.2f} s user and {kernel_s:.2f} s kernel CPU time, {page_faults:,.0f} minor page faults")
    print("\nProfiler self CPU time by operator group (profiled steps):")
    for name, micros in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<30} {micros / 1e6 / args.steps:6.2f} s/step  {100 * micros / total:5.1f} %")
    if mm_time:
        print(f"\nMatrix products alone run at {mm_flops / (mm_time / 1e6) / 1e9:.1f} GFLOP/s "
              f"({mm_flops / args.steps / 1e9:.1f} GFLOP per step by the profiler's count)")
    print(f"\nTop {args.top} operators by self CPU time:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
