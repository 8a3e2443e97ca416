"""The run queue with real trainer processes (issue 13): Start on a busy device queues the run, the runs then
go one after another to the end with no page or server open (whoever finishes starts the next), a queued
run's Stop cancels it, and a queued resume resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import runqueue
from trainer.home import CODE_ROOT
from trainer.params import TrainingParameters
from trainer.runfiles import read_metrics, read_status, request_stop
from trainer.runs import launch, live_on_device, start_now, start_waiting_runs

from .trainhelpers import TINY_PARAMS, wait_for

FINAL = ("completed", "stopped", "failed")
STEPS = 20  # of the run stopped after its first checkpoint: enough that the stop comes before its end


def tiny(name: str, **overrides) -> TrainingParameters:
    return TrainingParameters.from_dict({**TINY_PARAMS, "lora_name": name, "max_steps": 2, **overrides})


def final_status(run_dir: Path, timeout: float = 90) -> dict:
    return wait_for(lambda: (s := read_status(run_dir) or {}).get("state") in FINAL and s, timeout=timeout,
                    what=f"{run_dir.name} to end")


def launches(run_dir: Path) -> list[str]:
    log = run_dir / "train.log"
    return [line for line in log.read_text().splitlines() if line.startswith("=== ")] if log.exists() else []


def kill_all(home: Path) -> None:
    """Cleanup: kill any run a failed assertion left live."""
    for run_dir in (p for p in (home / "loras").iterdir() if p.is_dir()):
        status = read_status(run_dir) or {}
        if status.get("state") in ("queued", "running") and status.get("pid"):
            try:
                os.killpg(status["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def cleanup(home):
    yield home
    runqueue.queue_path().unlink(missing_ok=True)  # nothing waiting may start while the runs are killed
    kill_all(home)


def test_three_starts_on_one_device_give_one_running_and_two_queued_that_run_in_order(cleanup):
    home = cleanup
    dirs = [launch(tiny(f"q{i}")) for i in range(3)]
    first, *waiting = dirs
    assert read_status(first)["state"] in ("queued", "running") and not read_status(first).get("waiting")  # started
    assert read_status(first)["device"] == "cpu" and read_status(first)["pid"]
    for run_dir in waiting:
        status = read_status(run_dir)
        assert status["state"] == "queued" and status["waiting"] and status["pid"] is None, status
        assert launches(run_dir) == []  # no process yet
    assert [e["name"] for e in runqueue.read_queue()] == ["q1", "q2"]
    assert [runqueue.position(d.name) for d in waiting] == [1, 2]
    assert live_on_device("cpu") == ["q0"]
    # Nothing else is called from here on: each trainer starts the next one as it ends.
    ends = [final_status(d) for d in dirs]
    assert [s["state"] for s in ends] == ["completed"] * 3, ends
    assert all(len(launches(d)) == 1 for d in dirs)  # each started exactly once
    assert all(s["step"] == 2 for s in ends)
    for before, after in zip(ends, ends[1:]):
        assert before["started_at"] <= before["finished_at"] <= after["started_at"], (before, after)
    assert runqueue.read_queue() == []
    assert start_waiting_runs() == []  # a page load afterwards has nothing to start
    assert all((d / "adapter_model.safetensors").exists() for d in dirs)


# The server starts a run and queues another, then dies the hard way: no page, no server is left.
OLD_SERVER = """
import json, os, signal, sys
from trainer.params import TrainingParameters
from trainer.runs import launch
for params in json.loads(sys.argv[1]):
    launch(TrainingParameters.from_dict(params))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_queue_goes_on_with_no_page_or_server_open(cleanup):
    home = cleanup
    params = [{**TINY_PARAMS, "lora_name": name, "max_steps": 2} for name in ("s1", "s2")]
    env = dict(os.environ, PYTHONPATH=str(CODE_ROOT))
    old = subprocess.run([sys.executable, "-c", OLD_SERVER, json.dumps(params)], cwd=CODE_ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert old.returncode == -signal.SIGKILL, old.stderr
    s1, s2 = home / "loras" / "s1", home / "loras" / "s2"
    assert final_status(s1)["state"] == "completed"
    assert final_status(s2)["state"] == "completed", read_status(s2)
    assert "Started the next queued run: s2." in (s1 / "train.log").read_text()


def test_a_queued_runs_stop_cancels_it_and_a_queued_resume_resumes(cleanup):
    home = cleanup
    # A run stopped after its first checkpoint, to be resumed later.
    old = launch(tiny("old", max_steps=STEPS, save_steps=1))
    wait_for(lambda: (old / "checkpoint-1").is_dir(), timeout=90, what="old's first checkpoint")
    request_stop(old)
    stopped = final_status(old)
    assert stopped["state"] == "stopped", stopped
    done = stopped["step"]

    busy = launch(tiny("busy", max_steps=100_000))
    wait_for(lambda: read_status(busy)["state"] == "running", timeout=60, what="busy to run")
    waiter = launch(tiny("waiter"))
    again = launch(tiny("old"), mode="resume", checkpoint="latest")
    assert again == old and runqueue.is_waiting(read_status(old))
    assert runqueue.entry("old")["mode"] == "resume"
    assert [e["name"] for e in runqueue.read_queue()] == ["waiter", "old"]

    request_stop(waiter)  # Stop on a queued run: it leaves the queue and never starts
    status = read_status(waiter)
    assert status["state"] == "stopped" and not status["waiting"] and "cancelled" in status["reason"], status
    assert [e["name"] for e in runqueue.read_queue()] == ["old"]

    start_now("old")  # "start now": beside the busy run
    assert runqueue.read_queue() == []
    resumed = final_status(old)
    assert resumed["state"] == "completed" and resumed["step"] == STEPS, resumed
    assert resumed["resumed_from"] == f"checkpoint-{done}"
    steps = [r["step"] for r in read_metrics(old) if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps  # it continued the same run, no step twice
    assert read_status(busy)["state"] == "running"  # it ran beside it

    request_stop(busy)
    assert final_status(busy)["state"] == "stopped"
    assert launches(waiter) == [] and not read_metrics(waiter)  # the cancelled run never started
    assert read_status(waiter)["state"] == "stopped"
