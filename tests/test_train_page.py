"""AppTest tests of the Train page: validation next to the fields, launching, following, stopping, copying."""

from __future__ import annotations

import json

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


def test_fresh_page_asks_for_a_name_and_data(home):
    at = open_page()
    assert "The LoRA name is empty." in errors(at)
    assert any("Choose a dataset" in e for e in errors(at))
    assert start_button(at).disabled


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
