"""Evaluate page, the experiments and ranking sections: a recorded experiment (a sweep) as one table, and which
adapter of an experiment, or of runs ticked together, is best by held-out perplexity and forgetting.

Widgets and calls only: the tables and the ranking rule are trainer.ranking's. The evaluations a ranking needs
are started by the Evaluate page's own `evaluation_controls` (passed in: this module is imported by the page
script, which it must not import back), so they are the page's usual background jobs with its job panel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import streamlit as st

from views.common import show_error
from trainer.charts import loss_chart
from trainer.errors import DashboardError
from trainer.metrics import metrics_frame
from trainer.perplexity import DEFAULT_SETTINGS, LONGEST_WINDOW, EvaluationSettings
from trainer.ranking import (
    DEFAULT_THRESHOLD, best_adapter, experiment_table, missing_evaluations, rankable_runs, ranking_plan,
    ranking_sentence, ranking_table,
)
from trainer.results import text_file_names
from trainer.sweeps import experiment_run_dirs, list_experiments

FROM_EXPERIMENT, FROM_TICKED = "experiment", "ticked"
EACH_RUNS_EVAL_DATA = ""  # the held-out text choice that scores each run on its own eval data
RANKING_PREFIX = "ranking"  # the title prefix of ranking jobs (the command line's `rank --evaluate` uses it too)
# The Evaluate page's widget keys that the Try it and Export tabs read: the focused run, and per run the adapter
# each tab uses (views/evaluate.py focus_section, try_tab and export_tab).
FOCUSED_RUN = "ev_run"
TAB_ADAPTER_KEYS = {"Try it": "ev_try_adapter_{run}", "Export": "ev_exp_adapter_{run}"}
NUMBER_COLUMNS = {
    "final loss": st.column_config.NumberColumn(format="%.4f"),
    "final eval loss": st.column_config.NumberColumn(format="%.4f"),
    "held-out perplexity": st.column_config.NumberColumn(format="%.3f"),
    "forgetting ratio": st.column_config.NumberColumn(
        format="%.3f", help="Perplexity on the general text with the adapter divided by the base model's."),
}
THRESHOLD_HELP = ("The forgetting ratio is the adapter's perplexity on a general text (one it was not trained on) "
                  "divided by the base model's: 1.0 means nothing was forgotten, 1.3 means the model is 30% more "
                  "surprised by ordinary text. Only adapters at or under this ratio can win; the others are "
                  "listed after them, whatever their held-out score.")


def experiments_section(run_paths: dict[str, Path], ticked: list[str], evaluation_controls: Callable) -> None:
    """The Experiments section (a recorded experiment as one table) and the ranking of its adapters, or of the
    runs ticked in the runs table."""
    st.divider()
    st.subheader("Experiments")
    names = [experiment["name"] for experiment in list_experiments()]
    name = st.selectbox("Experiment", names, key="ex_name", help="A sweep (Train page, or `python -m trainer "
                        "sweep`) records its runs as one experiment in loras/.experiments/.") if names else None
    if name is None:
        st.caption("No experiments yet: a sweep on the Train page (a list of values for a parameter) or "
                   "`python -m trainer sweep` records one. Runs ticked together can be ranked below all the same.")
    table_slot = st.container()
    st.subheader("Which adapter is best")
    sources = ([FROM_EXPERIMENT] if name else []) + [FROM_TICKED]
    source = st.radio("Rank", sources, key="ex_source", horizontal=True, format_func=lambda choice: (
        f"the experiment {name}" if choice == FROM_EXPERIMENT else f"the runs ticked above ({len(ticked)})"))
    threshold, checkpoints, settings, held_out_file = ranking_inputs()
    with table_slot:
        if name:
            experiment_table_view(name, threshold, settings, held_out_file)
    if source == FROM_EXPERIMENT:
        run_dirs, what = experiment_run_dirs(name), f"experiment {name}"
    else:
        run_dirs, what = [run_paths[n] for n in ticked if n in run_paths], ", ".join(ticked) or "no runs"
    evaluation_controls("Evaluate and rank", "ex_rank_start",
                        lambda: ranking_plan(run_dirs, checkpoints, settings, held_out_file),
                        f"{RANKING_PREFIX} of {what}", RANKING_PREFIX)
    ranking_view(run_paths, run_dirs, checkpoints, threshold, settings, held_out_file)


def ranking_inputs() -> tuple[float, bool, EvaluationSettings, str | None]:
    """The threshold, whether checkpoints take part, and the evaluation's texts and window."""
    cols = st.columns(3)
    threshold = cols[0].number_input("Forgetting threshold", 0.01, 100.0, DEFAULT_THRESHOLD, 0.05, format="%.2f",
                                     key="ex_threshold", help=THRESHOLD_HELP)
    checkpoints = cols[1].checkbox("Include every checkpoint", key="ex_checkpoints",
                                   help="Off: each run's final adapter. On: every saved checkpoint too (each one is "
                                        "two more evaluations).")
    texts = text_file_names()
    held_out = cols[2].selectbox(
        "Held-out text", [EACH_RUNS_EVAL_DATA, *texts], key="ex_held_out",
        format_func=lambda choice: choice or "each run's eval data",
        help="The text the held-out perplexity is measured on: each run's own eval data, or one .txt of datasets/ "
             "for every run (it should be text the runs did not train on).")
    cols = st.columns(3)
    general = DEFAULT_SETTINGS.general_text
    general = cols[0].selectbox("General text (forgetting)", texts, key="ex_general",
                                index=texts.index(general) if general in texts else 0)
    stride = cols[1].number_input("Stride", 1, LONGEST_WINDOW, DEFAULT_SETTINGS.stride, key="ex_stride")
    max_length = cols[2].number_input("Max length", 2, LONGEST_WINDOW, DEFAULT_SETTINGS.max_length, key="ex_maxlen")
    settings = EvaluationSettings(int(stride), int(max_length), general_text=general or DEFAULT_SETTINGS.general_text)
    return float(threshold), bool(checkpoints), settings, held_out or None


def experiment_table_view(name: str, threshold: float, settings: EvaluationSettings, held_out_file: str | None) -> None:
    try:
        table = experiment_table(name, threshold, settings.validate(), held_out_file)
    except DashboardError as exc:
        show_error(exc)
        return
    st.dataframe(table, hide_index=True, width="stretch", column_config=NUMBER_COLUMNS)
    st.caption("One row per run of the experiment, its swept parameters first. Held-out perplexity, forgetting "
               "ratio and rank are those of each run's final adapter, with the ranking settings below, once "
               "evaluated.")


def ranking_view(run_paths: dict[str, Path], run_dirs: list[Path], checkpoints: bool, threshold: float,
                 settings: EvaluationSettings, held_out_file: str | None) -> None:
    """The ranking table, best first, the sentence naming the best adapter, its loss curve and its buttons."""
    if not run_dirs:
        st.caption("Tick runs in the runs table above, or choose an experiment, to rank their adapters.")
        return
    scored, left_out = rankable_runs(run_dirs, checkpoints, held_out_file)
    if left_out:
        st.caption(f"Not ranked: {'; '.join(left_out)}.")
    try:
        table = ranking_table(scored, checkpoints, threshold, settings.validate(), held_out_file)
    except DashboardError as exc:
        show_error(exc)
        return
    if table.empty:
        return
    st.dataframe(table.drop(columns="path"), hide_index=True, width="stretch",
                 column_config=NUMBER_COLUMNS)
    missing = missing_evaluations(table)
    if missing:
        st.caption(f"{missing} adapter(s) have no stored held-out perplexity or forgetting ratio with these "
                   f"settings (empty cells, listed last): *Evaluate and rank* computes them.")
    best = best_adapter(table)
    (st.success if best else st.info)(ranking_sentence(table, threshold))
    if best and best["run"] in run_paths:
        best_panel(best, run_paths[best["run"]])


def best_panel(best: dict, run_dir: Path) -> None:
    """The best adapter's loss curve and the buttons that choose it in the Try it and Export tabs."""
    chart = loss_chart(metrics_frame(run_dir))
    if chart is not None:
        st.altair_chart(chart, width="stretch")
        st.caption(f"The loss of {best['run']}" + (f", whose {best['adapter']} is the best adapter (step "
                                                   f"{best['step']})." if best["adapter"] != "final" else "."))
    cols = st.columns([1, 1, 3])
    for column, tab in zip(cols, TAB_ADAPTER_KEYS):
        column.button(f"{'Try' if tab == 'Try it' else 'Export'} {best['run']} ({best['adapter']})",
                      key=f"ex_best_{tab.split()[0].lower()}", on_click=choose_adapter,
                      args=(best["run"], best["adapter"], tab))
    chosen = st.session_state.pop("ex_chosen", None)
    if chosen:
        st.info(chosen)


def choose_adapter(run: str, adapter: str, tab: str) -> None:
    """Make `run` the page's focused run with `adapter` chosen in `tab` (a button callback: it runs before the
    page draws those widgets, so their values can still be set)."""
    st.session_state[FOCUSED_RUN] = run
    st.session_state[TAB_ADAPTER_KEYS[tab].format(run=run)] = adapter
    st.session_state["ex_chosen"] = (f"{run} ({adapter}) is chosen under *Run to evaluate, try and export*: open "
                                     f"the {tab} tab below.")
