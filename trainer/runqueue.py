"""The run queue: runs that wait for their device, started one after another, in order.

It lives in files, like runs, so it survives a closed browser and a restarted server, and no daemon keeps
it: whoever sees a device fall idle starts its next run — the trainer as it ends, the Train page when it
loads — under one lock, so a run starts exactly once however many of them look at the same moment.

- `loras/.queue.json`: the order, `{"runs": [{"name", "device", "queued_at", "mode", "checkpoint"}, ...]}`
  (FORMATS.md);
- a queued run's folder holds its `training_parameters.json` and a status.json with state `queued`,
  `waiting: true`, its `device` and no pid, so every reader lists it as queued (and no reader takes the
  missing process for a dead one).

Devices: "cpu", or "cuda:0", "cuda:1", ...; a run of several processes takes the GPUs it names
("cuda:0,1"), and two runs share a device when their GPU sets meet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .errors import DashboardError
from .home import loras_dir
from .processes import LIVE_STATES
from .runfiles import STATUS_FILE, effective_status, now_iso, read_status
from .storage import lock_beside, named_lock, read_json, write_json_atomic

QUEUE_FILE = ".queue.json"


def queue_path() -> Path:
    return loras_dir() / QUEUE_FILE


def visible_gpu_count() -> int:
    """CUDA GPUs this process can use (0 on a CPU-only build or machine)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_for(processes: int = 1, gpus: int | None = None) -> str:
    """The device a run of `processes` processes takes on this machine: the CPU, or the first GPUs."""
    if gpus is None:
        gpus = visible_gpu_count()
    if gpus <= 0:
        return "cpu"
    return "cuda:" + ",".join(str(i) for i in range(max(1, min(processes, gpus))))


def devices_meet(a: str, b: str) -> bool:
    """Whether two device names share hardware (the CPU, or any GPU of the two sets)."""
    if a == "cpu" or b == "cpu":
        return a == b
    return bool(set(a.split(":", 1)[1].split(",")) & set(b.split(":", 1)[1].split(",")))


def read_queue() -> list[dict]:
    """The queue in order (entries without a name are ignored)."""
    data = read_json(queue_path()) or {}
    return [entry for entry in data.get("runs", []) if isinstance(entry, dict) and entry.get("name")]


def _write_queue(entries: list[dict]) -> None:
    loras_dir().mkdir(parents=True, exist_ok=True)
    write_json_atomic(queue_path(), {"runs": entries})


def queue_lock():
    return named_lock(lock_beside(queue_path()))


def is_waiting(status: dict | None) -> bool:
    """A status of a run that waits in the queue (no process yet)."""
    return bool(status) and status.get("state") == "queued" and bool(status.get("waiting"))


def live_runs_on(device: str, run_dirs: list[Path]) -> list[str]:
    """The runs that are running (or being started) on hardware `device` shares: not those waiting."""
    busy = []
    for run_dir in run_dirs:
        status = effective_status(run_dir) or {}
        if status.get("state") in LIVE_STATES and not is_waiting(status) \
                and devices_meet(status.get("device") or "cpu", device):
            busy.append(run_dir.name)
    return busy


def add(run_dir: Path, device: str, mode: str = "new", checkpoint: str = "latest") -> None:
    """Put a prepared run folder (parameters written) at the end of the queue, with a waiting status.
    `mode` "resume" (from `checkpoint`) makes the run resume when its turn comes; otherwise it starts anew."""
    with queue_lock():
        append_locked(Path(run_dir), device, mode, checkpoint)


def append_locked(run_dir: Path, device: str, mode: str = "new", checkpoint: str = "latest") -> None:
    """`add`, for a caller that already holds the queue lock."""
    entries = [e for e in read_queue() if e["name"] != run_dir.name]
    entry = {"name": run_dir.name, "device": device, "queued_at": now_iso(), "mode": mode}
    if mode == "resume":
        entry["checkpoint"] = checkpoint
    entries.append(entry)
    write_json_atomic(run_dir / STATUS_FILE, {
        **(read_status(run_dir) or {}), "state": "queued", "waiting": True, "device": device, "pid": None,
        "pid_start_time": None, "queued_at": entry["queued_at"], "finished_at": None, "error": None})
    _write_queue(entries)


def entry(name: str) -> dict | None:
    """A run's queue entry (name, device, queued_at, mode, checkpoint), or None when it is not queued."""
    return next((e for e in read_queue() if e["name"] == name), None)


def waiting_for(device: str, entries: list[dict] | None = None) -> list[str]:
    """The runs queued for hardware `device` shares, in order (`entries`: the queue as already read)."""
    return [e["name"] for e in (read_queue() if entries is None else entries) if devices_meet(e["device"], device)]


def position(name: str, entries: list[dict] | None = None) -> int | None:
    """A run's place in its device's queue (1 is next), or None when it is not queued; `entries`: the queue
    as already read (default: read it now)."""
    entries = read_queue() if entries is None else entries
    mine = next((e for e in entries if e["name"] == name), None)
    if mine is None:
        return None
    same = [e for e in entries if devices_meet(e["device"], mine["device"])]
    return [e["name"] for e in same].index(name) + 1


def not_queued(name: str) -> str:
    """What a queue action on a run that is not waiting says (it may have left the queue since the page drew it)."""
    return f"{name} is no longer waiting in the queue: it has started or was cancelled."


def move(name: str, offset: int) -> None:
    """Move a queued run `offset` places (negative: earlier) among the runs queued for its device."""
    with queue_lock():
        entries = read_queue()
        names = [e["name"] for e in entries]
        if name not in names:
            raise DashboardError(not_queued(name))
        index = names.index(name)
        device = entries[index]["device"]
        peers = [i for i, e in enumerate(entries) if devices_meet(e["device"], device)]
        at = peers.index(index)
        target = peers[max(0, min(len(peers) - 1, at + offset))]
        entries.insert(target, entries.pop(index))
        _write_queue(entries)


def cancel(run_dir: Path) -> None:
    """Take a run out of the queue; its folder stays, with state `stopped` (it never started)."""
    run_dir = Path(run_dir)
    if not withdraw(run_dir):
        raise DashboardError(not_queued(run_dir.name))


def withdraw(run_dir: Path) -> bool:
    """Cancel a run if it is queued or waiting (Stop on a queued run); False when it is neither (it has
    started, or was never queued: the caller stops its process as usual)."""
    run_dir = Path(run_dir)
    with queue_lock():
        entries = read_queue()
        queued = any(e["name"] == run_dir.name for e in entries)
        if queued:
            _write_queue([e for e in entries if e["name"] != run_dir.name])
        status = read_status(run_dir) or {}
        if is_waiting(status):
            write_json_atomic(run_dir / STATUS_FILE, {
                **status, "state": "stopped", "waiting": False, "finished_at": now_iso(),
                "reason": "cancelled in the queue before it started"})
            return True
        return queued


def take(name: str) -> dict | None:
    """Remove a run from the queue (it is about to start) and return its entry."""
    with queue_lock():
        entries = read_queue()
        entry = next((e for e in entries if e["name"] == name), None)
        if entry is not None:
            _write_queue([e for e in entries if e["name"] != name])
        return entry


def start_one(name: str, start: Callable[[Path], object], run_dirs: Callable[[], list[Path]]) -> None:
    """Start one queued run now, whatever runs on its device ("start now"), under the queue lock: it starts
    once even when its device falls idle at the same moment."""
    with queue_lock():
        run_dir = next((p for p in run_dirs() if p.name == name), None)
        if run_dir is None or entry(name) is None or not is_waiting(read_status(run_dir)):
            raise DashboardError(not_queued(name))
        start(run_dir)
        _write_queue([e for e in read_queue() if e["name"] != name])


def start_next(start: Callable[[Path], object], run_dirs: Callable[[], list[Path]]) -> list[str]:
    """Start the first queued run of every idle device; returns the names started.

    `start(run_dir)` launches a prepared, waiting run folder; `run_dirs()` lists every run folder. All of it
    happens under the queue lock, so two callers at the same moment (two runs ending together, a page load)
    start each run once: the second sees the first's run live and its device busy.
    """
    started = []
    if not read_queue():
        return started  # nothing waits: touch no file (a refused run leaves the home as it was)
    with queue_lock():
        entries = read_queue()
        folders = run_dirs()
        by_name = {p.name: p for p in folders}
        claimed: list[str] = []  # devices given a run in this call
        kept = []
        for entry in entries:
            run_dir = by_name.get(entry["name"])
            if run_dir is None or not is_waiting(read_status(run_dir)):
                continue  # the folder went, or the run was started or cancelled by hand: drop the entry
            device = entry["device"]
            if any(devices_meet(device, d) for d in claimed) or live_runs_on(device, folders):
                kept.append(entry)
                continue
            claimed.append(device)
            try:
                start(run_dir)
                started.append(run_dir.name)
            except DashboardError as exc:  # it cannot start: it ends failed, with the reason, and the next one goes
                write_json_atomic(run_dir / STATUS_FILE, {
                    **(read_status(run_dir) or {}), "state": "failed", "waiting": False, "finished_at": now_iso(),
                    "error": exc.message})
                claimed.pop()
        _write_queue(kept)
    return started
