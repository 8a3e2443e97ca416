"""Helpers for tests that run the trainer: write a run folder, run it, read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from trainer.home import CODE_ROOT

TINY_PARAMS = {
    "base_model": "tiny-llama", "raw_text_file": "user-guide.txt", "cutoff_len": 64, "overlap_len": 16,
    "micro_batch_size": 2, "batch_size": 4, "learning_rate": "3e-3", "lora_rank": 8, "lora_alpha": 16,
    "warmup_steps": 1, "seed": 7,
}


def write_run(home: Path, name: str, **overrides) -> Path:
    run_dir = home / "loras" / name
    run_dir.mkdir(parents=True)
    params = {**TINY_PARAMS, "lora_name": name, **overrides}
    (run_dir / "training_parameters.json").write_text(json.dumps(params))
    return run_dir


def trainer_command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir), *extra]


def run_trainer(run_dir: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(trainer_command(run_dir, *extra), cwd=CODE_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_trainer(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(run_dir / "train.log", "a")
    return subprocess.Popen(trainer_command(run_dir, *extra), cwd=CODE_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout: float = 120, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def status_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
