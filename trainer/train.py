"""`python -m trainer train --run-dir DIR`: one readable LoRA training loop.

Reads DIR/training_parameters.json, trains on exactly the samples `preview` shows, and writes
status.json, metrics.jsonl, checkpoint-STEP/ folders and the final PEFT adapter (FORMATS.md).
The loop is `train_run`; what it needs is built once before it: the step plan and the batches
(trainer/batching.py, trainer/trainingdata.py), the adapter model with its optimiser (trainer/lora.py), the progress counters
(`Progress`), a checkpoint to resume from (trainer/checkpoints.py), and the watch that ends a run
whose loss or gradient norm blows up (trainer/divergence.py).
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from .checkpoints import (
    disk_full_sentence, find_checkpoint, is_disk_full, list_checkpoints, loop_state, prune_checkpoints,
    remove_leftovers, step_of,
)
from .distributed import Distributed, log, lost_a_peer, quiet_log
from .divergence import Diverged, DivergenceWatch, loss_problem
from .errors import DashboardError
from .runfiles import (
    METRICS_FILE, PARAMS_FILE, STOP_FILE, MetricsWriter, now_iso, read_status,
    run_lock_file, truncate_metrics_after, update_status,
)
from .batching import StepPlan
from .processes import process_identity
from .storage import named_lock
from .trainingdata import TrainingData

# How long a process whose collective failed (its peer ended) waits for that peer's own failure to reach
# status.json before writing its own: the run then names the rank that broke, not the one left behind.
# Well under torchrun's 30 s between SIGTERM and SIGKILL.
PEER_FAILURE_WAIT_S = 5.0


class StopRequested:
    """Set by SIGTERM/SIGINT or by a stop file; the loop checks it after each step."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.flag = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_):
        self.flag = True

    def __bool__(self) -> bool:
        return self.flag or (self.run_dir / STOP_FILE).exists()


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's malloc keep the memory a CPU training step frees, for the next step to reuse.

    Each step allocates its activations afresh (gigabytes) and frees them in the backward pass. By default
    glibc gives large blocks back to the kernel at once, so every step faults its memory in again page by
    page (measured: a fresh 6 MB tensor product took 1.2 ms against 0.23 ms in reused memory, and a step
    spent a third of its CPU time in the kernel). Blocks up to 32 MB (the largest glibc allows) now come
    from the heap, and the heap is not trimmed. Peak memory is unchanged: the step needs it anyway.
    Returns False where the C library is not glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


# ---- the process: take the run over, train it, and record how it ended ---------------------------------

def train(run_dir: Path, resume: str | None = None) -> int:
    """Train the run in `run_dir`; returns the process exit code (0 completed or stopped, 1 failed)."""
    run_dir = Path(run_dir).resolve()
    dist_info = Distributed()
    try:
        _quiet_process(run_dir)
        if dist_info.is_main:
            _take_over_status(run_dir)
        train_run(run_dir, resume, dist_info)
        return 0
    except BaseException as exc:  # the run folder must say what went wrong, whatever it was
        message = _error_sentence(exc, run_dir)
        traceback.print_exc()
        log(f"FAILED: {message}")
        _record_failure(run_dir, dist_info, message, lost_peer=dist_info.enabled and lost_a_peer(exc),
                        diverged=isinstance(exc, Diverged))
        return 1
    finally:
        dist_info.close()
        if dist_info.is_main:  # whoever finishes starts the next queued run; it never fails this one
            from .runs import start_after_run_end

            start_after_run_end()



def _quiet_process(run_dir: Path) -> None:
    """A readable train.log (distributed.quiet_log), and bitsandbytes kept out of a run that does not use it
    (models.keep_bitsandbytes_out: its import prints a warning about missing kernels). Parameters that do not
    read are left to train_run to report."""
    from .models import keep_bitsandbytes_out, needs_bitsandbytes
    from .params import TrainingParameters

    quiet_log()
    try:
        params = TrainingParameters.from_file(run_dir / PARAMS_FILE)
    except (DashboardError, OSError, ValueError):
        return
    if not needs_bitsandbytes(params.precision, params.optimizer):
        keep_bitsandbytes_out()


def _set_status(run_dir: Path, **changes) -> dict:
    """update_status under the run lock: the processes of a run (rank 0's progress, any rank's failure)
    read, change and write status.json one at a time, so none loses another's write."""
    with named_lock(run_lock_file(run_dir)):
        return update_status(run_dir, **changes)


def _take_over_status(run_dir: Path) -> None:
    """Mark the run as ours. The launcher holds the run lock while it writes `queued`; wait for it."""
    with named_lock(run_lock_file(run_dir)):
        previous = read_status(run_dir) or {}
        update_status(run_dir, state="running", **process_identity(os.getpid()),
                      started_at=previous.get("started_at") or now_iso(), finished_at=None, error=None,
                      failed_rank=None, diverged=False, message="loading the model and data")


def _failed_elsewhere(status: dict | None, rank: int) -> bool:
    """Whether status.json already holds the failure of another rank of this run."""
    return bool(status) and status.get("state") == "failed" and status.get("failed_rank") not in (None, rank)


def _record_failure(run_dir: Path, dist_info: Distributed, message: str, lost_peer: bool = False,
                    diverged: bool = False) -> None:
    """Write the failure (`diverged: true` when the loss or gradient norm blew up). In a multi-process run the
    first failure recorded wins: the others are its consequences (a peer gone). A process that only lost its
    peer first gives that peer's own report a moment to arrive, so the run names the rank that broke."""
    if lost_peer:
        deadline = time.monotonic() + PEER_FAILURE_WAIT_S
        while not _failed_elsewhere(read_status(run_dir), dist_info.rank) and time.monotonic() < deadline:
            time.sleep(0.05)
    with named_lock(run_lock_file(run_dir)):
        if dist_info.enabled:
            if _failed_elsewhere(read_status(run_dir), dist_info.rank):
                return
            message = f"Rank {dist_info.rank} of {dist_info.world} failed: {message}"
        update_status(run_dir, state="failed", error=message, finished_at=now_iso(),
                      failed_rank=dist_info.rank if dist_info.enabled else None,
                      **({"diverged": True} if diverged else {}))


def _error_sentence(exc: BaseException, run_dir: Path) -> str:
    if isinstance(exc, DashboardError):
        return exc.message
    if is_disk_full(exc):  # a checkpoint save says more itself (checkpoints.save_checkpoint)
        return disk_full_sentence(run_dir, f"Writing to the run folder ({type(exc).__name__}: {str(exc)[:120]})")
    text = str(exc) or type(exc).__name__
    if "out of memory" in text.lower() or isinstance(exc, MemoryError):
        return ("Out of memory. Lower the micro batch size or the cutoff length, or turn on gradient checkpointing "
                f"or a 4-bit base model. ({type(exc).__name__}: {text[:300]})")
    return f"{type(exc).__name__}: {text[:500]}"


# ---- the loop's counters ---------------------------------------------------------------------------------

class Progress:
    """Tokens trained (every process's), speed over the last logging window, elapsed time (a resumed run
    continues its checkpoint's), the ETA, the metrics lines they make, and the loop's bookkeeping time."""

    def __init__(self, plan: StepPlan, state: dict):
        self.plan = plan
        self.tokens = state["tokens"]
        self.started = time.perf_counter() - state["elapsed_s"]
        self.window_start, self.window_tokens = time.perf_counter(), 0
        self.step_times: list[float] = []  # the last 20 steps' durations, for the ETA
        # Time the loop spends writing metrics, status and checkpoints (reported at the end: it must stay small).
        self.bookkeeping_s = {"metrics and status": 0.0, "checkpoints": 0.0}
        self.loop_started = time.perf_counter()

    def count(self, tokens: int) -> None:
        self.window_tokens += tokens

    def step_took(self, seconds: float) -> None:
        self.step_times = (self.step_times + [seconds])[-20:]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def eta(self, step: int) -> float:
        return (self.plan.total - step) * sum(self.step_times) / len(self.step_times)

    def collect(self, dist_info: Distributed) -> int:
        """Add every process's tokens counted since the last collection (a collective); returns the total."""
        window = int(dist_info.sum(self.window_tokens))
        self.tokens, self.window_tokens = self.tokens + window, 0
        return window

    def lap(self, dist_info: Distributed) -> float:
        """Collect the window's tokens; returns its speed in tokens/s. The next window starts now."""
        now = time.perf_counter()
        speed = self.collect(dist_info) / max(now - self.window_start, 1e-9)
        self.window_start = now
        return speed

    def restart_window(self) -> None:
        """Start the speed window anew (after a checkpoint, whose saving is not training speed)."""
        self.window_start = time.perf_counter()

    def train_line(self, step: int, loss: float, learning_rate: float, grad_norm: float, speed: float,
                   eta: float) -> dict:
        return {"step": step, "total_steps": self.plan.total, "epoch": step / self.plan.per_epoch, "loss": loss,
                "learning_rate": learning_rate, "grad_norm": grad_norm, "tokens": self.tokens,
                "tokens_per_second": speed, "elapsed_s": self.elapsed(), "eta_s": eta}

    def eval_line(self, step: int, eval_loss: float) -> dict:
        return {"step": step, "total_steps": self.plan.total, "epoch": step / self.plan.per_epoch,
                "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 700))}

    @contextmanager
    def timed(self, what: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.bookkeeping_s[what] += time.perf_counter() - started

    def bookkeeping_sentence(self) -> str:
        loop_s = time.perf_counter() - self.loop_started
        share = 100 * sum(self.bookkeeping_s.values()) / max(loop_s, 1e-9)
        return ("Bookkeeping in the loop: " + ", ".join(f"{name} {s:.2f} s" for name, s in self.bookkeeping_s.items())
                + f", of {loop_s:.1f} s ({share:.1f}%).")


# ---- the loop --------------------------------------------------------------------------------------------

def train_run(run_dir: Path, resume: str | None = None, dist_info: Distributed | None = None):
    """The training loop. Returns the trained PEFT model (tests compare it with the saved adapter)."""
    from .batching import trained_targets
    from .lora import Trainee, evaluate

    dist_info = dist_info or Distributed()
    main, world = dist_info.is_main, dist_info.world
    stop = StopRequested(run_dir)
    params = _read_parameters(run_dir, world)
    device = _start_device(params, dist_info)
    data = TrainingData.prepare(params, world)
    plan = data.plan
    checkpoint = find_checkpoint(run_dir, resume) if resume is not None else None
    trainee = Trainee.build(params, device, checkpoint, dist_info, plan.total, run_dir)
    state = _resume_or_begin(run_dir, checkpoint, trainee, dist_info, plan)
    metrics = MetricsWriter(run_dir / METRICS_FILE) if main else None
    progress = Progress(plan, state)
    watch = DivergenceWatch()  # trainer/divergence.py: the rule that says a run has blown up
    step = state["step"]
    end_state, reason = "completed", "reached the last step"

    while step < plan.total:
        step_started = time.perf_counter()
        _injected_fault(dist_info.rank, step)
        micro_batches, weights = data.micro_batches(step, dist_info.rank, device)
        # The step's loss is the mean over every trained token of the whole global batch. DDP averages
        # gradients over processes, so each process scales its sum by the world size.
        targets = dist_info.sum(sum(trained_targets(b["labels"]) * w for b, w in zip(micro_batches, weights)))
        loss_local = 0.0
        for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
            with trainee.gradient_sync(last=i == len(micro_batches) - 1):
                loss = trainee.loss_sum(batch) * (weight * world / max(targets, 1))
                loss.backward()
            loss_local += float(loss.detach()) / world
            progress.count(batch["real_tokens"] if weight else 0)
        loss_total = dist_info.sum(loss_local)
        learning_rate, grad_norm = trainee.optimizer_step(params.max_grad_norm)
        step += 1
        progress.step_took(time.perf_counter() - step_started)
        stopping = dist_info.any(bool(stop))  # every process stops after the same step

        verdict = watch.observe(step, loss_total, grad_norm)
        if (problem := loss_problem(loss_total, step)) or verdict:
            progress.collect(dist_info)
            if main:
                metrics.write(progress.train_line(step, loss_total, learning_rate, grad_norm, speed=0.0, eta=0.0))
                _set_status(run_dir, step=step)
            raise _broken_run_error(run_dir, params.learning_rate, step, loss_total, problem, verdict,
                                    since=watch.rise_began or step)

        if step % params.logging_steps == 0 or step == plan.total or stopping:
            with progress.timed("metrics and status"):
                speed = progress.lap(dist_info)
                if main:
                    _report(run_dir, metrics, progress.train_line(step, loss_total, learning_rate, grad_norm,
                                                                  speed, progress.eta(step)))

        if data.eval_samples and (step % params.eval_steps == 0 or step == plan.total):
            # Rank 0 evaluates alone, except under FSDP where every forward pass needs every process.
            if main or trainee.sharded:
                eval_loss = evaluate(trainee.peft_model, data.eval_samples, params.micro_batch_size, data.pad_id,
                                     device)
            if main:
                metrics.write(progress.eval_line(step, eval_loss))
                log(f"step {step}: eval loss {eval_loss:.4f}")
            dist_info.barrier()

        if params.stop_at_loss and loss_total < params.stop_at_loss:
            reason = f"the loss {loss_total:.4f} fell below stop-at-loss {params.stop_at_loss}"
            break
        if stopping:
            end_state, reason = "stopped", "a stop was requested"
            break
        if params.save_steps and step % params.save_steps == 0 and step < plan.total:
            with progress.timed("checkpoints"):
                # While the loss is far above its start, older checkpoints are kept: they may be the good ones.
                _save_checkpoint(run_dir, step, trainee, progress, dist_info,
                                 keep=0 if watch.suspect else params.save_total_limit)
            progress.restart_window()
            dist_info.barrier()

    log(progress.bookkeeping_sentence())
    _finish(run_dir, step, end_state, reason, trainee, progress, dist_info, metrics, params.save_total_limit)
    return trainee.peft_model


# ---- before the loop, its reports, and after it ------------------------------------------------------------

def _read_parameters(run_dir: Path, world: int):
    """The run's parameters, refused (with the field to fix) before anything heavy is loaded."""
    from .models import bitsandbytes_problem
    from .params import TrainingParameters, batch_problem

    params = TrainingParameters.from_file(run_dir / PARAMS_FILE).validate(require_name=False)
    if problem := batch_problem(params.batch_size, params.micro_batch_size, world):
        raise DashboardError(problem, field="batch_size")
    if bnb_message := bitsandbytes_problem(params.precision, params.optimizer):
        raise DashboardError(bnb_message, field="precision")
    return params


def _start_device(params, dist_info: Distributed) -> str:
    """Join the process group, tune the CPU when training on it, and seed every random generator."""
    import torch

    device = dist_info.start()
    if device == "cpu":
        torch.set_num_threads(dist_info.cpu_threads())
        keep_freed_memory_for_reuse()
    torch.manual_seed(params.seed)
    random.seed(params.seed)
    return device


def _resume_or_begin(run_dir: Path, checkpoint: Path | None, trainee, dist_info: Distributed,
                     plan: StepPlan) -> dict:
    """The loop state to start from (the checkpoint's when resuming), once status.json says the run began."""
    state = loop_state(step=0, tokens=0, elapsed_s=0.0, total_steps=plan.total)
    if checkpoint is not None:
        state = trainee.load_checkpoint(checkpoint)
        if dist_info.is_main:
            truncate_metrics_after(run_dir, state["step"])
        log(f"Resumed from {checkpoint.name} at step {state['step']}.")
    dist_info.barrier()  # every rank has read the stop file's absence and the checkpoint before rank 0 changes them
    if dist_info.is_main:
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        for leftover in remove_leftovers(run_dir):
            log(f"Removed {leftover}, left by an interrupted checkpoint save.")
        _set_status(run_dir, step=state["step"], total_steps=plan.total, message=None, world_size=dist_info.world,
                    resumed_from=checkpoint.name if checkpoint else None)
    dist_info.barrier()
    return state


def _report(run_dir: Path, metrics: MetricsWriter, line: dict) -> None:
    """A step's metrics line, status and log line (rank 0)."""
    metrics.write(line)
    _set_status(run_dir, step=line["step"], total_steps=line["total_steps"], epoch=line["epoch"])
    log(f"step {line['step']}/{line['total_steps']} loss {line['loss']:.4f} lr {line['learning_rate']:.3g} "
        f"{line['tokens_per_second']:.0f} tok/s eta {line['eta_s']:.0f}s")


def _save_checkpoint(run_dir: Path, step: int, trainee, progress: Progress, dist_info: Distributed,
                     states: tuple | None = None, keep: int = 0) -> None:
    """checkpoint-STEP/ with every process's tokens so far; every process calls it (FSDP gathers the states).
    Once it is complete, with `keep` > 0 (save_total_limit), the older checkpoints beyond the newest `keep`
    are deleted."""
    progress.collect(dist_info)
    states = states or trainee.full_states()
    if dist_info.is_main:
        saved = trainee.save_checkpoint(run_dir, step, states, loop_state(step, progress.tokens, progress.elapsed(),
                                                                           progress.plan.total))
        deleted = prune_checkpoints(run_dir, keep, saved)
        log(f"saved checkpoint-{step}" + (f"; deleted {', '.join(deleted)} (keep the last {keep})" * bool(deleted)))


def _broken_run_error(run_dir: Path, learning_rate: float, step: int, loss: float, problem: str | None,
                      verdict, since: int) -> DashboardError:
    """The error ending a broken run (no checkpoint is saved after it). A divergence (DivergenceWatch's verdict,
    or a loss that stopped being finite after the first step) is a Diverged naming the newest checkpoint from
    before step `since`, when the blow-up began; an exact 0.0, or a first step already broken, is a plain
    failure."""
    good = [c.name for c in list_checkpoints(run_dir) if step_of(c) < since]
    if not problem:
        return Diverged(verdict.sentence(learning_rate, good[-1] if good else None))
    if math.isfinite(loss) or step == 1:
        return DashboardError(problem)
    return Diverged(problem + (f" The last good checkpoint is {good[-1]}." if good else ""))


def _finish(run_dir: Path, step: int, end_state: str, reason: str, trainee, progress: Progress,
            dist_info: Distributed, metrics: MetricsWriter | None, keep: int = 0) -> None:
    """The adapter, a checkpoint to resume from when stopped early, and the final status."""
    states = trainee.full_states()
    if end_state == "stopped" and step < progress.plan.total:
        _save_checkpoint(run_dir, step, trainee, progress, dist_info, states, keep)
    if dist_info.is_main:
        trainee.save_adapter(run_dir, states[0])
        metrics.close()
        log(f"Run {end_state} at step {step}/{progress.plan.total}: {reason}. Adapter saved in {run_dir}.")
        _set_status(run_dir, state=end_state, step=step, total_steps=progress.plan.total, finished_at=now_iso(),
                    reason=reason, error=None)
        (run_dir / STOP_FILE).unlink(missing_ok=True)
    dist_info.barrier()


def _injected_fault(rank: int, step: int) -> None:
    """Fault injection for the reliability tests: LORA_DASHBOARD_FAULT="RANK:STEP:message" raises there."""
    fault = os.environ.get("LORA_DASHBOARD_FAULT")
    if fault:
        fault_rank, fault_step, message = fault.split(":", 2)
        if int(fault_rank) == rank and int(fault_step) == step:
            raise RuntimeError(message)
