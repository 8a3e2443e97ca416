"""Faults (issue 5, item 2): what a person sees when things go wrong around a run.

Already covered elsewhere, not repeated here: a trainer killed with SIGKILL mid-run shows failed/process gone
through effective_status, its metrics stay readable and `--resume` continues the same schedule
(test_train.py::test_sigkill_then_resume_continues_the_same_schedule); an exception or a NaN loss ends the run
failed with a sentence (test_train.py); a dead rank fails a two-process run (test_distributed.py); torn lines
in the Evaluate page's metrics reader (test_evaluate.py::test_metrics_frame_skips_torn_and_broken_lines_...).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from trainer.errors import DashboardError
from trainer.home import CODE_ROOT
from trainer.params import TrainingParameters
from trainer.runfiles import (
    effective_status, iter_metrics, read_metrics, read_status, request_stop, write_json_atomic,
)
from trainer.processes import process_start_time
from trainer.runs import launch
from trainer.checkpoints import list_checkpoints

from .evalhelpers import copy_run, trained_run_source
from .homefiles import snapshot
from .trainhelpers import TINY_PARAMS, wait_for, write_run

TRAIN_PAGE = str(CODE_ROOT / "views" / "train.py")
DATA_PAGE = str(CODE_ROOT / "views" / "data.py")


def open_page(path: str = TRAIN_PAGE) -> AppTest:
    at = AppTest.from_file(path, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def page_text(at: AppTest) -> str:
    return " ".join(m.value for m in at.markdown)


def page_errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def launch_lines(run_dir: Path) -> list[str]:
    return [line for line in (run_dir / "train.log").read_text().splitlines() if line.startswith("=== ")]


def trainer_pid(run_dir: Path) -> int:
    return wait_for(lambda: (read_status(run_dir) or {}).get("pid"), what="the trainer's pid")


def kill_group(pid: int | None) -> None:
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def two_clicks_at_once(start) -> tuple[list[Path], list[DashboardError]]:
    """Call `start` from two threads released together, like two Start clicks at once: the run folders
    started and the sentences refused."""
    barrier = threading.Barrier(2)
    outcomes: list = []

    def click():
        barrier.wait()
        try:
            outcomes.append(start())
        except DashboardError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=click) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ([o for o in outcomes if isinstance(o, Path)], [o for o in outcomes if isinstance(o, DashboardError)])


def run_end(run_dir: Path) -> dict:
    """The final status of a run, once it has completed or failed."""
    return wait_for(lambda: (s := read_status(run_dir) or {}).get("state") in ("completed", "failed") and s,
                    timeout=180, what=f"{run_dir.name} to end")


def end_run(run_dir: Path) -> None:
    """Cleanup: kill a run that a failed assertion left running."""
    status = read_status(run_dir) or {}
    if status.get("state") in ("queued", "running"):
        kill_group(status.get("pid"))


# ---- liveness: a dead pid, a reused pid ----------------------------------------------------------
def test_queued_run_whose_process_died_is_failed_after_the_grace_period(tmp_path):
    run_dir = tmp_path / "queued"
    run_dir.mkdir()
    write_json_atomic(run_dir / "status.json", {"state": "queued", "pid": dead_pid(), "pid_start_time": 1,
                                                "step": 0, "error": None})
    # Just written: the launcher writes `queued` a moment before the trainer takes over, so it is believed.
    assert effective_status(run_dir)["state"] == "queued"
    old = time.time() - 6
    os.utime(run_dir / "status.json", (old, old))
    status = effective_status(run_dir)
    assert status["state"] == "failed" and status["process_gone"]
    assert "ended without writing a final status" in status["error"] and "Resume" in status["error"]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "queued", "a reader never writes"


def test_a_reused_pid_is_not_taken_for_the_trainer(tmp_path):
    run_dir = tmp_path / "reused"
    run_dir.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])  # a live process that is not the trainer
    try:
        started = process_start_time(sleeper.pid)
        assert started is not None
        write_json_atomic(run_dir / "status.json", {"state": "running", "pid": sleeper.pid,
                                                    "pid_start_time": started, "step": 3})
        assert effective_status(run_dir)["state"] == "running"
        # Same pid, another start time: the trainer died and the kernel gave its pid to this process.
        write_json_atomic(run_dir / "status.json", {"state": "running", "pid": sleeper.pid,
                                                    "pid_start_time": started - 1, "step": 3})
        status = effective_status(run_dir)
        assert status["state"] == "failed" and status["process_gone"]
        # request_stop must not signal the stranger
        request_stop(run_dir)
        assert sleeper.poll() is None, "the unrelated process was signalled"
    finally:
        sleeper.kill()
        sleeper.wait()
    # A finished run with a dead pid keeps its final state.
    write_json_atomic(run_dir / "status.json", {"state": "completed", "pid": dead_pid(), "step": 3})
    assert effective_status(run_dir)["state"] == "completed"


# ---- status.json: atomic writes ------------------------------------------------------------------
def test_an_interrupted_status_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "status.json"
    write_json_atomic(path, {"state": "running", "step": 1})
    original = path.read_bytes()

    real_fdopen = os.fdopen

    class HalfThenDiskFull:
        """The temp file's handle: half the document reaches the disk, then the disk fills up."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *args, **kwargs: HalfThenDiskFull(real_fdopen(fd, *args, **kwargs)))
    with pytest.raises(OSError):
        write_json_atomic(path, {"state": "completed", "step": 2})
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"], "the temp file is cleaned up"

    def replace_fails(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(OSError):
        write_json_atomic(path, {"state": "completed", "step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


WRITER = """
import itertools, sys
from pathlib import Path
from trainer.runfiles import write_json_atomic
path, start = Path(sys.argv[1]), int(sys.argv[2])
print("ready", flush=True)
for i in itertools.count(start):
    write_json_atomic(path, {"state": "running", "step": i, "check": i * 7, "pad": "x" * 300_000})
"""


def test_a_writer_killed_mid_write_never_leaves_a_torn_status(tmp_path):
    """A process writing status.json in a loop is SIGKILLed again and again while a reader reads it strictly:
    every read is a whole document (the old one or the new one), never a torn one."""
    path = tmp_path / "status.json"
    write_json_atomic(path, {"state": "running", "step": 0, "check": 0, "pad": "x" * 300_000})
    seen, bad, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            raw = path.read_bytes()  # strictly: read_status would hide a torn file as None
            try:
                data = json.loads(raw)
                assert data["check"] == data["step"] * 7 and len(data["pad"]) == 300_000
                seen.add(data["step"])
            except (ValueError, KeyError, AssertionError) as exc:
                bad.append(f"{type(exc).__name__}: {len(raw)} bytes")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    env = dict(os.environ, PYTHONPATH=str(CODE_ROOT))
    try:
        for round_ in range(6):
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(round_ * 1_000_000)],
                                      cwd=CODE_ROOT, env=env, stdout=subprocess.PIPE, text=True)
            assert writer.stdout.readline().strip() == "ready"
            wait_for(lambda: any(s >= round_ * 1_000_000 + 3 for s in seen), timeout=30,
                     what="a few writes")
            time.sleep(0.003 * round_)  # kill at different points of a write
            writer.kill()
            writer.wait()
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not bad, bad[:5]
    assert len(seen) > 12
    final = json.loads(path.read_bytes())  # after the last kill: still a whole document
    assert final["check"] == final["step"] * 7
    # A killed writer may leave its hidden temp file behind, never a visible or partial status.json.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "status.json"]
    assert all(name.startswith(".status.json.") and name.endswith(".tmp") for name in leftovers), leftovers


# ---- metrics.jsonl: a torn last line ---------------------------------------------------------------
def torn_metrics_run(home: Path, name: str = "torn") -> Path:
    run_dir = write_run(home, name, max_steps=4)
    lines = [json.dumps({"step": s, "total_steps": 4, "epoch": s / 4, "loss": 3.0 - s * 0.5,
                         "learning_rate": 1e-3, "grad_norm": 1.0, "tokens": 100 * s, "tokens_per_second": 50.0,
                         "elapsed_s": float(s), "eta_s": 4.0 - s, "time": "2026-01-01T00:00:00+00:00"})
             for s in (1, 2, 3)]
    lines.insert(1, '{"step": 9, "loss": ')  # a broken line in the middle (a writer that died, then a resume)
    lines.insert(2, "[1, 2]")  # valid JSON, but not a record
    text = "\n".join(lines) + '\n{"step": 4, "total_steps": 4, "loss": 0.2, "lea'  # torn: no newline yet
    (run_dir / "metrics.jsonl").write_text(text, encoding="utf-8")
    write_json_atomic(run_dir / "status.json", {"state": "failed", "pid": None, "step": 3, "total_steps": 4,
                                                "error": "killed"})
    return run_dir


def test_a_torn_last_metrics_line_is_skipped_by_the_reader_and_the_train_page(home):
    run_dir = torn_metrics_run(home)
    records = list(iter_metrics(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert read_metrics(run_dir) == records
    # A torn multi-byte character at the end is skipped too.
    with open(run_dir / "metrics.jsonl", "ab") as handle:
        handle.write(b'\n{"step": 5, "note": "\xc3')
    assert [r["step"] for r in iter_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]

    at = open_page()
    assert at.selectbox(key="shown_run").value == "torn"
    assert "torn: failed" in page_text(at)
    loss = {m.label: m.value for m in at.metric}["Loss"]
    assert loss == "1.5000", "the last complete line is shown; the torn one is not"
    assert len(at.get("vega_lite_chart")) >= 1


def test_resume_after_a_torn_line_and_two_resume_clicks_at_once_run_one_trainer(home, tiny_model_dir,
                                                                                 tmp_path_factory):
    """A killed run (torn last metrics line, pid dead) is resumed by two clicks at once: one trainer runs,
    the other click gets a sentence; the metrics file ends whole, every step once."""
    run_dir = copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home, "twice")
    kept = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][:3]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"step": 4, "lo')
    write_json_atomic(run_dir / "status.json", {"state": "running", "pid": dead_pid(), "pid_start_time": 1,
                                                "step": 4, "total_steps": 6, "started_at": "2026-01-01T00:00:00"})
    (run_dir / "train.log").write_text("")
    params = TrainingParameters.from_dict({**TINY_PARAMS, "lora_name": "twice"})  # the page sends the name
    started, refused = two_clicks_at_once(lambda: launch(params, mode="resume", checkpoint="checkpoint-2"))
    try:
        assert len(started) == 1 and len(refused) == 1, (started, refused)
        assert "already running" in refused[0].message
        assert run_end(run_dir)["state"] == "completed", read_status(run_dir)
    finally:
        end_run(run_dir)
    assert len(launch_lines(run_dir)) == 1, launch_lines(run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is whole JSON: the torn tail was dropped
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


# ---- two Start clicks at once --------------------------------------------------------------------
def test_two_start_clicks_at_once_start_exactly_one_run(home):
    params = TrainingParameters.from_dict({**TINY_PARAMS, "lora_name": "race", "max_steps": 2})
    started, refused = two_clicks_at_once(lambda: launch(params, mode="new"))
    run_dir = home / "loras" / "race"
    try:
        assert started == [run_dir] and len(refused) == 1, (started, refused)
        assert "already running" in refused[0].message or "already exists" in refused[0].message
        assert refused[0].field == "lora_name"
        assert sorted(p.name for p in (home / "loras").iterdir() if not p.name.startswith(".")) == ["race"]
        assert len(launch_lines(run_dir)) == 1
        assert run_end(run_dir)["state"] == "completed", read_status(run_dir)
    finally:
        end_run(run_dir)


# ---- the Streamlit server restarted during a run --------------------------------------------------
OLD_SERVER = """
import json, os, signal, sys
from trainer.params import TrainingParameters
from trainer.runs import launch
launch(TrainingParameters.from_dict(json.loads(sys.argv[1])))
os.kill(os.getpid(), signal.SIGKILL)  # the server dies the hard way right after the Start click
"""


def test_a_restarted_server_reattaches_and_the_run_goes_on_without_a_page(home):
    params = {**TINY_PARAMS, "lora_name": "survivor", "max_steps": 100_000, "save_steps": 2}
    env = dict(os.environ, PYTHONPATH=str(CODE_ROOT))
    old = subprocess.run([sys.executable, "-c", OLD_SERVER, json.dumps(params)], cwd=CODE_ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert old.returncode == -signal.SIGKILL, old.stderr
    run_dir = home / "loras" / "survivor"
    pid = trainer_pid(run_dir)
    try:
        # No server, no page: the run goes on.
        wait_for(lambda: len(read_metrics(run_dir)) >= 2, timeout=120, what="training steps")
        steps_then = len(read_metrics(run_dir))
        wait_for(lambda: len(read_metrics(run_dir)) >= steps_then + 3, timeout=60, what="more steps, no page open")
        wait_for(lambda: list_checkpoints(run_dir), timeout=60, what="a checkpoint")

        # A fresh page session of a new server re-attaches through the files.
        at = open_page()
        assert at.selectbox(key="shown_run").value == "survivor"
        assert "survivor: running" in page_text(at)
        assert any(b.label == "Stop" for b in at.button)
        assert {m.label: m.value for m in at.metric}["Loss"] != "—"

        # Then the trainer is killed mid-step: the page says so and offers to resume.
        kill_group(pid)
        wait_for(lambda: effective_status(run_dir)["state"] == "failed", timeout=30, what="the kill to show")
        at.run()
        assert not at.exception, at.exception
        assert "survivor: failed" in page_text(at)
        assert any("ended without writing a final status" in e for e in page_errors(at)), page_errors(at)
        assert any(b.label == "Resume from the newest checkpoint" for b in at.button)
        assert all("loss" in r for r in read_metrics(run_dir))
    finally:
        kill_group(pid)


# ---- the home folder read-only -------------------------------------------------------------------
@contextmanager
def read_only(home: Path):
    """Make the home folder really read-only, also for root (who ignores permission bits): a read-only bind
    mount where allowed, else the immutable attribute, else (not root) plain permissions."""
    folders = [home, home / "loras", home / "datasets"]
    if os.geteuid() != 0:
        modes = {f: f.stat().st_mode for f in folders}
        for f in folders:
            f.chmod(0o555)
        try:
            yield "chmod"
        finally:
            for f, mode in modes.items():
                f.chmod(mode)
        return
    if subprocess.run(["mount", "--bind", str(home), str(home)], capture_output=True).returncode == 0:
        try:
            if subprocess.run(["mount", "-o", "remount,bind,ro", str(home)], capture_output=True).returncode == 0:
                yield "mount"
                return
        finally:
            subprocess.run(["umount", str(home)], capture_output=True)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", *map(str, folders)],
                                                 capture_output=True).returncode == 0:
        try:
            yield "chattr"
        finally:
            subprocess.run(["chattr", "-i", *map(str, folders)], capture_output=True)
        return
    pytest.fail("cannot make a folder read-only here as root (no mount, no chattr)")


def test_a_read_only_home_gives_a_sentence_not_a_traceback(home):
    before = snapshot(home)
    at = open_page()
    at.text_input(key="tp_lora_name").input("ro-run")
    at.selectbox(key="tp_base_model").select("tiny-llama")
    at.selectbox(key="tp_raw_text_file").select("user-guide.txt")
    at.number_input(key="tp_cutoff_len").set_value(64)
    at.number_input(key="tp_overlap_len").set_value(16)
    at.run()
    start = next(b for b in at.button if b.label == "Start training")
    assert not start.disabled, page_errors(at)
    with read_only(home) as how:
        with pytest.raises(OSError):
            (home / "loras" / "probe").mkdir()  # the precondition holds, whatever the mechanism
        start.click()
        at.run()
        assert not at.exception, at.exception
        assert any("read-only" in e.lower() for e in page_errors(at)), (how, page_errors(at))

        # The Data page's upload into datasets/ reports the failure too.
        data = open_page(DATA_PAGE)
        data.file_uploader[0].set_value(("notes.txt", b"some text\n", "text/plain")).run()
        data.button(key="dp_up_save").click().run()
        assert not data.exception, data.exception
        assert any(any(w in e.lower() for w in ("read-only", "permission denied", "not permitted"))
                   for e in page_errors(data)), page_errors(data)
    assert not (home / "loras" / "ro-run").exists()
    assert snapshot(home) == before


@pytest.mark.parametrize("blocker", ["loras", "loras/.locks"])
def test_launch_reports_a_file_where_a_folder_should_be(home, blocker):
    """os.access says writable, yet the folder cannot be made: launch raises DashboardError, not OSError."""
    shutil.rmtree(home / "loras")
    (home / blocker).parent.mkdir(parents=True, exist_ok=True)
    (home / blocker).write_text("not a folder")
    params = TrainingParameters.from_dict({**TINY_PARAMS, "lora_name": "blocked", "max_steps": 1})
    with pytest.raises(DashboardError) as info:
        launch(params)
    assert "writable" in info.value.message
    assert (home / blocker).read_text() == "not a folder"
