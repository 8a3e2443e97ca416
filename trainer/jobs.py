"""Background jobs (perplexity evaluations, adapter export) run as subprocesses, like training.

The page never computes in its own process. It writes a job folder `results/jobs/ID/` with `job.json`
(what to do), starts `python -m trainer run-job --job-dir DIR` in its own process session, and from then
on reads `status.json` (state, progress, message, result ids, error), so a reload re-attaches.
Evaluations are appended to results/perplexity.jsonl; an identical evaluation already stored is reused.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
import uuid
from pathlib import Path

from .distributed import quiet_log
from .errors import DashboardError
from .home import check_name
from .models import keep_bitsandbytes_out
from .results import (
    adapter_run_name, append_result, evaluation_key, find_result, home_relative, read_results,
    results_dir, same_key,
)
from .perplexity import EvaluationSettings
from .processes import LIVE_STATES, launch_detached, process_gone, process_identity, stop_process_group
from .runfiles import now_iso
from .storage import read_json, write_json_atomic

JOB_FILE = "job.json"
STATUS_FILE = "status.json"
LOG_FILE = "job.log"
KINDS = ("perplexity", "export")
# Every field of a job's status.json (documented in FORMATS.md): state (queued, running, completed,
# stopped, failed), the process (pid, pid_start_time), times, progress 0..1 with a message, the result
# ids appended and reused (perplexity), the result (export) and the error sentence.
STATUS_FIELDS = ("state", "pid", "pid_start_time", "created", "started_at", "finished_at", "progress", "message",
                 "results", "reused", "result", "error")


def jobs_dir() -> Path:
    return results_dir() / "jobs"


def job_dir_for(job_id: str) -> Path:
    return jobs_dir() / check_name(job_id, "job id")


# ---- planning -----------------------------------------------------------------------------------


def perplexity_task(model: str, adapter_dir: Path | None, text_file: Path, dataset: str, stride: int,
                    max_length: int, comment: str = "", precision: str = "full") -> dict:
    """One evaluation: the inputs, what the results table shows, and the key that makes it reusable."""
    EvaluationSettings(int(stride), int(max_length), precision).validate()
    key = evaluation_key(model, adapter_dir, text_file, stride, max_length, precision)
    return {
        **key,
        "adapter": adapter_run_name(adapter_dir), "dataset": dataset, "comment": comment,
        "lora": str(Path(adapter_dir).resolve()) if adapter_dir else "",
        "text_file": str(Path(text_file).resolve()),
    }


def _new_job_id(kind: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{uuid.uuid4().hex[:6]}"


def _launch(kind: str, spec: dict) -> Path:
    job_id = _new_job_id(kind)
    job_dir = jobs_dir() / job_id
    job_dir.mkdir(parents=True)
    write_json_atomic(job_dir / JOB_FILE, {"id": job_id, "kind": kind, "created": now_iso(), **spec})
    queued = {"state": "queued", "pid": None, "created": now_iso(), "progress": 0.0, "message": "starting",
              "results": [], "error": None}
    write_json_atomic(job_dir / STATUS_FILE, queued)
    command = [sys.executable, "-m", "trainer", "run-job", "--job-dir", str(job_dir)]
    process = launch_detached(command, job_dir / LOG_FILE, header=now_iso())
    # Name the process, unless the job (seconds of imports later) has already written `running` itself.
    if (read_json(job_dir / STATUS_FILE) or {}).get("state") == "queued":
        write_json_atomic(job_dir / STATUS_FILE, {**queued, **process_identity(process.pid)})
    return job_dir


def start_perplexity(tasks: list[dict], title: str = "") -> dict:
    """Reuse stored results for identical evaluations and start one job for the rest.

    Returns {"job": job id or None, "reused": [stored records], "pending": number of evaluations queued,
    "running": number already being computed by another live job}.
    """
    if not tasks:
        raise DashboardError("Choose at least one model to evaluate (base, final adapter or a checkpoint).")
    records = read_results()
    in_flight = [task for job in list_jobs(50) if job["state"] in LIVE_STATES and job["kind"] == "perplexity"
                 for task in (read_json(jobs_dir() / job["id"] / JOB_FILE) or {}).get("tasks", [])]
    reused, pending, running = [], [], 0
    for task in tasks:
        found = find_result(task, records)
        if found is not None:
            reused.append(found)
        elif any(_same_task(task, other) for other in in_flight):
            running += 1  # a job started earlier (another click, another tab) is computing it
        elif not any(_same_task(task, other) for other in pending):
            pending.append(task)
    if not pending:
        return {"job": None, "reused": reused, "pending": 0, "running": running}
    job_dir = _launch("perplexity", {"title": title or "perplexity", "tasks": pending})
    return {"job": job_dir.name, "reused": reused, "pending": len(pending), "running": running}


def _same_task(a: dict, b: dict) -> bool:
    return same_key(a, b)


def start_export(adapter_dir: Path, name: str, base_model: str | None = None, to: str = "safetensors") -> str:
    """Start exporting an adapter as models/NAME: merged into its base model ("safetensors") or as GGUF files
    for llama.cpp and Ollama ("gguf"); the name (and for GGUF, llama.cpp) is checked at once."""
    from .export import adapter_base_model, check_export_target
    from .llamacpp import require_llama_cpp

    check_export_target(name)
    if to == "gguf":
        from .gguf import check_gguf_adapter

        require_llama_cpp()
        check_gguf_adapter(adapter_dir)
    base_model = base_model or adapter_base_model(adapter_dir)
    job_dir = _launch("export", {"title": f"export {name}" + (" (GGUF)" if to == "gguf" else ""),
                                 "adapter_dir": str(Path(adapter_dir).resolve()), "name": name,
                                 "base_model": base_model, "to": to})
    return job_dir.name


# ---- reading ----------------------------------------------------------------------------------


def job_state(job_dir: Path) -> dict:
    """status.json and job.json of a job as a reader should take them (a dead live job shows failed)."""
    job_dir = Path(job_dir)
    job = read_json(job_dir / JOB_FILE) or {}
    status = read_json(job_dir / STATUS_FILE) or {"state": "queued", "progress": 0.0}
    status = {**status, "id": job_dir.name, "kind": job.get("kind", ""), "title": job.get("title", ""),
              "n_tasks": len(job.get("tasks", [])) or 1, "created": job.get("created", "")}
    if process_gone(status, job_dir / STATUS_FILE):
        status["state"] = "failed"
        status["error"] = status.get("error") or (
            "The job's process ended without finishing (killed, out of memory or the machine restarted). "
            f"See {home_relative(job_dir / LOG_FILE)}; start it again.")
    return status


def list_jobs(limit: int = 20) -> list[dict]:
    """The newest jobs first."""
    root = jobs_dir()
    if not root.is_dir():
        return []
    folders = sorted((p for p in root.iterdir() if p.is_dir() and (p / JOB_FILE).exists()),
                     key=lambda p: p.name, reverse=True)
    return [job_state(p) for p in folders[:limit]]


def cancel_job(job_id: str) -> None:
    """Ask a job to end: SIGTERM to its process group; it writes state `stopped`."""
    stop_process_group(job_state(job_dir_for(job_id)))


def job_sentence(job: dict) -> str:
    """How a finished job ended, in words (the page shows it beside the job's icon)."""
    if job["state"] == "failed":
        return f"{job['title']} failed: {job.get('error')}"
    if job["state"] == "stopped":
        return f"{job['title']}: stopped."
    if job.get("result"):
        result = job["result"]
        if "lora_check" in result:
            from .gguf import gguf_sentence

            return gguf_sentence(result)
        return (f"Saved models/{result['name']} (merged {Path(result['adapter']).name} into {result['base_model']}); "
                f"max |logit difference| after reloading: {result['max_abs_diff_reloaded']:.1e} (must be under "
                f"{result['tolerance']:.1e}).")
    return f"{job['title']}: {len(job.get('results', []))} evaluated, {len(job.get('reused', []))} reused."


# ---- running (in the job's own process) ----------------------------------------------------------


class Cancelled(Exception):
    pass


class _Status:
    """Writes status.json, at most every half second for progress updates."""

    def __init__(self, job_dir: Path):
        self.path = job_dir / STATUS_FILE
        self.data = {"state": "running", **process_identity(os.getpid()),
                     "started_at": now_iso(), "finished_at": None, "progress": 0.0, "message": "loading",
                     "results": [], "reused": [], "error": None}
        self.last = 0.0
        self.cancelled = False
        self.write()

    def write(self, force: bool = True, **changes) -> None:
        self.data.update(changes)
        now = time.monotonic()
        if force or now - self.last >= 0.5:
            write_json_atomic(self.path, self.data)
            self.last = now


def _full_precision(job: dict) -> bool:
    return job.get("kind") == "export" or all(t.get("precision", "full") == "full" for t in job.get("tasks", []))


def run_job(job_dir: Path) -> int:
    """Run a job folder's job.json; the CLI entry `python -m trainer run-job --job-dir DIR`."""
    job_dir = Path(job_dir).resolve()
    job = read_json(job_dir / JOB_FILE)
    if job is None:
        print(f"error: {job_dir} has no readable {JOB_FILE}", file=sys.stderr)
        return 2
    quiet_log()
    if _full_precision(job):
        keep_bitsandbytes_out()  # no "kernels" probe in job.log, as in a full-precision run's train.log
    status = _Status(job_dir)

    def cancel(*_):
        status.cancelled = True

    signal.signal(signal.SIGTERM, cancel)
    signal.signal(signal.SIGINT, cancel)
    try:
        if job.get("kind") == "perplexity":
            _run_perplexity(job, status)
        elif job.get("kind") == "export":
            _run_export(job, status)
        else:
            raise DashboardError(f"Unknown job kind {job.get('kind')!r}.")
    except Cancelled:
        status.write(state="stopped", finished_at=now_iso(), message="stopped on request")
        return 0
    except BaseException as exc:  # the job folder must say what went wrong
        traceback.print_exc()
        message = exc.message if isinstance(exc, DashboardError) else f"{type(exc).__name__}: {str(exc)[:500]}"
        status.write(state="failed", finished_at=now_iso(), error=message)
        return 1
    status.write(state="completed", finished_at=now_iso(), progress=1.0, message="done")
    return 0


def _run_perplexity(job: dict, status: _Status) -> None:
    import torch

    from .perplexity import ModelCache, perplexity_of_file

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    tasks = job.get("tasks", [])
    cache = ModelCache()
    for index, task in enumerate(tasks):
        label = f"{task.get('adapter') or task['model']} {task.get('checkpoint') or ''}".strip()
        if status.cancelled:
            raise Cancelled()
        found = find_result(task)
        if found is not None:
            status.write(reused=status.data["reused"] + [found["id"]], progress=(index + 1) / len(tasks))
            continue
        status.write(message=f"{label} on {task['dataset']} ({index + 1} of {len(tasks)}): loading",
                     progress=index / len(tasks))

        def progress(fraction: float, index=index, label=label) -> None:
            if status.cancelled:
                raise Cancelled()
            status.write(force=False, progress=(index + fraction) / len(tasks),
                         message=f"{label} on {task['dataset']} ({index + 1} of {len(tasks)}): {fraction:.0%}")

        result = perplexity_of_file(task["model"], task.get("lora") or None, task["text_file"], task["stride"],
                                    task["max_length"], precision=task.get("precision", "full"), progress=progress,
                                    cache=cache)
        record = {k: v for k, v in task.items() if k not in ("lora", "text_file")}
        # The content actually evaluated (the file could have changed since the job was planned).
        record.update(dataset_sha256=result["text_sha256"], tokens=result["tokens"], nll=result["nll"],
                      perplexity=result["perplexity"])
        stored = append_result(record)
        status.write(results=status.data["results"] + [stored["id"]], progress=(index + 1) / len(tasks))
        print(f"{label} on {task['dataset']}: perplexity {result['perplexity']:.4f} over {result['tokens']} tokens",
              flush=True)


def _run_export(job: dict, status: _Status) -> None:
    from .export import export_merged
    from .gguf import export_gguf

    def progress(message: str) -> None:
        if status.cancelled:
            raise Cancelled()
        print(message, flush=True)
        status.write(message=message)

    export = export_gguf if job.get("to") == "gguf" else export_merged
    result = export(Path(job["adapter_dir"]), job["name"], job.get("base_model"), progress=progress)
    status.write(result=result)
