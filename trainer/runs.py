"""Starting and finding runs under loras/: the launch (with its lock and modes), the trainer command line, the
run folders. The Train and Evaluate pages call these; summaries of runs are in runtable.py."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from .errors import DashboardError
from .home import CODE_ROOT, HOME_ENV, check_name, home_dir, loras_dir
from .params import TrainingParameters
from .processes import LIVE_STATES, launch_detached, process_identity
from . import runqueue
from .runfiles import (
    LOG_FILE, PARAMS_FILE, STATUS_FILE, STOP_FILE, effective_status, now_iso, read_status, run_lock_file,
)
from .storage import named_lock, write_json_atomic

MODES = ("new", "overwrite", "resume")


def run_dir_for(name: str) -> Path:
    return loras_dir() / check_name(name, "LoRA name")


def list_runs() -> list[Path]:
    """Every run folder under loras/ (ours or text-generation-webui's), newest first."""
    root = loras_dir()
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
            and ((p / PARAMS_FILE).exists() or (p / STATUS_FILE).exists() or (p / "adapter_config.json").exists())]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def is_live(run_dir: Path) -> bool:
    status = effective_status(run_dir)
    return bool(status) and status.get("state") in LIVE_STATES


def live_runs() -> list[str]:
    """The names of the runs running (or being started) now, read from their files; not those waiting in the
    queue. Sorted by name, so a list of them does not reorder itself as their folders are written."""
    return sorted(run.name for run in list_runs() if is_live(run) and not runqueue.is_waiting(effective_status(run)))


def waiting_runs() -> list[str]:
    """The runs waiting in the queue, in queue order."""
    return [entry["name"] for entry in runqueue.read_queue()]


def device_words(device: str) -> str:
    """ "the CPU", "GPU 0", "GPUs 0,1" for a device name of the queue."""
    if device == "cpu":
        return "the CPU"
    gpus = device.split(":", 1)[1]
    return f"GPU {gpus}" if "," not in gpus else f"GPUs {gpus}"


def busy_device_warning(processes: int = 1, gpus: int | None = None, beside: bool = False) -> str | None:
    """What Start says while other runs hold the device a new run of `processes` processes would take: a new
    run waits in the queue until they end (a warning, not a refusal); `beside`: the person chose to run it
    beside them at once."""
    device = runqueue.device_for(processes, gpus)
    busy = live_on_device(device)
    if not busy:
        return None
    verb = "is" if len(busy) == 1 else "are"
    if beside:
        return (f"{', '.join(busy)} {verb} already running on {device_words(device)}; Start runs this one beside "
                f"{'it' if len(busy) == 1 else 'them'} at once: they share the device, each runs slower, and "
                f"together they may run out of memory.")
    return (f"{', '.join(busy)} {verb} already running on {device_words(device)}; a second run at once would share "
            f"the device and may run out of memory, so Start puts this one in the queue: it starts when the device "
            f"is free.")


def queue_rows() -> list[dict]:
    """The queue as the Train page lists it, in order: each waiting run with its device (in words), its place
    among the runs waiting for that device ("place" of "of"), what it does when it starts ("start" or
    "resume from checkpoint-N"), when it was queued, and the runs "Start now" would run it beside."""
    entries = runqueue.read_queue()
    rows, busy = [], {}  # busy: device -> its live runs, read once per device
    for entry in entries:
        if entry["device"] not in busy:
            busy[entry["device"]] = live_on_device(entry["device"])
        peers = runqueue.waiting_for(entry["device"], entries)
        mode = f"resume from {entry.get('checkpoint', 'latest')}" if entry.get("mode") == "resume" else "start"
        rows.append({"name": entry["name"], "device": device_words(entry["device"]),
                     "place": runqueue.position(entry["name"], entries), "of": len(peers), "mode": mode,
                     "queued_at": entry.get("queued_at", ""), "beside": busy[entry["device"]]})
    return rows


def backup_name(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = run_dir.with_name(f"{run_dir.name}-backup-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = run_dir.with_name(f"{run_dir.name}-backup-{stamp}-{n}")
    return candidate


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trainer_command(run_dir: Path, processes: int = 1) -> list[str]:
    """The trainer's command line: plain python for one process, torchrun for several on this machine."""
    if processes <= 1:
        return [sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "trainer", "train", "--run-dir", str(run_dir)]


def free_run_name(prefix: str = "my-lora") -> str:
    """The name a fresh form suggests: the first of PREFIX-1, PREFIX-2, ... that no folder under loras/ has."""
    n = 1
    while (loras_dir() / f"{prefix}-{n}").exists():
        n += 1
    return f"{prefix}-{n}"


def multi_node_commands(run_dir: Path | None, nodes: int, processes_per_node: int, endpoint: str) -> list[str]:
    """The command to run on each machine for a run folder on shared storage (node 0 hosts the rendezvous).

    Each runs this environment's python from this checkout; without a run folder (no name typed yet) the
    commands name a placeholder `NAME`, never another run."""
    run_dir = run_dir if run_dir is not None else loras_dir() / "NAME"
    prefix = (f"cd {shlex.quote(str(CODE_ROOT))} && {HOME_ENV}={shlex.quote(str(home_dir()))} "
              f"{shlex.quote(sys.executable)} -m torch.distributed.run")
    return [f"{prefix} --nnodes {nodes} --node_rank {node} --nproc_per_node {processes_per_node} "
            f"--rdzv_backend c10d --rdzv_endpoint {shlex.quote(endpoint)} --rdzv_id {shlex.quote(run_dir.name)} "
            f"-m trainer train --run-dir {shlex.quote(str(run_dir))}" for node in range(nodes)]


def write_multi_node_run(params: TrainingParameters, nodes: int, processes_per_node: int) -> Path:
    """Write the run folder that the machines' commands start: its training_parameters.json with processes =
    machines x processes per machine (checked again, the batch included). Never over an existing run."""
    stored = TrainingParameters.from_dict({**params.to_dict(), "num_processes": int(nodes) * int(processes_per_node)})
    stored.validate()
    run_dir = run_dir_for(stored.lora_name)
    try:
        with named_lock(run_lock_file(run_dir)):
            if run_dir.exists():
                raise DashboardError(f"A LoRA named {run_dir.name} already exists; choose another name for the "
                                     f"machines' run.", field="lora_name")
            run_dir.mkdir(parents=True)
            stored.write(run_dir / PARAMS_FILE)
    except OSError as exc:
        raise DashboardError(f"Cannot write the run folder {run_dir}: {exc.strerror or exc}. Is the home folder "
                             f"writable and the disk not full?") from None
    return run_dir


def launch(params: TrainingParameters, mode: str = "new", checkpoint: str = "latest", beside: bool = False) -> Path:
    """Write the run folder and start `python -m trainer train` in its own process session, or, while its
    device is busy (a run live on it, or runs already waiting for it), put it in the run queue
    (trainer/runqueue.py): it starts when its turn comes. `beside` starts it at once next to the live run.

    mode "new" refuses an existing name; "overwrite" first moves the old folder to a dated backup;
    "resume" continues the existing run from `checkpoint` with its stored parameters.
    Returns at once; the run is then followed through its files.
    """
    if mode not in MODES:
        raise DashboardError(f"Unknown start mode {mode!r}.")
    if mode != "resume":
        params.validate()
    run_dir = run_dir_for(params.lora_name)
    try:
        loras_dir().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DashboardError(f"Cannot create {loras_dir()}: {exc.strerror}. Is the home folder writable?") from None
    if not os.access(loras_dir(), os.W_OK):
        raise DashboardError(f"The folder {loras_dir()} is read-only; nothing can be trained into it.")
    try:
        queued_behind_idle = _launch_locked(params, mode, checkpoint, run_dir, beside)
    except OSError as exc:
        # os.access can say yes and a write still fail (root on a read-only mount, a full disk, a file where
        # a folder should be): the page shows a sentence, not a traceback.
        raise DashboardError(
            f"Cannot write the run folder {run_dir}: {exc.strerror or exc}"
            f"{f' ({exc.filename})' if exc.filename else ''}. Is the home folder writable and the disk not full?"
        ) from None
    if queued_behind_idle:
        start_waiting_runs()  # its device is idle, but others were waiting first: the first of them starts
    return run_dir


def _launch_locked(params: TrainingParameters, mode: str, checkpoint: str, run_dir: Path, beside: bool) -> bool:
    """Prepare the folder and start or queue the run; True when it was queued on an idle device."""
    with named_lock(run_lock_file(run_dir)):  # two Start clicks at once: the second sees the first's run
        if run_dir.exists():
            if is_live(run_dir):
                raise DashboardError(f"{run_dir.name} is already running; stop it first.", field="lora_name")
            if mode == "new":
                raise DashboardError(
                    f"A LoRA named {run_dir.name} already exists. Choose resume, overwrite (the old folder is kept as "
                    f"a dated backup) or another name.", field="lora_name")
            if mode == "overwrite":
                run_dir.rename(backup_name(run_dir))
        elif mode == "resume":
            raise DashboardError(f"There is no run named {run_dir.name} to resume.", field="lora_name")
        if mode == "resume":
            from .checkpoints import find_checkpoint

            checkpoint = find_checkpoint(run_dir, checkpoint).name  # a missing checkpoint is refused now
        run_dir.mkdir(exist_ok=mode == "resume")
        if mode != "resume":
            params.write(run_dir / PARAMS_FILE)
        start_mode = "resume" if mode == "resume" else "new"
        device = runqueue.device_for(TrainingParameters.from_file(run_dir / PARAMS_FILE).num_processes)
        if beside:
            _start_locked(run_dir, start_mode, checkpoint, device)
            return False
        with runqueue.queue_lock():  # the device's state and the queue are read and changed at one time
            waiting = runqueue.waiting_for(device)
            if waiting or live_on_device(device):
                runqueue.append_locked(run_dir, device, start_mode, checkpoint)
                return not live_on_device(device)
            _start_locked(run_dir, start_mode, checkpoint, device)
    return False


def start_prepared(run_dir: Path, mode: str = "new", checkpoint: str = "latest") -> Path:
    """Start the trainer on a prepared run folder (its parameters written), under the run lock: mode "new"
    trains from the start, "resume" continues from `checkpoint`. Used for runs that waited in the queue."""
    run_dir = Path(run_dir)
    if mode not in ("new", "resume"):
        raise DashboardError(f"Unknown start mode {mode!r}.")
    try:
        with named_lock(run_lock_file(run_dir)):
            status = effective_status(run_dir) or {}
            if status.get("state") in LIVE_STATES and not runqueue.is_waiting(status):
                raise DashboardError(f"{run_dir.name} is already running.", field="lora_name")
            processes = TrainingParameters.from_file(run_dir / PARAMS_FILE).num_processes
            _start_locked(run_dir, mode, checkpoint, runqueue.device_for(processes))
    except OSError as exc:
        raise DashboardError(f"Cannot start {run_dir.name}: {exc.strerror or exc}.") from None
    return run_dir


def _start_locked(run_dir: Path, mode: str, checkpoint: str, device: str) -> None:
    """Launch the trainer for a prepared folder (the caller holds the run lock) and write `queued` with its
    process and device (runqueue reads the device to tell a busy one)."""
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    command = trainer_command(run_dir, TrainingParameters.from_file(run_dir / PARAMS_FILE).num_processes)
    if mode == "resume":
        from .checkpoints import find_checkpoint

        command += ["--resume", find_checkpoint(run_dir, checkpoint).name]
    previous = read_status(run_dir) or {}
    process = launch_detached(command, run_dir / LOG_FILE, header=f"{now_iso()} {mode}")
    write_json_atomic(run_dir / STATUS_FILE, {
        **({k: previous[k] for k in ("started_at", "total_steps", "step") if k in previous}
           if mode == "resume" else {}),
        "state": "queued", **process_identity(process.pid), "device": device,
        "started_at": previous.get("started_at") if mode == "resume" else now_iso(),
        "finished_at": None, "error": None,
    })


def live_on_device(device: str) -> list[str]:
    """The runs running (or being started) now on hardware `device` shares; runs waiting in the queue are not."""
    return runqueue.live_runs_on(device, list_runs())


def start_waiting_runs() -> list[str]:
    """Start the next queued run of every idle device (the trainer calls it as a run ends, the Train page on
    load); returns the names started. Safe to call from many processes at once: each run starts once."""
    return runqueue.start_next(_start_queued, list_runs)


def start_now(name: str) -> Path:
    """Start a queued run at once, beside whatever runs on its device (the queue's "start now")."""
    run_dir = run_dir_for(name)
    runqueue.start_one(run_dir.name, _start_queued, list_runs)
    return run_dir


def _start_queued(run_dir: Path) -> None:
    """Start a run as its queue entry says (a queued resume resumes from its checkpoint); the caller holds
    the queue lock, and the entry is still in the queue file."""
    queued = runqueue.entry(run_dir.name) or {}
    start_prepared(run_dir, queued.get("mode", "new"), queued.get("checkpoint", "latest"))


# Set by torchrun for its processes; a run started from one of them is a process tree of its own.
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                   "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                   "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                   "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE")


def start_after_run_end() -> list[str]:
    """Whoever finishes starts the next: the trainer (rank 0) calls this as its run ends, after the final
    status is written and the run lock released. It never fails the run that ends: a problem is printed to
    its log, and the queue goes on at the next page load or run end."""
    try:
        for name in DISTRIBUTED_ENV:  # the next run inherits this environment: it must not join this one
            os.environ.pop(name, None)
        started = start_waiting_runs()
        if started:
            print(f"[{time.strftime('%H:%M:%S')}] Started the next queued run: {', '.join(started)}.", flush=True)
        return started
    except Exception as exc:  # noqa: BLE001 - the run has ended; the queue must not change how
        print(f"[{time.strftime('%H:%M:%S')}] Could not start the next queued run: {exc}", flush=True)
        return []
