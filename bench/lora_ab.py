"""What LoRA dropout and the trainer's fused LoRA forward cost or save per training step: `python bench/lora_ab.py`.

Times full training steps (forward with the trainer's loss, backward, clipping, AdamW) of one typical
micro-batch of the trainer's own samples (bench/profile_step.py's set-up) in four configurations (two adapters of
the same base model, each run through peft's forward and the fused one), in interleaved rounds so that a slower
spell of a shared host falls on all of them alike:

- `dropout 0.05, peft` and `dropout 0.05, fused`: LoRA dropout as before, peft's own layers, then with B's
  product added into the base output (trainer/fusedlora.py);
- `dropout 0, peft` and `dropout 0, fused`: no dropout, peft's own layers, then fused, where q/k/v (and
  gate/up) also share one LoRA-A product.

It first checks that the fused layers give peft's loss and gradients, then prints each
configuration's median step time with its spread and the ratios, median (min-max) of the rounds; then times
one decoder block alone without LoRA, with peft's and with the fused layers (`--block-rounds`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.profile_step import profile_batch  # noqa: E402


def one_block(model, batch, rounds: int, repeats: int = 20) -> None:
    """Forward and backward of the first decoder block alone on the batch's shape (a Llama-shaped model): without
    LoRA (peft's adapters disabled), with peft's LoRA layers, with the fused ones. Far less noise than whole steps,
    and it shows how much of a block LoRA costs at all, the most that fusing its layers could take back."""
    import torch

    from trainer.fusedlora import fuse_lora_layers

    base = model.get_base_model()
    if not hasattr(base, "model") or not hasattr(base.model, "rotary_emb"):
        print("(the one-block timing needs a Llama-shaped model)")
        return
    block = base.model.layers[0]
    torch.manual_seed(0)
    x = torch.randn(*batch["input_ids"].shape, base.config.hidden_size, requires_grad=True)
    position_embeddings = base.model.rotary_emb(x, torch.arange(x.shape[1]).unsqueeze(0))

    def timed() -> float:
        def once():
            out = block(x, position_embeddings=position_embeddings)
            (out[0] if isinstance(out, tuple) else out).sum().backward()

        for _ in range(3):
            once()
        started = time.perf_counter()
        for _ in range(repeats):
            once()
        return (time.perf_counter() - started) / repeats

    times = {"no LoRA": [], "peft": [], "fused": []}
    for _ in range(rounds):
        with model.disable_adapter():
            times["no LoRA"].append(timed())
        times["peft"].append(timed())
        fused = fuse_lora_layers(model)
        times["fused"].append(timed())
        fused.undo()
    print(f"\nOne decoder block, forward + backward, {tuple(x.shape)}, {rounds} rounds of {repeats}:")
    for name, values in times.items():
        print(f"  {name:<8} median {1e3 * statistics.median(values):.1f} ms (min {1e3 * min(values):.1f}, "
              f"max {1e3 * max(values):.1f})")
    lora_cost = [p / n for p, n in zip(times["peft"], times["no LoRA"])]
    gain = [p / f for p, f in zip(times["peft"], times["fused"])]
    print(f"  peft's LoRA costs the block {statistics.median(lora_cost):.3f}x its time without LoRA "
          f"(min {min(lora_cost):.3f}, max {max(lora_cost):.3f}); fused over peft "
          f"{statistics.median(gain):.3f}x (min {min(gain):.3f}, max {max(gain):.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model name under models/ (default: the default model)")
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--no-packing", action="store_true")
    parser.add_argument("--dataset", choices=["raw", "alpaca"], default="raw")
    parser.add_argument("--target-modules", default="q-k-v-o", help="q-v, q-k-v-o or all-linear")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="the dropout of the first configuration")
    parser.add_argument("--block-rounds", type=int, default=5,
                        help="rounds of timing one decoder block alone (0: none), after the steps")
    args = parser.parse_args(argv)

    import torch

    from trainer.batching import trained_targets
    from trainer.fusedlora import fuse_lora_layers
    from trainer.lora import build_optimizer, build_peft_model
    from trainer.loss import causal_lm_loss_sum
    from trainer.models import load_model

    params, batch = profile_batch(args, target_modules=args.target_modules)
    targets = max(trained_targets(batch["labels"]), 1)

    def adapter(dropout: float):
        torch.manual_seed(0)
        chosen = type(params).from_dict({**params.to_dict(), "lora_dropout": dropout})
        model = build_peft_model(chosen, load_model(chosen.base_model, "full", "cpu"), None)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, trainable, build_optimizer("adamw_torch", trainable, 3e-4, 0.0)

    with_dropout = adapter(args.lora_dropout)
    without = adapter(0.0)

    # The fused forward is the same computation: loss and gradients of one backward pass, both ways, with B
    # made non-zero first (at initialisation B = 0 and every LoRA-A gradient would be 0 either way).
    model, trainable, _ = without
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
    peft_loss = causal_lm_loss_sum(model, batch) / targets
    peft_loss.backward()
    peft_grads = [p.grad.clone() for p in trainable]
    model.zero_grad(set_to_none=True)
    fused = fuse_lora_layers(model)
    fused_loss = causal_lm_loss_sum(model, batch) / targets
    fused_loss.backward()
    shared_calls = sum(g.shared_calls for g in fused.groups)
    grad_diff = max(float((p.grad - g).abs().max()) for p, g in zip(trainable, peft_grads))
    grad_scale = max(float(g.abs().max()) for g in peft_grads)
    model.zero_grad(set_to_none=True)
    print(fused.describe())
    fused.undo()
    print(f"{shared_calls} LoRA-A calls served by a shared product; loss {peft_loss.item():.6f} peft, "
          f"{fused_loss.item():.6f} fused; largest gradient difference {grad_diff:.2e} (largest gradient "
          f"{grad_scale:.2e})")

    def timed_steps(setup, fuse: bool) -> float:
        model, trainable, optimizer = setup
        fused = fuse_lora_layers(model) if fuse else None
        try:
            def step():
                (causal_lm_loss_sum(model, batch) / targets).backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            step()  # warm-up: allocator and kernels
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            return (time.perf_counter() - started) / args.steps
        finally:
            if fused is not None:
                fused.undo()

    dropout = f"dropout {args.lora_dropout:g}"
    configs = {f"{dropout}, peft": (with_dropout, False), f"{dropout}, fused": (with_dropout, True),
               "dropout 0, peft": (without, False), "dropout 0, fused": (without, True)}
    times = {name: [] for name in configs}
    for round_index in range(args.rounds):
        for name, (setup, fuse) in configs.items():
            times[name].append(timed_steps(setup, fuse))
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), flush=True)

    if args.block_rounds:
        one_block(without[0], batch, args.block_rounds)
    n_rows, n_positions = batch["input_ids"].shape
    print(f"\nModel {params.base_model}, targets {args.target_modules}; micro-batch {n_rows} x {n_positions}, "
          f"{batch['real_tokens']} real tokens; {args.rounds} rounds of {args.steps} steps")
    for name, values in times.items():
        print(f"  {name:<22} median {statistics.median(values):.3f} s/step  (min {min(values):.3f}, "
              f"max {max(values):.3f})  {batch['real_tokens'] / statistics.median(values):.0f} useful tok/s")
    names = list(configs)
    for slow, fast in ((names[0], names[1]), (names[2], names[3]), (names[0], names[2]), (names[0], names[3])):
        ratios = [a / b for a, b in zip(times[slow], times[fast])]
        print(f"  speed-up {fast} over {slow}: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
