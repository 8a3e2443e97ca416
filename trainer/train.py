"""`python -m trainer train --run-dir DIR`: one readable LoRA training loop.

Reads DIR/training_parameters.json, trains on exactly the samples `preview` shows, and writes
status.json, metrics.jsonl, checkpoint-STEP/ folders and the final PEFT adapter (DESIGN.md).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from .errors import DashboardError
from .loss import causal_lm_loss_sum, plain_output_head
from .runfiles import (
    METRICS_FILE, PARAMS_FILE, STOP_FILE, MetricsWriter, now_iso, process_start_time, read_status,
    truncate_metrics_after, update_status, write_json_atomic,
)

CHECKPOINT_PREFIX = "checkpoint-"


def loss_problem(loss: float, step: int) -> str | None:
    """A sentence explaining a loss that means the run broke (NaN, infinite or exactly 0.0), else None."""
    if loss == 0.0:
        return (f"The loss is exactly 0.0 at step {step}: something is broken (labels all masked, a data problem, "
                f"or a numerical failure), not a perfect model. Check 'train only after' and the data preview.")
    if math.isfinite(loss):
        return None
    if step == 1:
        return (f"The loss is {loss} at the first step: the base model or the data produce invalid numbers (a broken "
                f"model file, or half precision overflowing). Try the model in full precision, or another model.")
    return (f"The loss became {loss} at step {step}: training diverged. Lower the learning rate, keep gradient "
            f"clipping on (max grad norm 1.0), or use full precision instead of 8/4-bit.")


class StopRequested:
    """Set by SIGTERM/SIGINT or by a stop file; the loop checks it after each step."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.flag = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_):
        self.flag = True

    def __bool__(self) -> bool:
        return self.flag or (self.run_dir / STOP_FILE).exists()


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in Path(run_dir).glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def find_checkpoint(run_dir: Path, which: str) -> Path:
    checkpoints = list_checkpoints(run_dir)
    if which in ("", "latest"):
        if not checkpoints:
            raise DashboardError(f"{Path(run_dir).name} has no checkpoint to resume from.")
        return checkpoints[-1]
    for candidate in checkpoints:
        if candidate.name == which or str(candidate) == which:
            return candidate
    raise DashboardError(f"No checkpoint {which!r} in {Path(run_dir).name}; it has "
                         f"{', '.join(c.name for c in checkpoints) or 'none'}.")


def build_optimizer(name: str, parameters, lr: float, weight_decay: float):
    import torch

    if name == "adamw_torch":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(parameters, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    import bitsandbytes as bnb

    cls = {"adamw_bnb_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(parameters, lr=lr, weight_decay=weight_decay)


def build_peft_model(params, model, resume_from: Path | None):
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if params.precision != "full":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
    elif params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if resume_from is not None:
        return PeftModel.from_pretrained(model, resume_from, is_trainable=True)
    targets = params.lora_target_modules()
    if isinstance(targets, list):
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            raise DashboardError(
                f"The model has no module named {', '.join(missing)}. Its linear layers include: "
                f"{', '.join(sorted(linear_module_names(model)))}.", field="custom_target_modules")
    config = LoraConfig(r=params.lora_rank, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def linear_module_names(model) -> set[str]:
    import torch

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name}


def evaluate(model, samples, micro_batch_size: int, pad_token_id: int, device, head="auto") -> float:
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


def save_checkpoint(run_dir: Path, step: int, model, optimizer_state: dict, scheduler, state: dict,
                    adapter_state: dict | None = None) -> Path:
    """Adapter, optimiser, scheduler, RNG and loop state, written to a temp folder then renamed into place."""
    import torch

    final = run_dir / f"{CHECKPOINT_PREFIX}{step}"
    staging = run_dir / f".{final.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    model.save_pretrained(staging, state_dict=adapter_state)
    torch.save(optimizer_state, staging / "optimizer.pt")
    torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, staging / "rng_state.pt")
    write_json_atomic(staging / "trainer_state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def _load_tensors(path: Path):
    """torch.load with weights_only=True, and a sentence (not PyTorch's advice to turn it off) on refusal."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise DashboardError(
            f"{path.parent.name}/{path.name} holds Python objects, not plain tensors (loading it could run code), so "
            f"it was not loaded. Resume from another checkpoint or start anew.") from None


def load_checkpoint_state(checkpoint: Path, model, optimizer, scheduler, sharded: bool = False) -> dict:
    import torch

    # weights_only=True: a checkpoint is data, never code.
    optimizer_state = _load_tensors(checkpoint / "optimizer.pt")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(_load_tensors(checkpoint / "scheduler.pt"))
    rng = _load_tensors(checkpoint / "rng_state.pt")
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((checkpoint / "trainer_state.json").read_text())


def shard_with_fsdp(peft_model):
    """FSDP2: every decoder layer, then the whole model, sharded over the processes (for models that do not
    fit one GPU). Frozen and LoRA parameters are sharded alike; only LoRA ones get gradients."""
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(peft_model.get_base_model(), "_no_split_modules", None) or [])
    for module in peft_model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(peft_model)
    return peft_model


def full_states(model, optimizer, sharded: bool) -> tuple[dict | None, dict]:
    """(adapter state, optimiser state) as full tensors: a collective under FSDP, so every process calls it."""
    if not sharded:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    return ({k: v for k, v in weights.items() if "lora_" in k},
            get_optimizer_state_dict(model, optimizer, options=options))


def physical_cores() -> int:
    """Physical cores this process may use: hyper-threads share a core's matrix units, so they add no speed."""
    allowed = os.sched_getaffinity(0)
    cores, cpu, physical = set(), None, "0"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                physical = value
            elif key == "core id" and cpu in allowed:
                cores.add((physical, value))
    except OSError:
        pass
    return len(cores) or len(allowed)


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's malloc keep the memory a CPU training step frees, for the next step to reuse.

    Each step allocates its activations afresh (gigabytes) and frees them in the backward pass. By default
    glibc gives large blocks back to the kernel at once, so every step faults its memory in again page by
    page (measured: a fresh 6 MB tensor product took 1.2 ms against 0.23 ms in reused memory, and a step
    spent a third of its CPU time in the kernel). Blocks up to 32 MB (the largest glibc allows) now come
    from the heap, and the heap is not trimmed. Peak memory is unchanged: the step needs it anyway.
    Returns False where the C library is not glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


class Distributed:
    """This process's place in a torchrun / accelerate launch (one process when WORLD_SIZE is unset).

    Rank 0 alone writes status.json, metrics.jsonl, checkpoints and the adapter. Collectives below are
    no-ops in a single process, so the loop reads the same either way.
    """

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        self.enabled = self.world > 1

    def start(self) -> str:
        """Join the process group; returns the device of this process."""
        import torch
        import torch.distributed as dist

        device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        if self.enabled and not dist.is_initialized():
            if device.startswith("cuda"):
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        return device

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item())

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _log(message: str) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    print(f"[{time.strftime('%H:%M:%S')}] {prefix}{message}", flush=True)


def train(run_dir: Path, resume: str | None = None) -> int:
    """Train the run in `run_dir`; returns the process exit code (0 completed or stopped, 1 failed)."""
    run_dir = Path(run_dir).resolve()
    dist_info = Distributed()
    try:
        if dist_info.is_main:
            _take_over_status(run_dir)
        train_run(run_dir, resume, dist_info)
        return 0
    except BaseException as exc:  # the run folder must say what went wrong, whatever it was
        message = _error_sentence(exc)
        traceback.print_exc()
        _log(f"FAILED: {message}")
        _record_failure(run_dir, dist_info, message)
        return 1
    finally:
        dist_info.close()


def _record_failure(run_dir: Path, dist_info: Distributed, message: str) -> None:
    """Write the failure, unless another rank already reported the failure that brought this one down."""
    status = read_status(run_dir) or {}
    if dist_info.enabled:
        if status.get("state") == "failed" and status.get("failed_rank") not in (None, dist_info.rank):
            return
        message = f"Rank {dist_info.rank} of {dist_info.world} failed: {message}"
    update_status(run_dir, state="failed", error=message, finished_at=now_iso(),
                  failed_rank=dist_info.rank if dist_info.enabled else None)


def _take_over_status(run_dir: Path) -> None:
    """Mark the run as ours. The launcher holds the lock while it writes `queued`; wait for it."""
    lock_path = run_dir.parent / ".locks" / f"{run_dir.name}.lock"
    lock_path.parent.mkdir(exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = read_status(run_dir) or {}
        update_status(run_dir, state="running", pid=os.getpid(), pid_start_time=process_start_time(os.getpid()),
                      started_at=previous.get("started_at") or now_iso(), finished_at=None, error=None,
                      failed_rank=None, message="loading the model and data")


def _error_sentence(exc: BaseException) -> str:
    if isinstance(exc, DashboardError):
        return exc.message
    text = str(exc) or type(exc).__name__
    if "out of memory" in text.lower() or isinstance(exc, MemoryError):
        return ("Out of memory. Lower the micro batch size or the cutoff length, or turn on gradient checkpointing "
                f"or a 4-bit base model. ({type(exc).__name__}: {text[:300]})")
    return f"{type(exc).__name__}: {text[:500]}"


def train_run(run_dir: Path, resume: str | None = None, dist_info: Distributed | None = None):
    """The training loop. Returns the trained PEFT model (tests compare it with the saved adapter)."""
    import contextlib

    import torch
    from transformers import get_scheduler

    from . import batching
    from .data import no_samples_error, unmatched_rows_error
    from .samplecache import cached_build_samples
    from .models import bitsandbytes_problem, load_model, load_tokenizer
    from .params import TrainingParameters

    dist_info = dist_info or Distributed()
    main = dist_info.is_main
    stop = StopRequested(run_dir)
    params = TrainingParameters.from_file(run_dir / PARAMS_FILE).validate(require_name=False)
    world = dist_info.world
    if params.batch_size % (params.micro_batch_size * world):
        raise DashboardError(f"Batch size ({params.batch_size}) must be a multiple of micro batch size x processes "
                             f"({params.micro_batch_size} x {world}): it is the global batch.", field="batch_size")
    if bnb_message := bitsandbytes_problem(params.precision, params.optimizer):
        raise DashboardError(bnb_message, field="precision")
    device = dist_info.start()
    if device == "cpu":
        torch.set_num_threads(max(1, physical_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        keep_freed_memory_for_reuse()
    torch.manual_seed(params.seed)
    random.seed(params.seed)

    # ---- data: the same function as `preview`, built once per content (trainer/samplecache.py) -------
    tokenizer = load_tokenizer(params.base_model, params.trust_remote_code, progress=_log)
    prepared = time.perf_counter()
    preview, from_cache = cached_build_samples(params, tokenizer)
    _log(f"Samples: {len(preview.samples)} {'read from the cache' if from_cache else 'prepared'} in "
         f"{time.perf_counter() - prepared:.1f} s.")
    if not params.skip_unmatched_rows and (problem := unmatched_rows_error(preview)):
        raise problem
    if problem := no_samples_error(preview):
        raise problem
    samples = preview.samples
    eval_samples = cached_build_samples(params, tokenizer, params.eval_dataset)[0].samples if params.eval_dataset else []
    units = batching.training_units([s.n_tokens for s in samples], params)
    lengths = [sum(samples[i].n_tokens for i in unit) for unit in units]
    # Every process runs `accumulation` micro-batches per step; together they make the global batch.
    accumulation = params.batch_size // (params.micro_batch_size * world)
    per_epoch = batching.steps_per_epoch(len(units), params.micro_batch_size, accumulation * world)
    total = params.max_steps or max(1, math.ceil(params.epochs * per_epoch))
    packed = f", packed into {len(units)} rows" if params.packing else ""
    _log(f"{len(samples)} samples{packed}, {preview.stats['tokens']} tokens; {per_epoch} steps per epoch, {total} "
         f"steps (micro batch {params.micro_batch_size} x accumulation {accumulation} x processes {world}).")

    # ---- model, adapter, optimiser, schedule ------------------------------------------------
    checkpoint = find_checkpoint(run_dir, resume) if resume is not None else None
    model = load_model(params.base_model, params.precision, device, params.trust_remote_code,
                       params.bnb_4bit_quant_type, params.bnb_4bit_use_double_quant, progress=_log)
    model = build_peft_model(params, model, checkpoint)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    _log(f"Trainable parameters: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,}.")
    peft_model = model  # what is saved; `model` may become its DistributedDataParallel wrapper
    # FSDP when asked for (the parameter, or `accelerate launch` with an FSDP config); else DDP.
    sharded = dist_info.enabled and (params.distributed_strategy == "fsdp"
                                     or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true")
    if sharded:
        model = peft_model = shard_with_fsdp(peft_model)
        trainable = [p for p in model.parameters() if p.requires_grad]
    elif dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.local_rank] if device.startswith("cuda") else None)
    optimizer = build_optimizer(params.optimizer, trainable, params.learning_rate, params.weight_decay)
    scheduler = get_scheduler(params.lr_scheduler_type, optimizer, num_warmup_steps=params.warmup_steps,
                              num_training_steps=total)
    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint, model, optimizer, scheduler, sharded)
        if main:
            truncate_metrics_after(run_dir, state["step"])
        _log(f"Resumed from {checkpoint.name} at step {state['step']}.")
    dist_info.barrier()  # every rank has read the stop file's absence and the checkpoint before rank 0 changes them
    if main:
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        update_status(run_dir, step=state["step"], total_steps=total, message=None, world_size=world,
                      resumed_from=checkpoint.name if checkpoint else None)
    dist_info.barrier()

    metrics = MetricsWriter(run_dir / METRICS_FILE) if main else None
    pad_id = tokenizer.pad_token_id
    output_head = plain_output_head(model)  # None: the loss goes through the model's full logits (trainer/loss.py)
    schedule_epoch, schedule = -1, []
    step, tokens = state["step"], state["tokens"]
    started = time.perf_counter() - state["elapsed_s"]
    window_start, window_tokens, recent_step_times = time.perf_counter(), 0, []
    end_state, reason = "completed", "reached the last step"
    # Time the loop spends writing metrics, status and checkpoints (reported at the end: it must stay small).
    bookkeeping_s = {"metrics and status": 0.0, "checkpoints": 0.0}
    loop_started = time.perf_counter()

    # ---- the loop ------------------------------------------------------------------------------
    while step < total:
        step_started = time.perf_counter()
        epoch_index, position = divmod(step, per_epoch)
        if epoch_index != schedule_epoch:
            schedule = batching.epoch_schedule(lengths, params.micro_batch_size, accumulation * world, params.seed,
                                               epoch_index, params.group_by_length)
            schedule_epoch = epoch_index
        _injected_fault(dist_info.rank, step)
        step_batches = schedule[position]
        # This process's share of the step; a process left without one (the epoch's last, short step) runs
        # a batch with zero weight so that every process takes part in the gradient averaging.
        mine = step_batches[dist_info.rank::world]
        weights = [1.0] * len(mine) or [0.0]
        mine = mine or step_batches[:1]
        micro_batches = [batching.collate([[samples[i] for i in units[u]] for u in unit_indices], pad_id, device)
                         for unit_indices in mine]
        # The step's loss is the mean over every trained token of the whole global batch. DDP averages
        # gradients over processes, so each process scales its sum by the world size.
        targets = dist_info.sum(sum(batching.trained_targets(b["labels"]) * w for b, w in zip(micro_batches, weights)))
        loss_local = 0.0
        for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
            last = i == len(micro_batches) - 1
            if sharded:
                model.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            else:
                sync = contextlib.nullcontext() if last or not dist_info.enabled else model.no_sync()
            with sync:
                loss = causal_lm_loss_sum(model, batch, output_head) * (weight * world / max(targets, 1))
                loss.backward()
            loss_local += float(loss.detach()) / world
            tokens_here = batch["real_tokens"] if weight else 0
            window_tokens += tokens_here
        loss_total = dist_info.sum(loss_local)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        recent_step_times = (recent_step_times + [time.perf_counter() - step_started])[-20:]
        stopping = dist_info.any(bool(stop))  # every process stops after the same step

        if problem := loss_problem(loss_total, step):
            if main:
                _write_train_line(metrics, step, total, per_epoch, loss_total, learning_rate, grad_norm,
                                  tokens + dist_info.sum(window_tokens), 0.0, time.perf_counter() - started, 0.0)
                update_status(run_dir, step=step)
            raise DashboardError(problem)

        if step % params.logging_steps == 0 or step == total or stopping:
            now = time.perf_counter()
            window_all = int(dist_info.sum(window_tokens))
            tokens += window_all
            speed = window_all / max(now - window_start, 1e-9)
            eta = (total - step) * sum(recent_step_times) / len(recent_step_times)
            if main:
                _write_train_line(metrics, step, total, per_epoch, loss_total, learning_rate, grad_norm, tokens,
                                  speed, now - started, eta)
                update_status(run_dir, step=step, total_steps=total, epoch=step / per_epoch)
                _log(f"step {step}/{total} loss {loss_total:.4f} lr {learning_rate:.3g} {speed:.0f} tok/s "
                     f"eta {eta:.0f}s")
                bookkeeping_s["metrics and status"] += time.perf_counter() - now
            window_start, window_tokens = now, 0

        if eval_samples and (step % params.eval_steps == 0 or step == total):
            # Rank 0 evaluates alone, except under FSDP where every forward pass needs every process.
            if main or sharded:
                eval_loss = evaluate(peft_model, eval_samples, params.micro_batch_size, pad_id, device)
            if main:
                metrics.write({"step": step, "total_steps": total, "epoch": step / per_epoch,
                               "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 700))})
                _log(f"step {step}: eval loss {eval_loss:.4f}")
            dist_info.barrier()

        if params.stop_at_loss and loss_total < params.stop_at_loss:
            reason = f"the loss {loss_total:.4f} fell below stop-at-loss {params.stop_at_loss}"
            break
        if stopping:
            end_state, reason = "stopped", "a stop was requested"
            break
        if params.save_steps and step % params.save_steps == 0 and step < total:
            saving_started = time.perf_counter()
            tokens_to_save = tokens + int(dist_info.sum(window_tokens))
            adapter_state, optimizer_state = full_states(model, optimizer, sharded)
            if main:
                save_checkpoint(run_dir, step, peft_model, optimizer_state, scheduler,
                                {"step": step, "tokens": tokens_to_save, "elapsed_s": time.perf_counter() - started,
                                 "total_steps": total}, adapter_state)
                _log(f"saved checkpoint-{step}")
            bookkeeping_s["checkpoints"] += time.perf_counter() - saving_started
            tokens, window_tokens = tokens_to_save, 0
            window_start = time.perf_counter()
            dist_info.barrier()

    loop_s = time.perf_counter() - loop_started
    _log("Bookkeeping in the loop: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in bookkeeping_s.items())
         + f", of {loop_s:.1f} s ({100 * sum(bookkeeping_s.values()) / max(loop_s, 1e-9):.1f}%).")
    # ---- the end: adapter (and a checkpoint to resume from, when stopped early) -------------------
    tokens += int(dist_info.sum(window_tokens))
    adapter_state, optimizer_state = full_states(model, optimizer, sharded)
    if main:
        if end_state == "stopped" and step < total:
            save_checkpoint(run_dir, step, peft_model, optimizer_state, scheduler,
                            {"step": step, "tokens": tokens, "elapsed_s": time.perf_counter() - started,
                             "total_steps": total}, adapter_state)
        peft_model.save_pretrained(run_dir, state_dict=adapter_state)
        metrics.close()
        _log(f"Run {end_state} at step {step}/{total}: {reason}. Adapter saved in {run_dir}.")
        update_status(run_dir, state=end_state, step=step, total_steps=total, finished_at=now_iso(), reason=reason,
                      error=None)
        (run_dir / STOP_FILE).unlink(missing_ok=True)
    dist_info.barrier()
    return peft_model


def _injected_fault(rank: int, step: int) -> None:
    """Fault injection for the reliability tests: LORA_DASHBOARD_FAULT="RANK:STEP:message" raises there."""
    fault = os.environ.get("LORA_DASHBOARD_FAULT")
    if fault:
        fault_rank, fault_step, message = fault.split(":", 2)
        if int(fault_rank) == rank and int(fault_step) == step:
            raise RuntimeError(message)


def _write_train_line(metrics, step, total, per_epoch, loss, learning_rate, grad_norm, tokens, speed, elapsed, eta):
    metrics.write({
        "step": step, "total_steps": total, "epoch": step / per_epoch, "loss": loss,
        "learning_rate": learning_rate, "grad_norm": float(grad_norm), "tokens": tokens,
        "tokens_per_second": speed, "elapsed_s": elapsed, "eta_s": eta, "time": now_iso(),
    })
