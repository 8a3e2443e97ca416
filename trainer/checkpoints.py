"""A run's checkpoint-STEP/ folders (FORMATS.md): list, find, save, load.

A checkpoint holds everything an exact resume needs: the adapter, the optimiser and scheduler states, the
random number generators and the loop's own counters (trainer_state.json); a PiSSA/OLoRA run's adapter is
saved converted for the original base, with the adapter as trained beside it (trainer/variants.py). It is
written into a hidden temp folder and renamed into place, so a listed checkpoint is always complete. A save
that fails (a full disk above all) removes its temp folder, so it holds no space a resume needs;
`prune_checkpoints` keeps the newest N once a newer one is complete (the parameter save_total_limit).
"""

from __future__ import annotations

import errno
import io
import random
import shutil
from pathlib import Path

from .errors import DashboardError
from .storage import read_json, write_bytes_atomic, write_json_atomic
from .variants import save_adapter

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


def step_of(checkpoint: Path) -> int:
    return int(Path(checkpoint).name[len(CHECKPOINT_PREFIX):])


def _save_tensors(data, path: Path) -> None:
    """torch.save through storage.py: serialised in memory, then written atomically. (torch.save writing a
    file itself reports a full disk as "unexpected pos", without the errno a person needs.)"""
    import torch

    buffer = io.BytesIO()
    torch.save(data, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def save_checkpoint(run_dir: Path, step: int, model, optimizer_state: dict, scheduler, state: dict,
                    adapter_state: dict | None = None) -> Path:
    """Adapter, optimiser, scheduler, RNG and loop state, written to a temp folder then renamed into place.
    A failed save leaves no temp folder; a full disk is reported with `disk_full_sentence`."""
    import torch

    final = Path(run_dir) / f"{CHECKPOINT_PREFIX}{step}"
    staging = final.parent / f".{final.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        save_adapter(model, staging, run_dir, adapter_state, resumable=True)  # PiSSA/OLoRA: converted
        _save_tensors(optimizer_state, staging / "optimizer.pt")
        _save_tensors(scheduler.state_dict(), staging / "scheduler.pt")
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        _save_tensors(rng, staging / "rng_state.pt")
        write_json_atomic(staging / STATE_FILE, state)
    except BaseException as exc:
        written = folder_bytes(staging)
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(exc):
            needed = max(written, _states_bytes(model, optimizer_state, adapter_state),
                         *(folder_bytes(c) for c in list_checkpoints(run_dir)[-1:]))
            raise DashboardError(disk_full_sentence(run_dir, f"Saving {final.name}", needed,
                                                    f"the half-written {staging.name} was removed")) from exc
        raise
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def remove_leftovers(run_dir: Path) -> list[str]:
    """Remove what an interrupted save or prune left (`.checkpoint-STEP.tmp/`, `.checkpoint-STEP.deleting/`):
    never a listed checkpoint, and it holds space a resume needs. Returns the names removed."""
    found = [p for pattern in (f".{CHECKPOINT_PREFIX}*.tmp", f".{CHECKPOINT_PREFIX}*.deleting")
             for p in Path(run_dir).glob(pattern) if p.is_dir()]
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(p.name for p in found)


def prune_checkpoints(run_dir: Path, keep: int, newest: Path) -> list[str]:
    """With `keep` > 0 (save_total_limit), once `newest` is complete: delete the complete checkpoints older
    than the `keep` newest up to its step. Later ones (left by a run resumed from an earlier checkpoint) are
    left alone; the run overwrites them when it gets there. Each is renamed out of the list first, so an
    interrupted delete never leaves a partial listed checkpoint. Returns the names deleted."""
    if keep <= 0:
        return []
    upto = [c for c in list_checkpoints(run_dir) if step_of(c) <= step_of(newest)]
    doomed = upto[:-keep]
    for checkpoint in doomed:
        trash = checkpoint.parent / f".{checkpoint.name}.deleting"
        shutil.rmtree(trash, ignore_errors=True)
        checkpoint.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    return [c.name for c in doomed]


# ---- a full disk ---------------------------------------------------------------------------------------

def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or an error it came from) is a write that failed for lack of space: an OSError with
    errno ENOSPC, or an error whose text says so (safetensors' SafetensorError: "No space left on device")."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text = str(exc)
        if "No space left on device" in text or "os error 28" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under `folder` (0 when it is missing)."""
    try:
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    except OSError:
        return 0


def _states_bytes(model, optimizer_state, adapter_state) -> int:
    """The tensor bytes a checkpoint of these states holds (the adapter and the optimiser state)."""
    import torch

    def tensor_bytes(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(tensor_bytes(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(tensor_bytes(v) for v in value)
        return 0

    adapter = tensor_bytes(adapter_state) if adapter_state is not None else sum(
        p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return adapter + tensor_bytes(optimizer_state)


def human_bytes(count: float) -> str:
    """12 bytes, 4.5 kB, 61.2 MB (powers of 1000, as disk sizes are sold)."""
    if count < 1000:
        return f"{count:.0f} bytes"
    for unit in ("kB", "MB", "GB", "TB"):
        count /= 1000
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}"


def disk_full_sentence(run_dir: Path, what: str, needed: int | None = None, cleaned: str | None = None) -> str:
    """What a person needs after a write failed for lack of space: where, how much it needed, what is free,
    and which complete checkpoint a resume will use."""
    run_dir = Path(run_dir)
    try:
        free = f"{human_bytes(shutil.disk_usage(run_dir).free)} free"
    except OSError:
        free = "free space unknown"
    need = f" It needed about {human_bytes(needed)}." if needed else ""
    done = f" ({cleaned[0].upper()}{cleaned[1:]}.)" if cleaned else ""
    checkpoints = list_checkpoints(run_dir)
    resume = (f"A resume will use {checkpoints[-1].name}, the newest complete checkpoint: free some space, then "
              f"resume." if checkpoints else
              "No complete checkpoint exists, so the run cannot be resumed: free some space and start it again.")
    return f"{what} failed: the disk holding {run_dir} is full ({free}).{need}{done} {resume}"


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
