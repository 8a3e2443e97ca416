"""Sweeps (trainer/sweeps.py): a grid of values becomes named, validated runs, recorded as one experiment."""

from __future__ import annotations

import json

import pytest

from trainer import sweeps
from trainer.errors import DashboardError
from trainer.params import TrainingParameters


def test_a_two_by_two_grid_names_four_runs():
    base = TrainingParameters(lora_name="exp", raw_text_file="user-guide.txt")
    swept = {"learning_rate": sweeps.parse_values("learning_rate", "1e-4, 2e-4"),
             "lora_rank": sweeps.parse_values("lora_rank", "8,16")}
    runs = sweeps.grid(base, swept)
    assert [r.lora_name for r in runs] == ["exp-lr1e-4-r8", "exp-lr1e-4-r16", "exp-lr2e-4-r8", "exp-lr2e-4-r16"]
    assert [(r.learning_rate, r.lora_rank) for r in runs] == [(1e-4, 8), (1e-4, 16), (2e-4, 8), (2e-4, 16)]
    assert all(r.raw_text_file == "user-guide.txt" for r in runs)


def test_values_are_read_as_their_parameter_reads_them():
    assert sweeps.parse_values("target_modules", "q-v, all-linear") == ["q-v", "all-linear"]
    assert sweeps.value_text(3e-4) == "3e-4" and sweeps.value_text(0.05) == "0.05" and sweeps.value_text(8) == "8"
    with pytest.raises(DashboardError) as info:
        sweeps.parse_values("lora_rank", "8, eight")
    assert info.value.field == "lora_rank" and "lora_rank" not in info.value.message
    with pytest.raises(DashboardError, match="twice"):
        sweeps.parse_values("lora_rank", "8, 8")
    with pytest.raises(DashboardError, match="no parameter"):
        sweeps.parse_values("no_such_thing", "1")


def test_a_grid_refuses_a_bad_combination_before_anything_is_written(home):
    base = TrainingParameters(lora_name="exp", raw_text_file="user-guide.txt", micro_batch_size=4)
    with pytest.raises(DashboardError) as info:
        sweeps.grid(base, {"batch_size": [8, 6]})  # 6 is no multiple of the micro batch
    assert info.value.field == "batch_size"
    assert not list((home / "loras").iterdir())


def test_an_experiment_is_recorded_once(home):
    path = sweeps.record_experiment("exp", {"lora_rank": [8, 16]}, ["exp-r8", "exp-r16"])
    assert json.loads(path.read_text())["runs"] == ["exp-r8", "exp-r16"]
    assert sweeps.read_experiment("exp")["swept"] == {"lora_rank": [8, 16]}
    assert [e["name"] for e in sweeps.list_experiments()] == ["exp"]
    with pytest.raises(DashboardError, match="already exists"):
        sweeps.record_experiment("exp", {"lora_rank": [4]}, ["exp-r4"])


def test_a_sweep_file(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"base": {"lora_name": "s", "raw_text_file": "user-guide.txt"},
                                "sweep": {"learning_rate": [1e-4, 3e-4], "lora_rank": "4, 8"}}))
    base, swept = sweeps.read_sweep_file(path)
    assert base.lora_name == "s" and swept == {"learning_rate": [1e-4, 3e-4], "lora_rank": [4, 8]}
    path.write_text("[1, 2]")
    with pytest.raises(DashboardError, match="base"):
        sweeps.read_sweep_file(path)


def test_the_page_offers_every_numeric_or_choice_parameter_and_no_name_file_or_switch():
    offered = sweeps.sweepable_parameters()
    for name in ("learning_rate", "lora_rank", "lora_alpha", "lora_dropout", "epochs", "cutoff_len",
                 "micro_batch_size", "lr_scheduler_type", "optimizer", "target_modules"):
        assert name in offered, name
    for name in ("lora_name", "base_model", "dataset", "raw_text_file", "format", "eval_dataset", "chat_template",
                 "packing", "hard_cut_string", "custom_target_modules", "train_only_after"):
        assert name not in offered, name
    assert offered == [n for n in sweeps.FIELDS if n in offered], "in form order"


def test_the_pages_lists_of_values_are_read_and_a_bad_one_named_at_its_field():
    swept, problems = sweeps.read_sweep_texts({"learning_rate": "1e-4, 2e-4", "lora_rank": "8, eight",
                                               "optimizer": "sgd, adamw_torch"})
    assert swept == {"learning_rate": [1e-4, 2e-4], "optimizer": ["sgd", "adamw_torch"]}
    assert [(p.field, p.message) for p in problems] == [("lora_rank", "LoRA rank must be a whole number; got 'eight'.")]


def test_a_planned_sweep_names_its_runs_and_refuses_what_launch_refuses(home):
    base = TrainingParameters(lora_name="exp", raw_text_file="user-guide.txt", cutoff_len=64, overlap_len=16)
    runs = sweeps.plan_sweep(base, {"lora_rank": [4, 8]})
    assert [r.lora_name for r in runs] == ["exp-r4", "exp-r8"]
    with pytest.raises(DashboardError) as info:  # the failing combination is named
        sweeps.plan_sweep(base, {"lora_rank": [4, 8], "overlap_len": [16, 64]})
    assert info.value.message.startswith("exp-r4-overlap_len64: Overlap length (64)") and info.value.field == \
        "overlap_len"
    (home / "loras" / "exp-r8").mkdir()
    with pytest.raises(DashboardError, match="A LoRA named exp-r8 already exists"):
        sweeps.plan_sweep(base, {"lora_rank": [4, 8]})
    with pytest.raises(DashboardError, match="A LoRA named exp-r8 already exists"):
        sweeps.launch_sweep(base, {"lora_rank": [4, 8]})
    assert sorted(p.name for p in (home / "loras").iterdir()) == ["exp-r8"]  # nothing written
    sweeps.record_experiment("other", {"lora_rank": [4]}, ["other-r4"])
    with pytest.raises(DashboardError, match="An experiment named other already exists"):
        sweeps.plan_sweep(base, {"lora_rank": [4]}, name="other")
