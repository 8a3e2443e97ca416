"""AppTest tests of the Train page's run queue and sweeps (issue 13): the queue panel lists the waiting runs in
order and reorders, cancels and starts them from the page; a page load starts the next run of an idle device;
Start on a busy device queues unless "run beside" is ticked; a sweep's lists of values are checked at their
fields, its grid is named before anything is written, and a 2 x 2 sweep queued from the page runs to the end."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from trainer import runqueue, sweeps
from trainer.params import TrainingParameters
from trainer.processes import process_identity
from trainer.runfiles import read_status
from trainer.storage import write_json_atomic

from .test_queue_runs import kill_all
from .test_train_page import errors, fill_basic, open_page, start_button
from .trainhelpers import TINY_PARAMS, wait_for, write_run

FINAL = ("completed", "stopped", "failed")


@pytest.fixture
def queue_home(home):
    yield home
    runqueue.queue_path().unlink(missing_ok=True)  # nothing waiting may start while the runs are killed
    kill_all(home)


@pytest.fixture
def busy(queue_home):
    """A run named "busy" holding the CPU: a sleeping process stands in for its trainer."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    run_dir = write_run(queue_home, "busy", max_steps=1)
    write_json_atomic(run_dir / "status.json", {"state": "running", "device": "cpu", "step": 0, "total_steps": 1,
                                                **process_identity(process.pid)})
    yield run_dir
    process.kill()
    process.wait()


def queued(home, name: str, **overrides):
    run_dir = write_run(home, name, max_steps=2, **overrides)
    runqueue.add(run_dir, "cpu")
    return run_dir


def queue_order() -> list[str]:
    return [entry["name"] for entry in runqueue.read_queue()]


def shown_queue(at) -> list[str]:
    """The queue as the panel lists it: each row's line ("1. a · the CPU · start")."""
    rows = [re.match(r"\*\*(\d+)\.\*\* :material/hourglass_top: (.*)", m.value) for m in at.markdown]
    return [f"{row[1]}. {row[2]}" for row in rows if row]


def final_status(run_dir, timeout: float = 180) -> dict:
    return wait_for(lambda: (s := read_status(run_dir) or {}).get("state") in FINAL and s, timeout=timeout,
                    what=f"{run_dir.name} to end")


def test_the_queue_panel_lists_reorders_and_cancels_the_waiting_runs(busy, queue_home):
    home = queue_home
    for name in ("a", "b", "c"):
        queued(home, name)
    at = open_page()
    assert at.selectbox(key="shown_run").value == "busy", "the panel follows the live run"
    at.run()  # a rerun gives the box the shown run as its default (a browser drawing it afresh shows that one)
    box = at.selectbox(key="shown_run")
    assert box.value == "busy" and box.proto.default == box.options.index("busy") > 0, (box.proto.default, box.options)
    assert not any("Session State" in w.value for w in at.warning), [w.value for w in at.warning]
    assert read_status(busy)["state"] == "running" and queue_order() == ["a", "b", "c"], "the load started nothing"
    assert shown_queue(at) == ["1. a · the CPU · start", "2. b · the CPU · start", "3. c · the CPU · start"]
    assert any(w.value.startswith("Start now runs a queued run at once, beside busy") for w in at.warning)
    assert at.button(key="queue_up_a").disabled and at.button(key="queue_down_c").disabled
    assert not at.button(key="queue_down_a").disabled and not at.button(key="queue_up_c").disabled

    at.button(key="queue_down_a").click().run()
    assert queue_order() == ["b", "a", "c"]
    assert [line.split(" ")[1] for line in shown_queue(at)] == ["b", "a", "c"]
    at.button(key="queue_up_c").click().run()
    assert queue_order() == ["b", "c", "a"]

    at.button(key="queue_cancel_c").click().run()
    assert not at.exception, at.exception
    assert queue_order() == ["b", "a"]
    status = read_status(home / "loras" / "c")
    assert status["state"] == "stopped" and "cancelled" in status["reason"] and not status["waiting"], status
    assert (home / "loras" / "c" / "training_parameters.json").exists(), "the folder stays"
    assert any("Cancelled c" in s.value for s in at.success), [s.value for s in at.success]
    assert len(shown_queue(at)) == 2

    # A button drawn before the run left the queue (here: cancelled from another tab) says so, and changes nothing.
    runqueue.cancel(home / "loras" / "a")
    at.button(key="queue_up_a").click().run()
    assert any("a is no longer waiting in the queue" in e for e in errors(at)), errors(at)
    assert queue_order() == ["b"]


def test_start_now_starts_a_queued_run_beside_the_busy_one(busy, queue_home):
    home = queue_home
    now = queued(home, "now")
    queued(home, "later")
    at = open_page()
    at.button(key="queue_start_now").click().run()
    assert not at.exception, at.exception
    assert queue_order() == ["later"]
    assert any("Started now now, beside" in s.value for s in at.success), [s.value for s in at.success]
    assert not read_status(now).get("waiting") and read_status(now)["pid"], read_status(now)
    assert final_status(now)["state"] == "completed"
    assert read_status(busy)["state"] == "running", "it ran beside the busy run"
    assert queue_order() == ["later"], "the busy run still holds the CPU: the next one waits"


def test_a_page_load_starts_the_next_run_of_an_idle_device(queue_home):
    """The queue goes on after a restarted server: nothing is running, a run waits, the page loads."""
    home = queue_home
    waiting = queued(home, "left-waiting")
    open_page()
    assert queue_order() == []
    assert not read_status(waiting).get("waiting"), read_status(waiting)
    assert final_status(waiting)["state"] == "completed"


def test_start_on_a_busy_device_queues_unless_run_beside_is_ticked(busy, queue_home):
    home = queue_home
    at = open_page()
    fill_basic(at, name="waits", max_steps=2, warmup_steps=1)
    assert not at.checkbox(key="run_beside").value
    assert any("so Start puts this one in the queue" in w.value for w in at.warning)
    start_button(at).click().run()
    assert queue_order() == ["waits"] and read_status(home / "loras" / "waits")["waiting"]
    assert shown_queue(at) == ["1. waits · the CPU · start"]
    assert not any(b.label == "Stop" for b in at.button), "a waiting run is cancelled in the queue, not stopped"
    assert "waits waits in the queue (place 1): move it, cancel it or start it now in the queue above." in [
        c.value for c in at.caption]

    at.text_input(key="tp_lora_name").input("beside").run()
    at.checkbox(key="run_beside").check().run()
    assert any(w.value == "busy is already running on the CPU; Start runs this one beside it at once: they share the "
                          "device, each runs slower, and together they may run out of memory." for w in at.warning), \
        [w.value for w in at.warning]
    start_button(at).click().run()
    assert not at.exception, at.exception
    assert any("Started beside beside the running one" in s.value for s in at.success), [s.value for s in at.success]
    assert queue_order() == ["waits"], "it did not join the queue"
    assert final_status(home / "loras" / "beside")["state"] == "completed"
    assert read_status(home / "loras" / "waits")["waiting"], "the queued run still waits for the busy one"


# ---- sweeps --------------------------------------------------------------------------------------
def sweep(at, values: dict[str, str | list[str]]) -> None:
    """Pick the parameters to sweep and give their values, as a person does in the Sweep expander: typed (a
    number's), or picked from its choices (a list)."""
    at.multiselect(key="sweep_params").set_value(list(values)).run()
    for name, given in values.items():
        if isinstance(given, list):
            at.multiselect(key="sweep_values_" + name).set_value(given)
        else:
            at.text_input(key="sweep_values_" + name).input(given)
    at.run()
    assert not at.exception, at.exception


def queue_button(at):
    return [b for b in at.button if b.label.startswith("Queue ")]


def test_a_sweeps_values_are_checked_at_their_fields_and_nothing_is_written_for_a_bad_grid(queue_home):
    home = queue_home
    at = open_page()
    fill_basic(at, name="grid", max_steps=2, warmup_steps=1)
    sweep(at, {"learning_rate": "1e-3, fast"})
    assert "Learning rate must be a number; got 'fast'." in errors(at), errors(at)
    assert queue_button(at) == []

    sweep(at, {"learning_rate": "1e-3, 3e-3", "overlap_len": "16, 64"})  # 64 is not below the cutoff 64
    assert any(e.startswith("grid-lr1e-3-overlap_len64: Overlap length (64) must be below") for e in errors(at)), \
        errors(at)
    assert queue_button(at) == []

    sweep(at, {"learning_rate": "1e-3, 3e-3", "lr_scheduler_type": ["cosine", "constant"]})
    [table] = at.dataframe
    assert list(table.value["run"]) == ["grid-lr1e-3-schedcosine", "grid-lr1e-3-schedconstant",
                                        "grid-lr3e-3-schedcosine", "grid-lr3e-3-schedconstant"]
    assert [b.label for b in queue_button(at)] == ["Queue 4 runs"]

    (home / "loras" / "grid-lr3e-3-schedconstant").mkdir()  # a name of the grid is taken
    at.run()
    assert any("A LoRA named grid-lr3e-3-schedconstant already exists" in e for e in errors(at)), errors(at)
    assert queue_button(at) == []
    assert sorted(p.name for p in (home / "loras").iterdir()) == ["grid-lr3e-3-schedconstant"]
    assert not sweeps.experiments_dir().exists() and runqueue.read_queue() == []


def test_a_2x2_sweep_queued_from_the_page_runs_to_the_end(queue_home):
    home = queue_home
    names = ["page-grid-lr1e-3-r4", "page-grid-lr1e-3-r8", "page-grid-lr3e-3-r4", "page-grid-lr3e-3-r8"]
    at = open_page()
    fill_basic(at, name="page-grid", max_steps=2, warmup_steps=1, micro_batch_size=2, batch_size=4)
    sweep(at, {"learning_rate": "1e-3, 3e-3", "lora_rank": "4, 8"})
    [table] = at.dataframe
    assert list(table.value["run"]) == names
    assert list(table.value["LoRA rank"]) == ["4", "8", "4", "8"]
    assert list(table.value["Learning rate"]) == ["1e-3", "1e-3", "3e-3", "3e-3"]  # as in the run names
    assert "Experiment page-grid: 4 runs, queued in this order." in [c.value for c in at.caption]
    [button] = queue_button(at)
    assert button.label == "Queue 4 runs"
    button.click().run()
    assert not at.exception, at.exception
    assert any("Queued experiment page-grid: 4 runs" in s.value for s in at.success), [s.value for s in at.success]
    assert at.selectbox(key="shown_run").value == names[0], "the page follows the sweep's first run"
    experiment = sweeps.read_experiment("page-grid")
    assert experiment["runs"] == names and experiment["swept"] == {"learning_rate": [1e-3, 3e-3], "lora_rank": [4, 8]}
    stored = json.loads((home / "loras" / names[3] / "training_parameters.json").read_text())
    assert stored["learning_rate"] == 3e-3 and stored["lora_rank"] == 8 and stored["max_steps"] == 2
    assert stored["base_model"] == TINY_PARAMS["base_model"]

    ends = [final_status(home / "loras" / name, timeout=300) for name in names]
    assert [s["state"] for s in ends] == ["completed"] * 4, ends
    for before, after in zip(ends, ends[1:]):  # one after another on the one CPU, through the queue
        assert before["finished_at"] <= after["started_at"], (before, after)
    assert all((home / "loras" / name / "adapter_model.safetensors").exists() for name in names)
    assert TrainingParameters.from_file(home / "loras" / names[0] / "training_parameters.json").lora_rank == 4
    at.run()
    assert shown_queue(at) == [] and runqueue.read_queue() == []
