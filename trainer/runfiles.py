"""The files of a run folder (DESIGN.md): atomic JSON writes, status, metrics lines, stop requests."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
PARAMS_FILE = "training_parameters.json"
LOG_FILE = "train.log"
STOP_FILE = "stop_requested"
LIVE_STATES = ("queued", "running")
FINAL_STATES = ("completed", "stopped", "failed")


def run_lock_file(run_dir: Path) -> Path:
    """The lock taken around a run's start and the trainer's take-over (`with named_lock(run_lock_file(d))`):
    two Start clicks at once cannot both launch, and the trainer waits for the launcher's `queued`."""
    run_dir = Path(run_dir)
    return run_dir.parent / ".locks" / f"{run_dir.name}.lock"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never a torn one (temp + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def read_json(path: Path) -> dict | None:
    """A JSON object from disk, or None where it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_status(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / STATUS_FILE)


def update_status(run_dir: Path, **changes: Any) -> dict:
    status = read_status(run_dir) or {}
    status.update(changes)
    write_json_atomic(Path(run_dir) / STATUS_FILE, status)
    return status


def _finite(value: Any) -> Any:
    # NaN and infinity are not JSON; they are written as strings so the line stays readable.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends one JSON line per call and flushes it, so a reader sees every finished line at once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        record = {k: _finite(v) for k, v in record.items()}
        record.setdefault("time", now_iso())
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def iter_metrics(path: Path) -> Iterator[dict]:
    """Every complete metrics line; a torn or broken line (a writer killed mid-line) is skipped."""
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except OSError:
        return
    with handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # torn last line: still being written, or the writer died mid-line
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def read_metrics(run_dir: Path) -> list[dict]:
    return list(iter_metrics(Path(run_dir) / METRICS_FILE))


def truncate_metrics_after(run_dir: Path, step: int) -> None:
    """Keep only metric lines up to `step` (a resumed run continues from its checkpoint's step)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [r for r in iter_metrics(path) if int(r.get("step", 0)) <= step]
    fd, tmp = tempfile.mkstemp(prefix=".metrics.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for record in kept:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a process (clock ticks since boot), to tell it from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None  # a zombie has finished; only its exit code is left
    return int(fields[19])


def process_alive(pid: int | None, start_time: int | None = None) -> bool:
    if not pid:
        return False
    try:
        # Reap our own finished child so it does not linger as a zombie.
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    except OSError:
        pass
    started = process_start_time(pid)
    if started is None:
        return False
    return start_time is None or started == start_time


def effective_status(run_dir: Path) -> dict | None:
    """status.json as a reader should take it: a live state whose process is gone is shown as failed."""
    status = read_status(run_dir)
    if status is None:
        return None
    if status.get("state") in LIVE_STATES and not process_alive(status.get("pid"), status.get("pid_start_time")):
        # The launcher writes `queued` just before the trainer takes over; give it a moment.
        if status.get("state") == "queued" and time.time() - Path(run_dir, STATUS_FILE).stat().st_mtime < 5:
            return status
        status = dict(status)
        status["state"] = "failed"
        status["process_gone"] = True
        status["error"] = ("The trainer process ended without writing a final status (killed, out of memory or "
                           "the machine restarted). Resume from the last checkpoint to continue.")
    return status


def request_stop(run_dir: Path) -> None:
    """Ask a run to stop: a stop file (works across machines) and SIGTERM to its process group."""
    import signal

    run_dir = Path(run_dir)
    (run_dir / STOP_FILE).write_text(now_iso())
    status = read_status(run_dir) or {}
    pid = status.get("pid")
    if status.get("state") in LIVE_STATES and process_alive(pid, status.get("pid_start_time")):
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
