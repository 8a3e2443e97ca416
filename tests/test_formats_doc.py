"""FORMATS.md documents every file a run writes: each key the trainer really writes to status.json,
metrics.jsonl and a checkpoint's trainer_state.json, and every training parameter, is named in it."""

from __future__ import annotations

import dataclasses
import json
import re

from tests.trainhelpers import metrics_of, run_trainer, status_of, write_run
from trainer.home import CODE_ROOT
from trainer.params import TrainingParameters


def documented_names() -> set[str]:
    """Every `name` written in backticks in FORMATS.md (a backticked list such as `a`, `b` counts each)."""
    text = (CODE_ROOT / "FORMATS.md").read_text(encoding="utf-8")
    return {name for quoted in re.findall(r"`([^`\n]+)`", text) for name in re.split(r"[,\s]+", quoted) if name}


def undocumented(keys) -> list[str]:
    names = documented_names()
    return sorted(set(keys) - names)


def test_every_training_parameter_is_documented():
    assert undocumented(f.name for f in dataclasses.fields(TrainingParameters)) == []


def test_every_key_a_run_writes_is_documented(home, monkeypatch):
    # A run with evaluation, checkpoints and a resume, so status and metrics hold every kind of line.
    run_dir = write_run(home, "documented", max_steps=2, eval_dataset="general-text.txt", eval_steps=1,
                        save_steps=1, logging_steps=1)
    done = run_trainer(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = run_trainer(run_dir, "--resume", "checkpoint-1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    status_keys = set(status_of(run_dir))
    assert status_of(run_dir)["resumed_from"] == "checkpoint-1"
    metric_keys = {key for line in metrics_of(run_dir) for key in line}
    assert {"loss", "eval_loss"} <= metric_keys  # both kinds of line were written
    state_keys = set(json.loads((run_dir / "checkpoint-1" / "trainer_state.json").read_text()))

    # A failed run adds the failure fields.
    failing = write_run(home, "documented-failure", max_steps=2)
    monkeypatch.setenv("LORA_DASHBOARD_FAULT", "0:1:injected failure")
    failed = run_trainer(failing)
    assert failed.returncode != 0
    failed_status = status_of(failing)
    assert failed_status["state"] == "failed" and "injected failure" in failed_status["error"]
    status_keys |= set(failed_status)

    assert undocumented(status_keys) == [], "status.json keys missing from FORMATS.md"
    assert undocumented(metric_keys) == [], "metrics.jsonl keys missing from FORMATS.md"
    assert undocumented(state_keys) == [], "trainer_state.json keys missing from FORMATS.md"


def test_the_check_itself_finds_an_undocumented_key():
    assert undocumented({"step", "a_key_nobody_documented"}) == ["a_key_nobody_documented"]
