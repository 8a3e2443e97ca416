"""Which adapter is best (trainer/ranking.py): the tasks a ranking needs, and the ranking read from stored
results — best held-out perplexity among the adapters whose forgetting stays under the threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from trainer import ranking
from trainer.errors import DashboardError
from trainer.perplexity import EvaluationSettings
from trainer.results import append_result, evaluation_key
from trainer.storage import write_json_atomic

SETTINGS = EvaluationSettings()


def fake_run(home: Path, name: str, checkpoints=(2,)) -> Path:
    """A run folder with a final adapter and checkpoints (the weights are bytes that name them: the
    evaluation key hashes them, nothing loads them here)."""
    run_dir = home / "loras" / name
    for folder in [run_dir] + [run_dir / f"checkpoint-{s}" for s in checkpoints]:
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny-llama"}))
        (folder / "adapter_model.safetensors").write_bytes(str(folder).encode())
    for s in checkpoints:
        (run_dir / f"checkpoint-{s}" / "trainer_state.json").write_text(json.dumps({"step": s}))
    (run_dir / "training_parameters.json").write_text(json.dumps(
        {"lora_name": name, "base_model": "tiny-llama", "raw_text_file": "user-guide.txt",
         "eval_dataset": "general-text.txt"}))
    write_json_atomic(run_dir / "status.json", {"state": "completed", "step": 4})
    return run_dir


def store(adapter_dir, text_file: Path, perplexity: float) -> None:
    key = evaluation_key("tiny-llama", adapter_dir, text_file, SETTINGS.stride, SETTINGS.max_length)
    append_result({**key, "adapter": "", "dataset": text_file.name, "tokens": 100, "nll": 1.0,
                   "perplexity": perplexity})


def test_the_best_held_out_score_under_the_threshold_wins(home):
    held_out = home / "datasets" / "held-out.txt"
    held_out.write_text("Text the runs never saw.\n")
    general = home / "datasets" / "general-text.txt"
    runs = [fake_run(home, name) for name in ("lr-low", "lr-mid", "lr-high")]
    store(None, general, 20.0)  # the base model on the general text
    # held-out perplexity and general-text perplexity of each final adapter
    for run_dir, (held, gen) in zip(runs, [(12.0, 20.4), (9.0, 21.0), (7.0, 40.0)]):
        store(run_dir, held_out, held)
        store(run_dir, general, gen)
    table = ranking.ranking_table(runs, threshold=1.1, held_out_file="held-out.txt")
    assert list(table["run"]) == ["lr-mid", "lr-low", "lr-high"]
    assert list(table["rank"].astype(object)) == [1, 2, pd.NA]
    assert table.loc[0, "forgetting ratio"] == pytest.approx(1.05)
    best = ranking.best_adapter(table)
    assert best["run"] == "lr-mid" and best["adapter"] == "final"
    assert "lr-mid" in ranking.ranking_sentence(table, 1.1)
    # A stricter threshold leaves only the run that forgot least.
    strict = ranking.ranking_table(runs, threshold=1.03, held_out_file="held-out.txt")
    assert ranking.best_adapter(strict)["run"] == "lr-low"


def test_missing_evaluations_are_said_and_rank_last(home):
    runs = [fake_run(home, "only")]
    table = ranking.ranking_table(runs, checkpoints=True, held_out_file=None)
    assert list(table["adapter"]) == ["final", "checkpoint-2"]
    assert table["rank"].isna().all()
    assert "need their evaluations" in ranking.ranking_sentence(table, 1.1)


def test_the_tasks_cover_each_adapter_and_the_base_on_both_texts(home):
    runs = [fake_run(home, "a", checkpoints=(2, 4)), fake_run(home, "b", checkpoints=())]
    tasks = ranking.ranking_tasks(runs, checkpoints=True)
    pairs = {(t["adapter_path"], t["dataset"]) for t in tasks}
    # run a: base, final, two checkpoints; run b: base, final; each on its eval data and the general text
    assert len(tasks) == 2 * 4 + 2 * 2
    assert ("loras/a/checkpoint-4", "general-text.txt") in pairs
    finals_only = ranking.ranking_tasks(runs, checkpoints=False)
    assert len(finals_only) == 2 * 2 + 2 * 2


def test_a_run_without_held_out_text_is_named(home):
    run_dir = fake_run(home, "no-eval")
    params = json.loads((run_dir / "training_parameters.json").read_text())
    params["eval_dataset"] = ""
    (run_dir / "training_parameters.json").write_text(json.dumps(params))
    with pytest.raises(DashboardError, match="no-eval has no eval data"):
        ranking.ranking_tasks([run_dir])


# ---- the experiment table and the runs a ranking can score -------------------------------------------------


def grid_experiment(home: Path) -> list[Path]:
    """A recorded 2 x 2 experiment whose runs have metrics (train and eval losses) and final adapters."""
    from trainer.sweeps import record_experiment

    names = ["grid-lr1e-4-r8", "grid-lr1e-4-r16", "grid-lr2e-4-r8", "grid-lr2e-4-r16"]
    runs = []
    for index, name in enumerate(names):
        run_dir = fake_run(home, name, checkpoints=())
        params = json.loads((run_dir / "training_parameters.json").read_text())
        params.update(learning_rate=[1e-4, 1e-4, 2e-4, 2e-4][index], lora_rank=[8, 16, 8, 16][index])
        (run_dir / "training_parameters.json").write_text(json.dumps(params))
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in [
            {"step": 1, "loss": 3.0, "tokens": 10}, {"step": 2, "eval_loss": 2.5 - index / 10},
            {"step": 4, "loss": 2.0 - index / 10, "tokens": 40}, {"step": 4, "eval_loss": 2.0 - index / 10}]))
        runs.append(run_dir)
    record_experiment("grid", {"learning_rate": [1e-4, 2e-4], "lora_rank": [8, 16]}, names)
    return runs


def test_the_experiment_table_has_the_swept_parameters_the_losses_and_the_ranking(home):
    runs = grid_experiment(home)
    general = home / "datasets" / "general-text.txt"
    store(None, general, 20.0)
    # final adapters: held-out perplexity (on their eval data) and general-text perplexity; the third forgets
    # too much, the fourth is not evaluated yet
    for run_dir, (held, gen) in zip(runs[:3], [(9.0, 21.0), (8.0, 21.5), (5.0, 30.0)]):
        held_out = ranking.held_out_text(run_dir)[0]
        store(run_dir, held_out, held)
        store(run_dir, general, gen)
    table = ranking.experiment_table("grid", threshold=1.1).set_index("run")
    assert list(table.columns) == ["learning_rate", "lora_rank", *ranking.EXPERIMENT_COLUMNS]
    assert list(table.index) == [r.name for r in runs]  # grid order, not ranking order
    assert list(table["learning_rate"]) == [1e-4, 1e-4, 2e-4, 2e-4]
    assert list(table["lora_rank"]) == [8, 16, 8, 16]
    assert list(table["state"]) == ["completed"] * 4 and list(table["step"]) == [4] * 4
    assert list(table["final loss"]) == pytest.approx([2.0, 1.9, 1.8, 1.7])
    assert list(table["final eval loss"]) == pytest.approx([2.0, 1.9, 1.8, 1.7])  # the last evaluation, not the first
    assert table.loc["grid-lr1e-4-r16", "forgetting ratio"] == pytest.approx(1.075)
    assert list(table["rank"].astype(object)) == [2, 1, pd.NA, pd.NA]
    assert table["held-out perplexity"].isna().tolist() == [False, False, False, True]
    # A looser threshold lets the lowest held-out perplexity win.
    loose = ranking.experiment_table("grid", threshold=2.0).set_index("run")
    assert loose.loc["grid-lr2e-4-r8", "rank"] == 1


def test_the_experiment_table_lists_queued_and_missing_runs_without_numbers(home):
    import shutil

    runs = grid_experiment(home)
    shutil.rmtree(runs[3])
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (runs[2] / name).unlink()  # still waiting in the queue: no adapter yet
    write_json_atomic(runs[2] / "status.json", {"state": "queued", "waiting": True})
    (runs[2] / "metrics.jsonl").unlink()
    table = ranking.experiment_table("grid").set_index("run")
    assert table.loc["grid-lr2e-4-r16", "state"] == ranking.MISSING_RUN
    assert pd.isna(table.loc["grid-lr2e-4-r16", "learning_rate"])
    assert table.loc["grid-lr2e-4-r8", "lora_rank"] == 8
    assert pd.isna(table.loc["grid-lr2e-4-r8", "final loss"]) and pd.isna(table.loc["grid-lr2e-4-r8", "rank"])
    with pytest.raises(DashboardError, match="There is no experiment named nothing"):
        ranking.experiment_table("nothing")


def test_runs_that_cannot_be_ranked_are_left_out_with_a_reason(home):
    ready = fake_run(home, "ready", checkpoints=(2,))
    no_eval = fake_run(home, "no-eval", checkpoints=())
    params = json.loads((no_eval / "training_parameters.json").read_text())
    (no_eval / "training_parameters.json").write_text(json.dumps({**params, "eval_dataset": ""}))
    only_checkpoints = fake_run(home, "only-checkpoints", checkpoints=(2,))
    (only_checkpoints / "adapter_model.safetensors").unlink()
    scored, left_out = ranking.rankable_runs([ready, no_eval, only_checkpoints])
    assert scored == [ready]
    assert left_out == ["no-eval has no eval data (choose a held-out text to rank it)",
                        "only-checkpoints has no saved adapter yet"]
    # every checkpoint included: a run with checkpoints only takes part; a held-out text chosen: so does no-eval
    scored, left_out = ranking.rankable_runs([ready, no_eval, only_checkpoints], True, "general-text.txt")
    assert scored == [ready, no_eval, only_checkpoints] and left_out == []
    assert len(ranking.ranking_plan([ready, no_eval])) == 2 * 2  # ready alone: base and final on both texts
    with pytest.raises(DashboardError, match="Nothing to rank: only-checkpoints has no saved adapter yet"):
        ranking.ranking_plan([only_checkpoints])
    with pytest.raises(DashboardError, match="Choose the runs to rank"):
        ranking.ranking_plan([])
