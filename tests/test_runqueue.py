"""The run queue's rules on their own (trainer/runqueue.py): order, one run per device, exactly-once starts,
cancel and reorder, and a waiting run never taken for a dead one. The real trainer goes through it in
tests/test_train_page.py and the browser journey."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import types
import time
from pathlib import Path

import pytest

from trainer import runqueue
from trainer.errors import DashboardError
from trainer.processes import process_identity
from trainer.runfiles import effective_status, read_status
from trainer.storage import write_json_atomic


def prepared(home: Path, name: str) -> Path:
    run_dir = home / "loras" / name
    run_dir.mkdir(parents=True)
    (run_dir / "training_parameters.json").write_text(json.dumps({"lora_name": name}))
    return run_dir


def run_folders(home: Path):
    return lambda: sorted(p for p in (home / "loras").iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.fixture
def sleeper():
    """A live process standing in for a trainer (its pid and start time name a running run)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def fake_start(process):
    """A start that marks the run running under `process`, as the launcher and trainer would."""
    def start(run_dir: Path) -> None:
        status = read_status(run_dir) or {}
        write_json_atomic(run_dir / "status.json", {**status, "state": "running", "waiting": False,
                                                    **process_identity(process.pid)})
    return start


def finish(run_dir: Path) -> None:
    write_json_atomic(run_dir / "status.json", {**read_status(run_dir), "state": "completed"})


def test_three_runs_on_one_device_run_one_after_another(home, sleeper):
    runs = [prepared(home, f"q{i}") for i in range(3)]
    for run_dir in runs:
        runqueue.add(run_dir, "cpu")
    assert [runqueue.position(r.name) for r in runs] == [1, 2, 3]
    assert all(effective_status(r)["state"] == "queued" for r in runs)
    start, listed = fake_start(sleeper), run_folders(home)

    assert runqueue.start_next(start, listed) == ["q0"]
    assert runqueue.start_next(start, listed) == []  # the CPU is busy: nothing more starts
    assert [e["name"] for e in runqueue.read_queue()] == ["q1", "q2"]
    finish(runs[0])
    assert runqueue.start_next(start, listed) == ["q1"]
    finish(runs[1])
    assert runqueue.start_next(start, listed) == ["q2"]
    assert runqueue.read_queue() == []


def test_each_device_has_its_own_queue_and_a_multi_gpu_run_takes_its_gpus(home, sleeper):
    for name, device in (("big", "cuda:0,1"), ("a0", "cuda:0"), ("a1", "cuda:1"), ("c", "cpu")):
        runqueue.add(prepared(home, name), device)
    start, listed = fake_start(sleeper), run_folders(home)
    assert runqueue.start_next(start, listed) == ["big", "c"]  # a0 and a1 wait for big's two GPUs
    finish(home / "loras" / "big")
    assert runqueue.start_next(start, listed) == ["a0", "a1"]
    assert runqueue.devices_meet("cuda:0,1", "cuda:1") and not runqueue.devices_meet("cuda:0", "cpu")
    assert runqueue.device_for(2, gpus=4) == "cuda:0,1" and runqueue.device_for(3, gpus=0) == "cpu"


def test_a_waiting_run_is_not_taken_for_a_dead_one(home):
    run_dir = prepared(home, "waiting")
    runqueue.add(run_dir, "cpu")
    old = time.time() - 3600
    os.utime(run_dir / "status.json", (old, old))  # long past the grace period of a launched run
    status = effective_status(run_dir)
    assert status["state"] == "queued" and not status.get("process_gone")


def test_cancel_and_reorder(home, sleeper):
    runs = [prepared(home, f"r{i}") for i in range(4)]
    for run_dir in runs:
        runqueue.add(run_dir, "cpu")
    runqueue.move("r3", -2)
    assert [e["name"] for e in runqueue.read_queue()] == ["r0", "r3", "r1", "r2"]
    runqueue.move("r0", +10)
    assert [e["name"] for e in runqueue.read_queue()] == ["r3", "r1", "r2", "r0"]
    runqueue.cancel(runs[1])
    assert [e["name"] for e in runqueue.read_queue()] == ["r3", "r2", "r0"]
    cancelled = read_status(runs[1])
    assert cancelled["state"] == "stopped" and "cancelled" in cancelled["reason"]
    with pytest.raises(DashboardError):
        runqueue.cancel(runs[1])
    assert runqueue.start_next(fake_start(sleeper), run_folders(home)) == ["r3"]


def test_a_run_that_cannot_start_fails_with_its_reason_and_the_next_one_goes(home, sleeper):
    bad, good = prepared(home, "bad"), prepared(home, "good")
    runqueue.add(bad, "cpu")
    runqueue.add(good, "cpu")
    started_fine = fake_start(sleeper)

    def start(run_dir: Path) -> None:
        if run_dir.name == "bad":
            raise DashboardError("The data set went away.")
        started_fine(run_dir)

    assert runqueue.start_next(start, run_folders(home)) == ["good"]
    assert read_status(bad)["state"] == "failed" and read_status(bad)["error"] == "The data set went away."


def _race(home: str, pid: int, barrier, log: str) -> None:
    os.environ["LORA_DASHBOARD_HOME"] = home
    process = type("P", (), {"pid": pid})()
    base = fake_start(process)

    def start(run_dir: Path) -> None:
        with open(log, "a") as handle:
            handle.write(run_dir.name + "\n")
        base(run_dir)

    barrier.wait()
    runqueue.start_next(start, run_folders(Path(home)))


def test_two_processes_that_finish_at_the_same_moment_start_the_next_run_once(home, sleeper, tmp_path, monkeypatch):
    # A page script run by AppTest in an earlier test stays the __main__ module, and a spawned process runs
    # __main__'s file again: the Train page would then start the queue's first run itself.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    for i in range(5):
        runqueue.add(prepared(home, f"s{i}"), "cpu")
    log = tmp_path / "starts.log"
    context = multiprocessing.get_context("spawn")
    for _ in range(5):  # several rounds: the order the two processes reach the lock in varies
        barrier = context.Barrier(2)
        callers = [context.Process(target=_race, args=(str(home), sleeper.pid, barrier, str(log)))
                   for _ in range(2)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(60)
            assert caller.exitcode == 0
        started = log.read_text().split() if log.exists() else []
        assert len(started) == len(set(started)), started
        live = [r for r in run_folders(home)() if read_status(r)["state"] == "running"]
        assert len(live) == 1, [r.name for r in live]
        finish(live[0])
    assert log.read_text().split() == ["s0", "s1", "s2", "s3", "s4"]


def test_the_queue_as_the_train_page_lists_it(home, sleeper):
    """runs.queue_rows: each waiting run with its device in words, its place among the runs of that device,
    what it does when it starts, and the live runs a "start now" would run it beside."""
    from trainer.runs import queue_rows

    for name, device in (("c1", "cpu"), ("g1", "cuda:0"), ("c2", "cpu")):
        runqueue.add(prepared(home, name), device)
    runqueue.add(prepared(home, "again"), "cpu", mode="resume", checkpoint="checkpoint-4")
    live = prepared(home, "live")
    write_json_atomic(live / "status.json", {"state": "running", "device": "cpu", **process_identity(sleeper.pid)})
    rows = queue_rows()
    assert [(r["name"], r["device"], r["place"], r["of"], r["mode"]) for r in rows] == [
        ("c1", "the CPU", 1, 3, "start"), ("g1", "GPU 0", 1, 1, "start"), ("c2", "the CPU", 2, 3, "start"),
        ("again", "the CPU", 3, 3, "resume from checkpoint-4")]
    assert [r["beside"] for r in rows] == [["live"], [], ["live"], ["live"]]
    assert all(r["queued_at"] for r in rows)
    runqueue.move("again", -5)
    assert [r["name"] for r in queue_rows()] == ["again", "c1", "g1", "c2"]  # the GPU's run keeps its place


def test_an_action_on_a_run_that_left_the_queue_says_so(home, sleeper):
    run_dir = prepared(home, "gone")
    runqueue.add(run_dir, "cpu")
    runqueue.cancel(run_dir)
    for action in (lambda: runqueue.move("gone", 1), lambda: runqueue.cancel(run_dir),
                   lambda: runqueue.start_one("gone", fake_start(sleeper), run_folders(home))):
        with pytest.raises(DashboardError, match="gone is no longer waiting in the queue: it has started or was "
                                                 "cancelled."):
            action()
