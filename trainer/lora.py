"""The model being trained: the base model with its LoRA adapter (peft), wrapped for DDP or FSDP when several
processes train, with its optimiser and learning-rate schedule; and the eval loss measured during training."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import full_states, load_checkpoint_state, save_checkpoint
from .distributed import log, shard_with_fsdp
from .errors import DashboardError
from .fusedlora import FusedLora, fuse_lora_layers
from .loss import causal_lm_loss_sum, plain_output_head
from .variants import (
    adapter_to_resume, changes_base_weights, initial_adapter_of, lora_config_options, loraplus_optimizer,
    save_adapter, save_initial_adapter, start_neftune, stop_neftune,
)


def build_optimizer(name: str, parameters, lr: float, weight_decay: float, loraplus_lr_ratio: float = 0.0,
                    peft_model=None):
    """The optimiser `name` over `parameters`; with `loraplus_lr_ratio` > 0, LoRA+ groups over `peft_model`'s
    trainable parameters (trainer/variants.py)."""
    import torch

    options = {}
    if name == "adamw_torch":
        cls = torch.optim.AdamW
    elif name == "sgd":
        cls = torch.optim.SGD
    elif name == "adafactor":
        from transformers.optimization import Adafactor

        cls, options = Adafactor, {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    else:
        import bitsandbytes as bnb

        cls = {"adamw_bnb_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    if loraplus_lr_ratio > 0:
        return loraplus_optimizer(peft_model, cls, lr, loraplus_lr_ratio, weight_decay, **options)
    return cls(parameters, lr=lr, weight_decay=weight_decay, **options)


def build_peft_model(params, model, resume_from: Path | None):
    """A new LoRA adapter on `model` as the parameters ask, or the adapter of checkpoint `resume_from`."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if params.precision != "full":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
    elif params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if resume_from is not None:
        return PeftModel.from_pretrained(model, adapter_to_resume(resume_from), is_trainable=True)
    from .targets import target_modules_for  # the choice in this architecture's names, checked against it

    targets = target_modules_for(model, params.target_modules, params.custom_target_modules)
    config = LoraConfig(r=params.lora_rank, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM", **lora_config_options(params))
    return get_peft_model(model, config)


def evaluate(model, samples, micro_batch_size: int, pad_token_id: int, device, head="auto") -> float:
    """The mean loss per trained token over `samples` (the eval dataset), shortest first."""
    import torch

    from .batching import collate, trained_targets

    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(samples)), key=lambda i: samples[i].n_tokens)
    with torch.no_grad():
        for i in range(0, len(order), micro_batch_size):
            batch = collate([[samples[j]] for j in order[i:i + micro_batch_size]], pad_token_id, device)
            total += float(causal_lm_loss_sum(model, batch, head))
            count += trained_targets(batch["labels"])
    model.train()
    return total / max(count, 1)


@dataclass
class Trainee:
    """The adapter model in training. `model` is what runs forward and backward (the DDP wrapper under DDP);
    `peft_model` is what is saved and evaluated."""

    model: object
    peft_model: object
    trainable: list
    sharded: bool  # FSDP: parameters, gradients and optimiser state are split over the processes
    distributed: bool
    optimizer: object
    scheduler: object
    output_head: object  # None: the loss goes through the model's full logits (trainer/loss.py)
    neftune_hook: object = None  # NEFTune's forward hook on the input embeddings, while training
    fused_lora: FusedLora = field(default_factory=FusedLora)  # which LoRA layers run the fused forward

    @classmethod
    def build(cls, params, device: str, checkpoint: Path | None, dist_info, total_steps: int,
              run_dir: Path | None = None) -> Trainee:
        """The adapter model, wrapped for several processes, with its optimiser and schedule. A PiSSA/OLoRA run
        keeps its adapter before training in `run_dir` (trainer/variants.py), which a resume needs."""
        import torch
        from transformers import get_scheduler

        from .batching import warmup_steps_for
        from .models import load_model

        model = load_model(params.base_model, params.precision, device, params.trust_remote_code,
                           params.bnb_4bit_quant_type, params.bnb_4bit_use_double_quant, progress=log)
        model = peft_model = build_peft_model(params, model, checkpoint)
        if changes_base_weights(peft_model) and run_dir is not None:
            if checkpoint is None and dist_info.is_main:
                save_initial_adapter(peft_model, run_dir)
            elif checkpoint is not None:
                initial_adapter_of(run_dir)  # refused before any step when it is missing
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        log(f"Trainable parameters: {sum(p.numel() for p in trainable):,} of "
             f"{sum(p.numel() for p in model.parameters()):,}.")
        # FSDP when asked for (the parameter, or `accelerate launch` with an FSDP config); else DDP.
        sharded = dist_info.enabled and (params.distributed_strategy == "fsdp"
                                         or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true")
        if sharded:
            if changes_base_weights(peft_model):
                raise DashboardError("PiSSA and OLoRA initialisation cannot be used with FSDP: converting the "
                                     "adapter for the original base model needs it whole on one process. Use "
                                     "DDP or the default initialisation.", field="lora_init")
            model = peft_model = shard_with_fsdp(peft_model)
            trainable = [p for p in model.parameters() if p.requires_grad]
        # Plain LoRA layers computed in fewer passes (trainer/fusedlora.py); FSDP's sharded weights keep peft's.
        fused_lora = FusedLora() if sharded else fuse_lora_layers(peft_model)
        log(fused_lora.describe())
        if dist_info.enabled and not sharded:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dist_info.local_rank] if device.startswith("cuda") else None)
        optimizer = build_optimizer(params.optimizer, trainable, params.learning_rate, params.weight_decay,
                                    params.loraplus_lr_ratio, peft_model)
        scheduler = get_scheduler(params.lr_scheduler_type, optimizer,
                                  num_warmup_steps=warmup_steps_for(params, total_steps),
                                  num_training_steps=total_steps)
        return cls(model, peft_model, trainable, sharded, dist_info.enabled, optimizer, scheduler,
                   plain_output_head(model), start_neftune(peft_model, params.neftune_noise_alpha), fused_lora)

    def gradient_sync(self, last: bool):
        """A context for one micro-batch's backward pass: gradients are averaged over the processes only
        after the step's last micro-batch."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last or not self.distributed else self.model.no_sync()

    def loss_sum(self, batch):
        return causal_lm_loss_sum(self.model, batch, self.output_head)

    def optimizer_step(self, max_grad_norm: float) -> tuple[float, float]:
        """Clip the gradients, step the optimiser and the schedule; returns (learning rate used, grad norm)."""
        import torch

        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return learning_rate, float(grad_norm)

    def full_states(self) -> tuple[dict | None, dict]:
        """(adapter state, optimiser state) to save: a collective under FSDP, so every process calls it."""
        return full_states(self.model, self.optimizer, self.sharded)

    def save_checkpoint(self, run_dir: Path, step: int, states: tuple[dict | None, dict], loop_state: dict) -> Path:
        adapter_state, optimizer_state = states
        return save_checkpoint(run_dir, step, self.peft_model, optimizer_state, self.scheduler, loop_state,
                               adapter_state)

    def load_checkpoint(self, checkpoint: Path) -> dict:
        """The optimiser, schedule and RNGs of `checkpoint` (its adapter came with build); its loop state."""
        return load_checkpoint_state(checkpoint, self.model, self.optimizer, self.scheduler, self.sharded)

    def save_adapter(self, run_dir: Path, adapter_state: dict | None) -> None:
        """The final adapter (training is over: NEFTune's hook goes first, as transformers' Trainer does, and the
        layers go back to peft's own forward: the model handed on computes exactly what a reload computes)."""
        stop_neftune(self.peft_model, self.neftune_hook)
        self.neftune_hook = None
        self.fused_lora.undo()
        save_adapter(self.peft_model, run_dir, run_dir, adapter_state)
