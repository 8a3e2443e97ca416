"""The files of a run folder (FORMATS.md): status, metrics lines, stop requests; written through storage.py."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, TypedDict

# read_json and write_json_atomic are named here too: a run folder's readers and tests take them from here.
from .processes import process_gone, stop_process_group
from .storage import JsonlAppender, iter_jsonl, read_json, rewrite_jsonl, write_json_atomic  # noqa: F401

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
PARAMS_FILE = "training_parameters.json"
LOG_FILE = "train.log"
STOP_FILE = "stop_requested"
FINAL_STATES = ("completed", "stopped", "failed")


class RunStatus(TypedDict, total=False):
    """Every field of a run's status.json (documented in FORMATS.md); nothing else is written to it."""

    state: str  # queued (launcher) -> running (trainer) -> completed | stopped | failed
    pid: int  # the launched process (python or torchrun), then the trainer's (rank 0) once it takes over
    pid_start_time: float  # processes.process_start_time(pid): tells the run from a reused pid
    started_at: str  # ISO time of the first start; a resume keeps it
    finished_at: str | None  # ISO time the run ended; None while live
    error: str | None  # the sentence shown for a failed run
    step: int  # the last optimiser step done
    total_steps: int
    epoch: float  # step / steps per epoch
    message: str | None  # what the trainer is doing before the first step ("loading the model and data")
    world_size: int  # the number of training processes
    resumed_from: str | None  # the checkpoint folder name a resume continued from
    failed_rank: int | None  # the rank whose failure ended a multi-process run
    reason: str  # why a run ended: the last step reached, a stop requested, stop-at-loss
    diverged: bool  # the loss or gradient norm blew up (trainer/divergence.py); false until then
    waiting: bool  # queued in the run queue (trainer/runqueue.py): no process yet
    device: str  # the device a queued run waits for ("cpu", "cuda:0", "cuda:0,1")
    queued_at: str  # ISO time the run joined the queue


STATUS_FIELDS = tuple(RunStatus.__annotations__)
# Readers (effective_status) add this one to what they return; it is never written.
PROCESS_GONE_FIELD = "process_gone"
PROCESS_GONE_ERROR = ("The trainer process ended without writing a final status (killed, out of memory or "
                      "the machine restarted). Resume from the last checkpoint to continue.")


def run_lock_file(run_dir: Path) -> Path:
    """The lock taken around a run's start and the trainer's take-over (`with named_lock(run_lock_file(d))`):
    two Start clicks at once cannot both launch, and the trainer waits for the launcher's `queued`."""
    run_dir = Path(run_dir)
    return run_dir.parent / ".locks" / f"{run_dir.name}.lock"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_status(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / STATUS_FILE)


def update_status(run_dir: Path, **changes: Any) -> dict:
    status = read_status(run_dir) or {}
    status.update(changes)
    write_json_atomic(Path(run_dir) / STATUS_FILE, status)
    return status


class MetricsWriter(JsonlAppender):
    """metrics.jsonl: one flushed line per record, stamped with the time it was written."""

    def write(self, record: dict[str, Any]) -> None:
        super().write({**record, "time": record.get("time", now_iso())})


def iter_metrics(path: Path) -> Iterator[dict]:
    """Every complete metrics line; a torn or broken line (a writer killed mid-line) is skipped."""
    return iter_jsonl(path)


def read_metrics(run_dir: Path) -> list[dict]:
    return list(iter_metrics(Path(run_dir) / METRICS_FILE))


def truncate_metrics_after(run_dir: Path, step: int) -> None:
    """Keep only metric lines up to `step` (a resumed run continues from its checkpoint's step)."""
    path = Path(run_dir) / METRICS_FILE
    if path.exists():
        rewrite_jsonl(path, [r for r in iter_metrics(path) if int(r.get("step", 0)) <= step])


def effective_status(run_dir: Path) -> dict | None:
    """status.json as a reader should take it: a live state whose process is gone is shown as failed."""
    status = read_status(run_dir)
    if status is not None and process_gone(status, Path(run_dir) / STATUS_FILE):
        status = {**status, "state": "failed", PROCESS_GONE_FIELD: True, "error": PROCESS_GONE_ERROR}
    return status


def request_stop(run_dir: Path) -> None:
    """Ask a run to stop: a stop file (works across machines) and SIGTERM to its process group; a run waiting
    in the run queue is cancelled there instead."""
    run_dir = Path(run_dir)
    if (read_status(run_dir) or {}).get("waiting"):
        from .runqueue import withdraw  # here, not at the top: runqueue reads run files through this module

        if withdraw(run_dir):
            return  # it waited in the run queue: cancelled there, it never starts
    (run_dir / STOP_FILE).write_text(now_iso())
    stop_process_group(read_status(run_dir) or {})
