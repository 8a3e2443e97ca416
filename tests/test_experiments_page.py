"""AppTest tests of the Evaluate page's Experiments and "Which adapter is best" sections (views/experiments.py):
an experiment of four runs whose evaluations are stored as results files, a real ranking evaluation of a
trained tiny run, and the buttons that choose the best adapter in the Try it and Export tabs."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from trainer import ranking
from trainer.home import CODE_ROOT
from trainer.jobs import list_jobs
from trainer.results import adapter_run_name, append_result, evaluation_key, read_results
from trainer.sweeps import record_experiment

from .evalhelpers import copy_run, make_run, trained_run_source, wait_for
from .test_evaluate_page import open_page, rerun

NAMES = ["grid-lr1e-4-r8", "grid-lr1e-4-r16", "grid-lr2e-4-r8", "grid-lr2e-4-r16"]
GENERAL = "general-text.txt"
# held-out perplexity and general-text perplexity of each run's final adapter (the base model scores 20.0 on
# the general text): forgetting ratios 1.02, 1.05, 1.5 and 1.08
SCORES = {"grid-lr1e-4-r8": (9.0, 20.4), "grid-lr1e-4-r16": (8.0, 21.0), "grid-lr2e-4-r8": (5.0, 30.0),
          "grid-lr2e-4-r16": (8.5, 21.6)}


def experiment_table(at: AppTest):
    """The Experiments table (the only one with a final eval loss column), by run."""
    return next(d.value for d in at.dataframe if "final eval loss" in d.value.columns).set_index("run")


def ranking_of(at: AppTest):
    """The ranking table (the only one with a within-threshold column), best first."""
    return next(d.value for d in at.dataframe if "within threshold" in d.value.columns)


def store(adapter_dir, text_file, perplexity: float) -> None:
    key = evaluation_key("tiny-llama", adapter_dir, text_file, 256, 512)
    append_result({**key, "adapter": adapter_run_name(adapter_dir), "dataset": text_file.name, "tokens": 100,
                   "nll": 1.0, "perplexity": perplexity})


def with_adapter(folder) -> None:
    """Adapter files that name their folder (the evaluation key hashes the weights; nothing loads them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny-llama"}))
    (folder / "adapter_model.safetensors").write_bytes(str(folder).encode())


@pytest.fixture
def grid(home):
    """A recorded 2 x 2 experiment (learning rate x rank) of finished runs with a checkpoint each, its eval data
    `held-out.txt`, and every final adapter's evaluations stored."""
    (home / "datasets" / "held-out.txt").write_text("A text none of the runs trained on, to score them.\n")
    runs = {}
    for index, name in enumerate(NAMES):
        params = {"learning_rate": [1e-4, 1e-4, 2e-4, 2e-4][index], "lora_rank": [8, 16, 8, 16][index],
                  "eval_dataset": "held-out.txt", "save_steps": 2}
        run_dir = make_run(home, name, params=params, losses=[3.0, 2.5, 2.2, 2.0 - index / 10],
                           evals={4: 2.1 - index / 10})
        with_adapter(run_dir)
        with_adapter(run_dir / "checkpoint-2")
        (run_dir / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"step": 2}))
        runs[name] = run_dir
    record_experiment("grid", {"learning_rate": [1e-4, 2e-4], "lora_rank": [8, 16]}, NAMES)
    general = home / "datasets" / GENERAL
    store(None, general, 20.0)
    for name, (held, gen) in SCORES.items():
        store(runs[name], ranking.held_out_text(runs[name])[0], held)
        store(runs[name], general, gen)
    return runs


def test_an_experiment_shows_its_swept_columns_and_its_best_adapter(grid):
    at = open_page()
    assert at.selectbox(key="ex_name").value == "grid"
    table = experiment_table(at)
    assert list(table.index) == NAMES
    assert list(table.columns[:2]) == ["learning_rate", "lora_rank"]
    assert list(table["lora_rank"]) == [8, 16, 8, 16] and list(table["learning_rate"]) == [1e-4, 1e-4, 2e-4, 2e-4]
    assert list(table["state"]) == ["completed"] * 4
    assert table.loc["grid-lr2e-4-r16", "final loss"] == pytest.approx(1.7)
    assert table.loc["grid-lr2e-4-r16", "final eval loss"] == pytest.approx(1.8)
    assert table.loc["grid-lr1e-4-r16", "held-out perplexity"] == 8.0
    assert table.loc["grid-lr2e-4-r8", "forgetting ratio"] == pytest.approx(1.5)

    ranked = ranking_of(at)
    # best first: under the default threshold 1.1 by held-out perplexity, then the one that forgot too much
    assert list(ranked["run"]) == ["grid-lr1e-4-r16", "grid-lr2e-4-r16", "grid-lr1e-4-r8", "grid-lr2e-4-r8"]
    assert list(ranked["forgetting ratio"]) == pytest.approx([1.05, 1.08, 1.02, 1.5])
    assert at.success[0].value == (
        "Best: grid-lr1e-4-r16 (final), held-out perplexity 8.000, forgetting ratio 1.050 (under 1.1).")
    assert any(json.loads(chart.proto.spec).get("title") == "Training loss" for chart in at.get("vega_lite_chart"))

    at.number_input(key="ex_threshold").set_value(1.04)  # below the best's ratio 1.05: the next one wins
    rerun(at)
    assert ranking_of(at)["run"].iloc[0] == "grid-lr1e-4-r8"
    assert "Best: grid-lr1e-4-r8 (final)" in at.success[0].value
    assert experiment_table(at).loc["grid-lr1e-4-r8", "rank"] == 1

    at.number_input(key="ex_threshold").set_value(1.01)  # nobody forgets that little
    rerun(at)
    assert not any(s.value.startswith("Best:") for s in at.success)
    assert any("No adapter keeps its forgetting ratio under 1.01" in i.value for i in at.info)


def test_checkpoints_without_evaluations_are_said_and_listed_last(grid):
    at = open_page()
    at.checkbox(key="ex_checkpoints").check()
    rerun(at)
    ranked = ranking_of(at)
    assert len(ranked) == 8
    assert list(ranked["adapter"][4:]) == ["checkpoint-2"] * 4 and ranked["held-out perplexity"][4:].isna().all()
    assert any("4 adapter(s) have no stored held-out perplexity" in c.value for c in at.caption)
    assert "Best: grid-lr1e-4-r16 (final)" in at.success[0].value  # the evaluated ones are still ranked


def test_the_buttons_choose_the_best_adapter_in_the_export_and_try_it_tabs(grid):
    general = grid["grid-lr2e-4-r8"].parent.parent / "datasets" / GENERAL
    checkpoint = grid["grid-lr2e-4-r8"] / "checkpoint-2"  # the best of all, once checkpoints take part
    store(checkpoint, ranking.held_out_text(grid["grid-lr2e-4-r8"])[0], 6.0)
    store(checkpoint, general, 20.2)
    at = open_page()
    at.checkbox(key="ex_checkpoints").check()
    rerun(at)
    assert "Best: grid-lr2e-4-r8 (checkpoint-2)" in at.success[0].value
    at.button(key="ex_best_export").click()
    rerun(at)
    assert at.selectbox(key="ev_run").value == "grid-lr2e-4-r8"
    assert at.selectbox(key="ev_exp_adapter_grid-lr2e-4-r8").value == "checkpoint-2"
    assert at.text_input(key="ev_exp_name_grid-lr2e-4-r8_checkpoint-2").value == "grid-lr2e-4-r8-checkpoint-2-merged"
    assert any("open the Export tab below" in i.value for i in at.info)
    at.button(key="ex_best_try").click()
    rerun(at)
    assert at.selectbox(key="ev_try_adapter_grid-lr2e-4-r8").value == "checkpoint-2"
    assert at.selectbox(key="ev_run").value == "grid-lr2e-4-r8"
    assert not at.exception and not any("Session State API" in w.value for w in at.warning)


def test_evaluate_and_rank_starts_the_evaluations_of_ticked_runs(home, tiny_model_dir, tmp_path_factory):
    copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)
    (home / "datasets" / "held-out.txt").write_text(
        (CODE_ROOT / "datasets" / "user-guide.txt").read_text()[:1500])
    at = open_page()
    assert at.radio(key="ex_source").options == ["the runs ticked above (1)"]  # no experiment recorded
    at.button(key="ex_rank_start").click()  # the trained run has no eval data, and none is chosen
    rerun(at)
    assert [e.value for e in at.error] == [
        "Nothing to rank: trained has no eval data (choose a held-out text to rank it)."]
    assert not list_jobs()
    at.selectbox(key="ex_held_out").set_value("held-out.txt")
    at.number_input(key="ex_stride").set_value(64)
    at.number_input(key="ex_maxlen").set_value(128)
    at.number_input(key="ex_threshold").set_value(50.0)
    rerun(at)
    at.button(key="ex_rank_start").click()
    rerun(at)
    assert any("4 evaluation(s) started in the background" in i.value for i in at.info)
    assert [job["title"] for job in list_jobs()] == ["ranking of trained"]
    records = wait_for(lambda: len(read_results()) == 4 and read_results(), timeout=240,
                       what="four ranking results in results/perplexity.jsonl")
    by_text = {(r["checkpoint"], r["dataset"]): r["perplexity"] for r in records}
    assert set(by_text) == {(c, t) for c in ("", "final") for t in ("held-out.txt", GENERAL)}
    wait_for(lambda: list_jobs()[0]["state"] == "completed", timeout=60, what="the ranking job to end")
    rerun(at)
    ranked = ranking_of(at)
    assert list(ranked["run"]) == ["trained"] and list(ranked["adapter"]) == ["final"]
    assert ranked["held-out perplexity"][0] == pytest.approx(by_text[("final", "held-out.txt")])
    assert ranked["forgetting ratio"][0] == pytest.approx(by_text[("final", GENERAL)] / by_text[("", GENERAL)])
    assert "Best: trained (final)" in at.success[0].value
    at.button(key="ex_rank_start").click()  # the same ranking again: every evaluation is reused
    rerun(at)
    assert any("were done before" in i.value for i in at.info) and len(read_results()) == 4
