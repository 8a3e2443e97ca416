"""A run's checkpoint-STEP/ folders (FORMATS.md): list, find, save, load.

A checkpoint holds everything an exact resume needs: the adapter, the optimiser and scheduler states, the
random number generators and the loop's own counters (trainer_state.json). It is written into a hidden
temp folder and renamed into place, so a listed checkpoint is always complete.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from .errors import DashboardError
from .storage import read_json, write_json_atomic

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest step first."""
    found = [p for p in Path(run_dir).glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """The checkpoint named `which` (a folder name or path), or the latest for "" / "latest"."""
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


def loop_state(step: int, tokens: int, elapsed_s: float, total_steps: int) -> dict:
    """trainer_state.json: the loop's counters at a checkpoint (a fresh run starts from step 0)."""
    return {"step": step, "tokens": tokens, "elapsed_s": elapsed_s, "total_steps": total_steps}


def full_states(model, optimizer, sharded: bool) -> tuple[dict | None, dict]:
    """(adapter state, optimiser state) as full tensors: a collective under FSDP, so every process calls it.
    The adapter state is None when not sharded: save_pretrained then reads the model itself."""
    if not sharded:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    return ({k: v for k, v in weights.items() if "lora_" in k},
            get_optimizer_state_dict(model, optimizer, options=options))


def save_checkpoint(run_dir: Path, step: int, model, optimizer_state: dict, scheduler, state: dict,
                    adapter_state: dict | None = None) -> Path:
    """Adapter, optimiser, scheduler, RNG and loop state, written to a temp folder then renamed into place."""
    import torch

    final = Path(run_dir) / f"{CHECKPOINT_PREFIX}{step}"
    staging = final.parent / f".{final.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    model.save_pretrained(staging, state_dict=adapter_state)
    torch.save(optimizer_state, staging / "optimizer.pt")
    torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, staging / "rng_state.pt")
    write_json_atomic(staging / STATE_FILE, state)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def _load_tensors(path: Path):
    """torch.load with weights_only=True, and a sentence (not PyTorch's advice to turn it off) on refusal."""
    import pickle

    import torch

    try:
        # weights_only=True: a checkpoint is data, never code.
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise DashboardError(
            f"{path.parent.name}/{path.name} holds Python objects, not plain tensors (loading it could run code), so "
            f"it was not loaded. Resume from another checkpoint or start anew.") from None


def load_checkpoint_state(checkpoint: Path, model, optimizer, scheduler, sharded: bool = False) -> dict:
    """Restore the optimiser, scheduler and RNGs from `checkpoint`; returns its loop state (trainer_state.json).
    The adapter itself is loaded with the model (lora.build_peft_model)."""
    import torch

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
    state = read_json(checkpoint / STATE_FILE)
    if state is None:
        raise DashboardError(f"{checkpoint.name}/{STATE_FILE} is missing or unreadable. Resume from another "
                             f"checkpoint or start anew.")
    return state
