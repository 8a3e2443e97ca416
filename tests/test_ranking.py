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
