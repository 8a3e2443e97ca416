"""This process's place in a torchrun / accelerate launch: its rank, its log lines, the collectives the loop
uses, whether a failure is its own or a peer's, and FSDP sharding.

One process when WORLD_SIZE is unset: every collective is then a no-op, so the loop reads the same either way.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from pathlib import Path


def log(message: str) -> None:
    """A timestamped line on stdout (the run's train.log), prefixed with the rank when not rank 0."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    print(f"[{time.strftime('%H:%M:%S')}] {prefix}{message}", flush=True)


# Warnings from libraries that tell a person training a LoRA nothing to act on: filtered, each with its reason.
KNOWN_NOISE = [
    # peft 0.21 asks the model for `is_gradient_checkpointing`, which transformers 5 renamed; nothing changes.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
]


def quiet_log() -> None:
    """Make this process's log (train.log) readable: no progress bars (transformers and huggingface_hub draw
    them with carriage returns, which a log file turns into one long line per bar; the trainer logs its own
    line per stage instead: loading the data, the model, each step), the known harmless warnings filtered,
    and any other warning as one log line naming the package it came from (once per place, Python's
    default). Call it before transformers is imported: it reads HF_HUB_DISABLE_PROGRESS_BARS then."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:  # imported already (with transformers): switch their bars off directly
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    for category, pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    warnings.showwarning = _warning_as_log_line


def _warning_as_log_line(message, category, filename, lineno, file=None, line=None) -> None:
    parts = Path(filename).parts
    package = parts[parts.index("site-packages") + 1] if "site-packages" in parts else Path(filename).stem
    log(f"Warning from {package} ({category.__name__}): {str(message).splitlines()[0][:300]}")


class Distributed:
    """This process's rank and world. Rank 0 alone writes status.json, metrics.jsonl, checkpoints and the adapter."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
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

    def cpu_threads(self) -> int:
        """This process's share of the physical cores it may use: hyper-threads share a core's matrix units,
        so they add no speed, and the processes of one machine split its cores between them."""
        return max(1, physical_cores() // self.processes_here)

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


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (sched_getaffinity)."""
    import psutil

    allowed = len(os.sched_getaffinity(0))
    logical, physical = psutil.cpu_count(logical=True), psutil.cpu_count(logical=False)
    if not logical or not physical:
        return allowed
    # psutil counts the whole machine; an affinity mask (taskset, a container's cpuset) keeps a share of it,
    # with the machine's ratio of hyper-threads per core.
    return max(1, round(allowed * physical / logical))


def lost_a_peer(exc: BaseException) -> bool:
    """Whether `exc` is this process noticing that another one ended (a collective failed), rather than a
    failure of its own: a torch DistError, or an error raised inside torch.distributed itself (gloo's
    RuntimeError "Connection closed by peer" comes out of all_reduce's `work.wait()`)."""
    dist = sys.modules.get("torch.distributed")  # not imported yet: no collective has run
    if dist is None:
        return False
    if isinstance(exc, dist.DistError):
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"{os.sep}torch{os.sep}distributed{os.sep}" in frames[-1].filename


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
