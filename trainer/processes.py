"""Background processes (training runs and jobs): launching one detached, telling whether it still runs,
stopping it. One place for each rule; runs.py and jobs.py both use it.

A process is named in its status.json by `pid` and `pid_start_time` (psutil's create_time): a pid alone
could be a reused one, given by the kernel to an unrelated process after the run died. FORMATS.md
documents the status files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from .home import CODE_ROOT, HOME_ENV, home_dir

LIVE_STATES = ("queued", "running")
# The launcher writes `queued` a moment before the process takes over (a job: before its pid is known);
# a queued status this young is believed even without a live process.
QUEUED_GRACE_S = 5.0
# Two readings of one process's start time agree (boot time is whole seconds, start ticks 1/100 s); a
# reused pid belongs to a process started long after the first holder of the pid, not within this.
_START_TIME_TOLERANCE_S = 0.5


def launch_detached(command: list[str], log_file: Path, header: str) -> subprocess.Popen:
    """Start `command` in its own process session (it outlives the page and a server restart), stdout and
    stderr appended to `log_file` after a line `=== HEADER: COMMAND`, stdin from /dev/null, in the code root.
    """
    log_file = Path(log_file)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{HOME_ENV: str(home_dir())})
    with open(log_file, "a", encoding="utf-8") as log:
        separator = "\n" if log.tell() else ""  # a blank line between launches appended to one log
        log.write(f"{separator}=== {header}: {' '.join(command)}\n")
        log.flush()
        return subprocess.Popen(command, cwd=CODE_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def process_start_time(pid: int | None) -> float | None:
    """When a process started (seconds since the epoch), None for a missing or finished (zombie) one."""
    if not pid:
        return None
    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None  # it has finished; only its exit code is left
        return process.create_time()
    except (psutil.Error, ValueError):
        return None


def process_identity(pid: int) -> dict:
    """The status.json fields that name a process: `pid` and `pid_start_time`."""
    return {"pid": pid, "pid_start_time": process_start_time(pid)}


def process_alive(pid: int | None, start_time: float | None = None) -> bool:
    """Whether `pid` runs and, where `start_time` is given, is the process that started then."""
    if not pid:
        return False
    try:
        os.waitpid(pid, os.WNOHANG)  # reap our own finished child so it does not linger as a zombie
    except OSError:
        pass  # not our child
    started = process_start_time(pid)
    if started is None:
        return False
    return start_time is None or abs(started - float(start_time)) < _START_TIME_TOLERANCE_S


def status_process_alive(status: dict) -> bool:
    return process_alive(status.get("pid"), status.get("pid_start_time"))


def process_gone(status: dict, status_file: Path) -> bool:
    """Whether a status claims a live process (queued or running) that is gone: the process was killed, ran out
    of memory or the machine restarted. A just-written `queued` (younger than the grace period) is believed.
    """
    if status.get("state") not in LIVE_STATES or status_process_alive(status):
        return False
    if status.get("waiting"):
        return False  # waiting in the run queue (trainer/runqueue.py): it has no process yet
    if status.get("state") == "queued":
        try:
            age = time.time() - Path(status_file).stat().st_mtime
        except OSError:
            age = 0.0  # not written yet: the launcher is about to
        return age >= QUEUED_GRACE_S
    return True


def stop_process_group(status: dict) -> None:
    """SIGTERM to the process group of a status's live process (never to a stranger that reuses its pid)."""
    if status.get("state") not in LIVE_STATES or not status_process_alive(status):
        return
    try:
        os.killpg(os.getpgid(status["pid"]), signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
