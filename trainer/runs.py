"""Starting and finding runs under loras/: the launch (with its lock and modes), the trainer command line, the
run folders. The Train and Evaluate pages call these; summaries of runs are in runtable.py."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .errors import DashboardError
from .home import check_name, home_dir, loras_dir
from .params import TrainingParameters
from .processes import LIVE_STATES, launch_detached, process_identity
from .runfiles import (
    LOG_FILE, PARAMS_FILE, STATUS_FILE, STOP_FILE, effective_status, now_iso, run_lock_file,
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


def multi_node_commands(run_dir: Path, nodes: int, processes_per_node: int, endpoint: str) -> list[str]:
    """The command to run on each machine for a run folder on shared storage (node 0 hosts the rendezvous)."""
    commands = []
    for node in range(nodes):
        commands.append(
            f"LORA_DASHBOARD_HOME={home_dir()} python -m torch.distributed.run --nnodes {nodes} "
            f"--node_rank {node} --nproc_per_node {processes_per_node} --rdzv_backend c10d "
            f"--rdzv_endpoint {endpoint} --rdzv_id {run_dir.name} -m trainer train --run-dir {run_dir}")
    return commands


def launch(params: TrainingParameters, mode: str = "new", checkpoint: str = "latest") -> Path:
    """Write the run folder and start `python -m trainer train` in its own process session.

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
        return _launch_locked(params, mode, checkpoint, run_dir)
    except OSError as exc:
        # os.access can say yes and a write still fail (root on a read-only mount, a full disk, a file where
        # a folder should be): the page shows a sentence, not a traceback.
        raise DashboardError(
            f"Cannot write the run folder {run_dir}: {exc.strerror or exc}"
            f"{f' ({exc.filename})' if exc.filename else ''}. Is the home folder writable and the disk not full?"
        ) from None


def _launch_locked(params: TrainingParameters, mode: str, checkpoint: str, run_dir: Path) -> Path:
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
        run_dir.mkdir(exist_ok=mode == "resume")
        if mode != "resume":
            params.write(run_dir / PARAMS_FILE)
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        stored = params if mode != "resume" else TrainingParameters.from_file(run_dir / PARAMS_FILE)
        command = trainer_command(run_dir, stored.num_processes)
        if mode == "resume":
            from .checkpoints import find_checkpoint

            command += ["--resume", find_checkpoint(run_dir, checkpoint).name]
        process = launch_detached(command, run_dir / LOG_FILE, header=f"{now_iso()} {mode}")
        previous = effective_status(run_dir) or {}
        write_json_atomic(run_dir / STATUS_FILE, {
            **({k: previous[k] for k in ("started_at", "total_steps", "step") if k in previous}
               if mode == "resume" else {}),
            "state": "queued", **process_identity(process.pid),
            "started_at": previous.get("started_at") if mode == "resume" else now_iso(),
            "finished_at": None, "error": None,
        })
    return run_dir
