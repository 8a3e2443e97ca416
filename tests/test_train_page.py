"""AppTest tests of the Train page: validation next to the fields, launching, following, stopping, copying."""

from __future__ import annotations

import json
import re

import pytest
from streamlit.testing.v1 import AppTest

from trainer.home import CODE_ROOT
from trainer.runfiles import read_metrics, read_status
from trainer.checkpoints import list_checkpoints

from .trainhelpers import wait_for, write_run

PAGE = str(CODE_ROOT / "views" / "train.py")


def open_page() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def fill_basic(at: AppTest, name: str = "page-run", **numbers) -> None:
    at.text_input(key="tp_lora_name").input(name)
    at.selectbox(key="tp_base_model").select("tiny-llama")
    at.selectbox(key="tp_raw_text_file").select("user-guide.txt")
    at.number_input(key="tp_cutoff_len").set_value(64)
    at.number_input(key="tp_overlap_len").set_value(16)
    for key, value in numbers.items():
        at.number_input(key="tp_" + key).set_value(value)
    at.run()
    assert not at.exception, at.exception


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def start_button(at: AppTest):
    return next(b for b in at.button if b.label == "Start training")


TAB_TITLES = ["Basic", "Data", "LoRA", "Optimisation", "Advanced"]


def tab_marks(at: AppTest) -> list[str]:
    """The mark each tab of the form shows ("⚠ 1"), from the page's style rule; and the labels never change (a
    tab whose label changed would be a new tab to the browser, which would open the first one)."""
    assert [t.label for t in at.tabs] == TAB_TITLES
    [style] = [h.value for h in at.html if "<style>" in h.value]
    marks = dict(re.findall(r'data-key="(\d)"\] p::after \{content: " ([^"]+)"', style))
    return [marks.get(str(i), "") for i in range(len(TAB_TITLES))]


def infos(at: AppTest) -> list[str]:
    return [i.value for i in at.info]


def test_a_fresh_form_suggests_a_free_name_and_marks_the_tab_with_the_problem(home):
    write_run(home, "my-lora-1", max_steps=1)  # taken: the suggestion is the next free one
    at = open_page()
    assert at.text_input(key="tp_lora_name").value == "my-lora-2"
    assert not any("LoRA name" in e for e in errors(at)), errors(at)
    assert errors(at) == ["Choose a dataset (formatted JSON) or a raw text file."]
    # The only problem is on the Data tab: that tab is marked, no other, and the plan's place says where.
    assert tab_marks(at) == ["", "⚠ 1", "", "", ""]
    assert any("Dataset" in i and "(Data)" in i for i in infos(at)), infos(at)
    assert start_button(at).disabled

    at.selectbox(key="tp_raw_text_file").select("user-guide.txt")
    at.number_input(key="tp_lora_rank").set_value(0)
    at.run()
    assert tab_marks(at) == ["", "", "⚠ 1", "", ""]
    assert any("LoRA rank (LoRA)" in i for i in infos(at)), infos(at)
    at.text_input(key="tp_lora_name").input("").run()
    assert tab_marks(at) == ["⚠ 1", "", "⚠ 1", "", ""] and "The LoRA name is empty." in errors(at)
    at.number_input(key="tp_micro_batch_size").set_value(3).run()  # 8 is not a multiple of 3
    assert tab_marks(at) == ["⚠ 1", "", "⚠ 1", "⚠ 1", ""]


def test_a_reload_keeps_the_form(home):
    at = open_page()
    fill_basic(at, name="kept", max_steps=7, lora_rank=4)
    at.selectbox(key="tp_precision").select("8bit").run()
    saved = json.loads((home / ".dashboard" / "form.json").read_text())["values"]
    assert saved["tp_lora_name"] == "kept" and saved["tp_max_steps"] == 7

    reloaded = open_page()  # a new session: its session state is empty
    assert reloaded.text_input(key="tp_lora_name").value == "kept"
    assert reloaded.selectbox(key="tp_base_model").value == "tiny-llama"
    assert reloaded.selectbox(key="tp_raw_text_file").value == "user-guide.txt"
    assert [reloaded.number_input(key="tp_" + k).value for k in ("cutoff_len", "overlap_len", "max_steps",
                                                                  "lora_rank")] == [64, 16, 7, 4]
    assert reloaded.selectbox(key="tp_precision").value == "8bit"
    assert reloaded.number_input(key="tp_learning_rate").value == 3e-4, "an untouched field keeps its default"


def test_a_saved_value_that_no_longer_fits_its_field_falls_back_to_the_default(home):
    (home / ".dashboard").mkdir()
    (home / ".dashboard" / "form.json").write_text(json.dumps({"values": {
        "tp_precision": "16bit", "tp_max_steps": "many", "tp_epochs": 2, "tp_packing": "yes",
        "tp_lora_name": "from-file"}}))
    at = open_page()
    assert at.selectbox(key="tp_precision").value == "full"
    assert at.number_input(key="tp_max_steps").value == 0
    assert at.number_input(key="tp_epochs").value == 2.0 and isinstance(at.number_input(key="tp_epochs").value,
                                                                          float)
    assert at.checkbox(key="tp_packing").value is False
    assert at.text_input(key="tp_lora_name").value == "from-file"
    (home / ".dashboard" / "form.json").write_text("{not json")
    assert open_page().selectbox(key="tp_precision").value == "full"


@pytest.mark.parametrize("change, expected", [
    ({"overlap_len": 64}, "Overlap length (64) must be below the cutoff length (64)"),
    ({"batch_size": 6, "micro_batch_size": 4}, "Batch size (6) must be a multiple of the micro batch size (4)"),
    ({"lora_rank": 0}, "LoRA rank must be at least 1; got 0."),
])
def test_validation_errors_block_the_start(home, change, expected):
    at = open_page()
    fill_basic(at)
    assert not start_button(at).disabled, errors(at)
    for key, value in change.items():
        at.number_input(key="tp_" + key).set_value(value)
    at.run()
    assert any(expected in e for e in errors(at)), errors(at)
    assert start_button(at).disabled
    assert not (home / "loras" / "page-run").exists(), "nothing is written before the start"


@pytest.mark.parametrize("name", ["../x", ".git", "a/b", "CON"])
def test_bad_names_are_refused(home, name):
    at = open_page()
    fill_basic(at, name=name)
    assert any("LoRA name" in e for e in errors(at)), errors(at)
    assert start_button(at).disabled
    assert sorted(p.name for p in (home / "loras").iterdir()) == []
    assert not (home / "x").exists()


def test_plan_shows_samples_and_steps(home):
    at = open_page()
    fill_basic(at, micro_batch_size=2, batch_size=4)
    at.checkbox(key="tp_packing").uncheck()
    at.run()
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["Samples"]) > 0 and metrics["Rows"] == metrics["Samples"]
    assert metrics["Accumulation"] == "2"
    per_epoch = int(metrics["Steps per epoch"])
    assert per_epoch == -(-(-(-int(metrics["Samples"]) // 2)) // 2)
    assert int(metrics["Total steps"]) == 3 * per_epoch  # default 3 epochs
    at.checkbox(key="tp_packing").check()
    at.run()
    packed = {m.label: m.value for m in at.metric}
    assert packed["Samples"] == metrics["Samples"] and int(packed["Rows"]) < int(metrics["Rows"])


def test_existing_name_is_never_overwritten_silently(home):
    old = write_run(home, "taken", max_steps=1)
    (old / "marker.txt").write_text("keep me")
    at = open_page()
    fill_basic(at, name="taken")
    radio = at.radio(key="existing_choice")
    assert radio.value == "Choose another name"
    assert start_button(at).disabled
    radio.set_value("Overwrite it (the old folder is kept as a backup)")
    at.run()
    assert not start_button(at).disabled
    start_button(at).click()
    at.run()
    assert not at.exception
    backups = [p for p in (home / "loras").iterdir() if p.name.startswith("taken-backup-")]
    assert len(backups) == 1 and (backups[0] / "marker.txt").read_text() == "keep me"
    wait_for(lambda: (read_status(home / "loras" / "taken") or {}).get("state") in ("completed", "failed"),
             what="the overwriting run to end")


def test_launch_follow_stop_and_copy_parameters(home):
    at = open_page()
    fill_basic(at, name="live", max_steps=5000, save_steps=0)
    start_button(at).click()
    at.run()
    assert not at.exception, at.exception
    run_dir = home / "loras" / "live"
    stored = json.loads((run_dir / "training_parameters.json").read_text())
    assert stored["max_steps"] == 5000 and stored["base_model"] == "tiny-llama"

    # the page follows the run through its files: progress and a loss chart appear
    wait_for(lambda: len(read_metrics(run_dir)) >= 2, what="training steps")
    at.run()
    assert at.selectbox(key="shown_run").value == "live"
    texts = " ".join(m.value for m in at.markdown)
    assert "live: running" in texts
    assert any(m.label == "Loss" and m.value != "—" for m in at.metric)
    assert len(at.get("vega_lite_chart")) >= 1

    # a new page session (a reload or a second tab) re-attaches to the running run
    other = open_page()
    assert other.selectbox(key="shown_run").value == "live"
    assert "live: running" in " ".join(m.value for m in other.markdown)

    stop = next(b for b in at.button if b.label == "Stop")
    stop.click()
    at.run()
    wait_for(lambda: (read_status(run_dir) or {}).get("state") == "stopped", what="the stop")
    assert (run_dir / "adapter_model.safetensors").is_file()
    assert list_checkpoints(run_dir)
    at.run()
    assert "live: stopped" in " ".join(m.value for m in at.markdown)
    assert any(b.label == "Resume from the newest checkpoint" for b in at.button)

    # copy parameters from the earlier run
    fresh = open_page()
    fresh.selectbox(key="copy_from").select("live")
    fresh.run()
    next(b for b in fresh.button if b.label == "Copy parameters").click()
    fresh.run()
    assert fresh.number_input(key="tp_max_steps").value == 5000
    assert fresh.selectbox(key="tp_base_model").value == "tiny-llama"
    assert fresh.text_input(key="tp_lora_name").value == "live-2"


def test_quantised_choice_is_refused_before_launch_where_bitsandbytes_cannot_run(home, monkeypatch):
    from trainer import models

    monkeypatch.setattr(models, "_bitsandbytes_error", lambda: "OSError: no native library")
    at = open_page()
    fill_basic(at)
    assert not start_button(at).disabled
    at.selectbox(key="tp_precision").select("4bit")
    at.run()
    assert any("4bit base model needs bitsandbytes" in e for e in errors(at)), errors(at)
    assert start_button(at).disabled


# ---- what the page shows is what is true now -----------------------------------------------------
def captions(at: AppTest) -> list[str]:
    return [c.value for c in at.caption]


def running_now(at: AppTest) -> str:
    [line] = [c for c in captions(at) if c.startswith(("Running now", "Nothing is running"))]
    return line


def state_of(run_dir) -> str | None:
    from trainer.runfiles import effective_status

    return (effective_status(run_dir) or {}).get("state")


def stop_and_wait(run_dir) -> None:
    """Stop a run once its trainer runs (a stop while it still loads would end it as failed), and wait."""
    from trainer.runfiles import request_stop

    if state_of(run_dir) in ("queued", "running"):
        wait_for(lambda: state_of(run_dir) != "queued", timeout=120, what=f"{run_dir.name} to start")
        request_stop(run_dir)
    wait_for(lambda: state_of(run_dir) not in ("queued", "running"), timeout=120, what=f"{run_dir.name} to stop")


def test_start_follows_the_new_run_and_running_now_is_exactly_the_live_runs(home):
    first, second = home / "loras" / "first", home / "loras" / "second"
    at = open_page()
    try:
        fill_basic(at, name="first", max_steps=5000, save_steps=0)
        assert not any("already running" in w.value for w in at.warning)
        start_button(at).click().run()
        assert any("Started first" in s.value for s in at.success)
        assert at.selectbox(key="shown_run").value == "first"
        wait_for(lambda: state_of(first) == "running", what="the first run to run")

        # A second run while the first is live: a warning beside Start, not a refusal; the run waits in the queue.
        at.text_input(key="tp_lora_name").input("second").run()
        assert any(w.value == "first is already running on the CPU; a second run at once would share the device "
                              "and may run out of memory, so Start puts this one in the queue: it starts when the "
                              "device is free." for w in at.warning), [w.value for w in at.warning]
        assert not start_button(at).disabled
        start_button(at).click().run()
        assert not at.exception, at.exception
        assert at.selectbox(key="shown_run").value == "second", "the page follows the run just started"
        assert "second: queued" in " ".join(m.value for m in at.markdown)
        assert any("second is in the queue" in s.value for s in at.success), [s.value for s in at.success]
        assert running_now(at) == "Running now: first · Waiting in the queue: second"
        assert at.radio(key="existing_choice").value == "Choose another name", "the page knows the name is taken"

        # A later Start that fails shows its error, and no success of the earlier click stays above it.
        at.radio(key="existing_choice").set_value("Overwrite it (the old folder is kept as a backup)").run()
        start_button(at).click().run()
        assert any("second is already running" in e for e in errors(at)), errors(at)
        assert not at.success, [s.value for s in at.success]

        stop_and_wait(first)
        wait_for(lambda: state_of(second) == "running", what="the queue to start the second run")
        at.run()
        assert running_now(at) == "Running now: second", "a run that ended is no longer listed"
        assert at.selectbox(key="shown_run").value == "second"
        stop_and_wait(second)
        at.run()
        assert running_now(at) == "Nothing is running now."
        assert not any("already running" in w.value for w in at.warning)
    finally:
        stop_and_wait(first)
        stop_and_wait(second)


def runs_panel_place(at: AppTest) -> list:
    """The top-level elements of the page, the runs panel's block by its subheader."""
    return [("runs panel" if "Runs" in [h.value for h in child.subheader] else type(child).__name__)
            if hasattr(child, "subheader") else type(child).__name__ for child in at.main.children.values()]


def test_the_runs_panel_keeps_its_place_whatever_the_page_shows_above_it(home):
    """The cause of two progress bars at once: the refreshing runs panel moved when the elements above it changed
    in number (a warning, an error, the plan), and the browser kept its old copy until the rerun ended."""
    write_run(home, "earlier", max_steps=1)
    at = open_page()
    places = [runs_panel_place(at)]  # a form with an error, no plan
    fill_basic(at, name="earlier")  # a plan, and a name that exists: the resume / overwrite choice
    places.append(runs_panel_place(at))
    at.number_input(key="tp_batch_size").set_value(3).run()  # an error under a field, no plan
    places.append(runs_panel_place(at))
    assert places[0] == ["Title", "Caption", "Block", "Divider", "runs panel"]
    assert places.count(places[0]) == len(places), places


def test_expanders_keep_their_state_across_refreshes(home):
    run_dir = write_run(home, "logged", max_steps=1)
    (run_dir / "train.log").write_text("line one\nline two\n")
    at = open_page()
    [machines] = [e for e in at.expander if e.label == "More than one machine"]
    [log] = [e for e in at.expander if e.label.startswith("Log")]
    assert not machines.proto.expanded and not log.proto.expanded
    # What the browser sends when a person opens them; both have keys, so the page (not the browser) keeps it.
    at.session_state["multi_machine_open"] = True
    at.session_state["run_log_open"] = True
    for _ in range(3):  # refreshes: the whole page, and the followed run
        at.run()
        opened = {e.label: e.proto.expanded for e in at.expander}
        assert opened["More than one machine"] and opened["Log (last 40 lines)"], opened


def test_a_failed_run_opens_its_log(home):
    run_dir = write_run(home, "broken", max_steps=1)
    (run_dir / "train.log").write_text("Traceback: boom\n")
    from trainer.storage import write_json_atomic

    write_json_atomic(run_dir / "status.json", {"state": "failed", "pid": None, "step": 0, "total_steps": 1,
                                                "error": "boom"})
    at = open_page()
    assert [e.proto.expanded for e in at.expander if e.label.startswith("Log")] == [True]


# ---- more than one machine -----------------------------------------------------------------------
def test_multi_node_commands_use_this_python_and_no_other_run_name(home):
    import shlex
    import sys

    from trainer.runs import multi_node_commands

    commands = multi_node_commands(None, 2, 4, "node0:29500")
    assert len(commands) == 2
    for rank, command in enumerate(commands):
        words = shlex.split(command)
        assert sys.executable in words and "python" not in words
        assert f"--node_rank {rank}" in command and "--nproc_per_node 4" in command
        assert words[-1] == str(home / "loras" / "NAME") and "--rdzv_id NAME" in command
        assert f"LORA_DASHBOARD_HOME={home}" in command

    write_run(home, "old-run", max_steps=1)
    at = open_page()
    at.selectbox(key="copy_from").select("old-run").run()
    next(b for b in at.button if b.label == "Copy parameters").click().run()
    assert at.text_input(key="tp_lora_name").value == "old-run-2"
    at.text_input(key="tp_lora_name").input("").run()
    [code] = [c.value for c in at.code if "torch.distributed.run" in c.value]
    assert "old-run" not in code and "/loras/NAME" in code, code


def test_write_the_run_folder_for_several_machines(home):
    from trainer.errors import DashboardError
    from trainer.params import TrainingParameters
    from trainer.runs import write_multi_node_run

    from .trainhelpers import TINY_PARAMS

    params = TrainingParameters.from_dict({**TINY_PARAMS, "lora_name": "multi", "batch_size": 8,
                                           "micro_batch_size": 2})
    run_dir = write_multi_node_run(params, 2, 2)
    stored = json.loads((run_dir / "training_parameters.json").read_text())
    assert stored["num_processes"] == 4 and stored["batch_size"] == 8
    with pytest.raises(DashboardError, match="already exists"):
        write_multi_node_run(params, 2, 2)
    odd = TrainingParameters.from_dict({**TINY_PARAMS, "lora_name": "odd", "batch_size": 4, "micro_batch_size": 2})
    with pytest.raises(DashboardError, match="Batch size"):
        write_multi_node_run(odd, 2, 2)  # 4 processes x micro batch 2 do not divide a batch of 4
    assert not (home / "loras" / "odd").exists()

    at = open_page()
    fill_basic(at, name="from-page", batch_size=8, micro_batch_size=2)
    next(b for b in at.button if b.label == "Write the run folder for these machines").click().run()
    assert any("Wrote" in s.value for s in at.success), errors(at)
    assert json.loads((home / "loras" / "from-page" / "training_parameters.json").read_text())["num_processes"] == 2


def test_the_plan_names_the_modules_lora_will_adapt(home):
    at = open_page()
    fill_basic(at)
    at.selectbox(key="tp_target_modules").set_value("q-v")
    at.run()
    said = [c.value for c in at.caption if c.value.startswith("LoRA adapts")]
    assert said == ["LoRA adapts 4 layers: self_attn.q_proj, self_attn.v_proj in each of 2 blocks."]
    at.selectbox(key="tp_target_modules").set_value("all-linear")
    at.run()
    said = next(c.value for c in at.caption if c.value.startswith("LoRA adapts"))
    assert said.startswith("LoRA adapts 14 layers: ") and "mlp.down_proj" in said
