"""Helpers for the Evaluate tests: a really trained tiny run (trained once per session and copied into each
test's home), synthetic run folders, a 200,000-line metrics file, and polling."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from trainer.home import CODE_ROOT, HOME_ENV
from trainer.processes import process_start_time

from .trainhelpers import wait_for as poll_until

TRAINED_PARAMS = {
    "base_model": "tiny-llama", "raw_text_file": "user-guide.txt", "cutoff_len": 64, "overlap_len": 16,
    "micro_batch_size": 2, "batch_size": 4, "max_steps": 6, "save_steps": 2, "learning_rate": "1e-2",
    "lora_rank": 8, "lora_alpha": 16, "warmup_steps": 1, "seed": 3, "target_modules": "q-k-v-o",
}
_trained: dict[str, Path] = {}


def trained_run_source(tiny_model_dir: Path, scratch: Path) -> Path:
    """A finished tiny run folder (6 steps, checkpoints 2 and 4), trained once per test session."""
    if "run" in _trained:
        return _trained["run"]
    home = scratch / "trained-home"
    (home / "models").mkdir(parents=True)
    os.symlink(tiny_model_dir, home / "models" / "tiny-llama")
    shutil.copytree(CODE_ROOT / "datasets", home / "datasets")
    run_dir = home / "loras" / "trained"
    run_dir.mkdir(parents=True)
    (run_dir / "training_parameters.json").write_text(json.dumps({**TRAINED_PARAMS, "lora_name": "trained"}))
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{HOME_ENV: str(home)})
    done = subprocess.run([sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir)], cwd=CODE_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    _trained["run"] = run_dir
    return run_dir


def copy_run(source: Path, home: Path, name: str | None = None) -> Path:
    target = home / "loras" / (name or source.name)
    shutil.copytree(source, target)
    return target


def write_status(run_dir: Path, state: str, **extra) -> None:
    status = {"state": state, "pid": None, "started_at": "2026-01-02T10:00:00+00:00",
              "finished_at": None if state in ("running", "queued") else "2026-01-02T10:05:00+00:00",
              "step": extra.pop("step", None), "total_steps": extra.pop("total_steps", None), "error": None, **extra}
    (run_dir / "status.json").write_text(json.dumps(status))


def train_line(step: int, total: int, loss: float, elapsed: float, per_epoch: int = 10) -> str:
    return json.dumps({"step": step, "total_steps": total, "epoch": step / per_epoch, "loss": loss,
                       "learning_rate": 3e-4 * (1 - step / (total + 1)), "grad_norm": 0.5, "tokens": step * 512,
                       "tokens_per_second": 1000.0 + step % 7, "elapsed_s": elapsed, "eta_s": 1.0,
                       "time": "2026-01-02T10:00:00+00:00"}) + "\n"


def eval_line(step: int, total: int, eval_loss: float, per_epoch: int = 10) -> str:
    return json.dumps({"step": step, "total_steps": total, "epoch": step / per_epoch, "eval_loss": eval_loss,
                       "eval_perplexity": math.exp(eval_loss), "time": "2026-01-02T10:00:00+00:00"}) + "\n"


def make_run(home: Path, name: str, params: dict | None = None, losses: list[float] | None = None,
             evals: dict[int, float] | None = None, state: str | None = "completed", **status) -> Path:
    """A synthetic run folder: parameters, metrics lines (train losses by step, eval losses) and a status."""
    run_dir = home / "loras" / name
    run_dir.mkdir(parents=True)
    base = {"lora_name": name, "base_model": "tiny-llama", "raw_text_file": "user-guide.txt", "lora_rank": 8,
            "lora_alpha": 16, "learning_rate": 3e-4, "cutoff_len": 64, "batch_size": 4, "micro_batch_size": 2}
    (run_dir / "training_parameters.json").write_text(json.dumps({**base, **(params or {})}))
    losses = losses or []
    total = status.pop("total_steps", len(losses))
    with open(run_dir / "metrics.jsonl", "w") as handle:
        for step, loss in enumerate(losses, start=1):
            handle.write(train_line(step, total, loss, elapsed=step * 2.0))
            if evals and step in evals:
                handle.write(eval_line(step, total, evals[step]))
    if state:
        write_status(run_dir, state, step=status.pop("step", len(losses)), total_steps=total, **status)
    return run_dir


def make_running_run(home: Path, name: str = "running") -> Path:
    """A run whose status names a live process (this test process), as a trainer would while it trains."""
    run_dir = make_run(home, name, losses=[2.5, 2.4, 2.2], state=None)
    write_status(run_dir, "running", pid=os.getpid(), pid_start_time=process_start_time(os.getpid()), step=3,
                 total_steps=50)
    return run_dir


def make_webui_run(home: Path, name: str = "webui-lora", log_as_list: bool = False) -> Path:
    """A text-generation-webui run: its training_parameters.json and training_log.json, no metrics.jsonl."""
    run_dir = home / "loras" / name
    run_dir.mkdir(parents=True)
    (run_dir / "training_parameters.json").write_text(json.dumps({
        "lora_name": name, "always_override": False, "save_steps": 0, "micro_batch_size": 4, "batch_size": 128,
        "epochs": 3, "learning_rate": "3e-4", "lr_scheduler_type": "linear", "lora_rank": 32, "lora_alpha": 64,
        "lora_dropout": 0.05, "cutoff_len": 256, "dataset": "None", "eval_dataset": "None", "format": "None",
        "eval_steps": 100, "raw_text_file": "user-guide", "overlap_len": 128, "newline_favor_len": 128,
        "higher_rank_limit": False, "warmup_steps": 100, "optimizer": "adamw_torch", "hard_cut_string": "\\n\\n\\n",
        "train_only_after": "", "stop_at_loss": 0, "add_eos_token": False, "min_chars": 0, "report_to": "None"}))
    entries = [{"base_model_name": "tiny-llama", "base_model_class": "LlamaForCausalLM", "loss": loss,
                "learning_rate": 3e-4, "epoch": step / 20, "current_steps": step}
               for step, loss in ((10, 2.9), (20, 2.1), (30, 1.7))]
    log = entries if log_as_list else entries[-1]
    (run_dir / "training_log.json").write_text(json.dumps(log))
    (run_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "models/tiny-llama",
                                                             "peft_type": "LORA", "r": 32}))
    (run_dir / "adapter_model.safetensors").write_bytes(b"not read by these tests")
    return run_dir


BIG_LINES = 200_000
ZERO_STEP = 123_457  # the one step whose loss is exactly 0.0


def write_big_metrics(path: Path, lines: int = BIG_LINES, eval_every: int = 1000) -> None:
    """`lines` train lines (plus an eval line every `eval_every` steps); one loss is exactly 0.0."""
    with open(path, "w") as handle:
        chunk = []
        for step in range(1, lines + 1):
            loss = 0.0 if step == ZERO_STEP else 0.5 + 2.0 * math.exp(-step / 40_000) + (step * 7919 % 13) / 50
            chunk.append(f'{{"step": {step}, "total_steps": {lines}, "epoch": {step / 10_000}, "loss": {loss}, '
                         f'"learning_rate": {3e-4 * (1 - step / lines)}, "grad_norm": 0.5, "tokens": {step * 512}, '
                         f'"tokens_per_second": {900 + step % 200}.0, "elapsed_s": {step * 0.25}, "eta_s": 1.0, '
                         f'"time": "2026-01-02T10:00:00+00:00"}}\n')
            if step % eval_every == 0:
                chunk.append(f'{{"step": {step}, "total_steps": {lines}, "epoch": {step / 10_000}, '
                             f'"eval_loss": {1.0 + 1000 / step}, "eval_perplexity": {math.exp(1.0 + 1000 / step)}, '
                             f'"time": "2026-01-02T10:00:00+00:00"}}\n')
            if len(chunk) > 20_000:
                handle.write("".join(chunk))
                chunk = []
        handle.write("".join(chunk))


def make_big_run(home: Path, name: str = "big") -> Path:
    run_dir = make_run(home, name, params={"learning_rate": 1e-4, "max_steps": BIG_LINES}, state=None)
    write_big_metrics(run_dir / "metrics.jsonl")
    write_status(run_dir, "completed", step=BIG_LINES, total_steps=BIG_LINES)
    return run_dir


def wait_for(predicate, timeout: float = 120, interval: float = 0.2, what: str = "condition"):
    """trainhelpers.wait_for polling less often: these predicates read whole pages' worth of files."""
    return poll_until(predicate, timeout, interval, what)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS` in the current home (the `home` fixture sets LORA_DASHBOARD_HOME)."""
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=CODE_ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)
