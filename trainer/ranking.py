"""Which adapter is best: every final adapter (and, if asked, every checkpoint) of a set of runs, scored on
held-out text and on a general text, ranked by held-out perplexity among those whose forgetting stays under
a threshold.

The evaluations are ordinary perplexity jobs (trainer/jobs.py) whose results land in the results store, so
an evaluation already made is reused and the ranking is read from stored results only.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .errors import DashboardError
from .home import datasets_dir, resolve_inside
from .jobs import perplexity_task
from .perplexity import EvaluationSettings
from .results import (TEXT_FROM_EVAL, checkpoint_label, evaluation_key, find_result, forgetting_ratio,
                      read_results, text_to_evaluate)
from .runfiles import read_status
from .runtable import adapter_choices, run_base_model, run_parameters

RANKING_COLUMNS = ["run", "adapter", "step", "held-out perplexity", "forgetting ratio", "within threshold", "rank"]
DEFAULT_THRESHOLD = 1.1  # "little forgetting" in results.forgetting_sentence


def held_out_text(run_dir: Path, held_out_file: str | None = None) -> tuple[Path, str]:
    """The held-out text of a run: a chosen .txt of datasets/ for every run, else the run's own eval data."""
    if held_out_file:
        return resolve_inside(datasets_dir(), held_out_file, "text file"), held_out_file
    if not run_parameters(run_dir).get("eval_dataset"):
        raise DashboardError(f"{Path(run_dir).name} has no eval data: choose a held-out text for the ranking, or "
                             f"train with an eval dataset.")
    return text_to_evaluate(TEXT_FROM_EVAL, run_dir)


def ranked_adapters(run_dir: Path, checkpoints: bool) -> dict[str, Path]:
    """The adapters of a run that take part: the final one, and every checkpoint when asked."""
    choices = adapter_choices(run_dir)
    return {label: path for label, path in choices.items() if label == "final" or checkpoints}


def ranking_tasks(run_dirs: list[Path], checkpoints: bool = False, settings: EvaluationSettings | None = None,
                  held_out_file: str | None = None) -> list[dict]:
    """The perplexity evaluations a ranking needs: each adapter and its base model on the held-out text and on
    the general text (identical ones are reused by jobs.start_perplexity)."""
    settings = (settings or EvaluationSettings()).validate()
    general = resolve_inside(datasets_dir(), settings.general_text, "general text")
    tasks = []
    for run_dir in run_dirs:
        adapters = ranked_adapters(run_dir, checkpoints)
        if not adapters:
            raise DashboardError(f"{Path(run_dir).name} has no saved adapter yet.")
        model = run_base_model(run_dir)
        texts = [held_out_text(run_dir, held_out_file), (general, settings.general_text)]
        for text_file, label in texts:
            for adapter_dir in [None, *adapters.values()]:
                tasks.append(perplexity_task(model, adapter_dir, text_file, label, settings.stride,
                                             settings.max_length, precision=settings.precision))
    return tasks


def _stored(model: str, adapter_dir: Path | None, text_file: Path, settings: EvaluationSettings,
            records: list[dict]) -> float | None:
    found = find_result(evaluation_key(model, adapter_dir, text_file, settings.stride, settings.max_length,
                                       settings.precision), records)
    return None if found is None else float(found["perplexity"])


def _step(run_dir: Path, adapter_dir: Path) -> int | None:
    label = checkpoint_label(adapter_dir)
    if label != "final":
        return int(label.split("-")[1])
    return (read_status(run_dir) or {}).get("step")


def ranking_table(run_dirs: list[Path], checkpoints: bool = False, threshold: float = DEFAULT_THRESHOLD,
                  settings: EvaluationSettings | None = None, held_out_file: str | None = None) -> pd.DataFrame:
    """One row per adapter with its stored held-out perplexity and forgetting ratio, best first: the adapters
    whose ratio stays under `threshold`, by held-out perplexity, then the others. Missing evaluations leave
    the numbers empty (and the row last)."""
    settings = (settings or EvaluationSettings()).validate()
    general = resolve_inside(datasets_dir(), settings.general_text, "general text")
    records = read_results()
    rows = []
    for run_dir in run_dirs:
        model = run_base_model(run_dir)
        held_out = held_out_text(run_dir, held_out_file)[0]
        base_general = _stored(model, None, general, settings, records)
        for label, adapter_dir in ranked_adapters(run_dir, checkpoints).items():
            perplexity = _stored(model, adapter_dir, held_out, settings, records)
            adapted_general = _stored(model, adapter_dir, general, settings, records)
            ratio = forgetting_ratio(base_general, adapted_general) \
                if base_general is not None and adapted_general is not None else None
            rows.append({"run": Path(run_dir).name, "adapter": label, "step": _step(run_dir, adapter_dir),
                         "held-out perplexity": perplexity, "forgetting ratio": ratio,
                         "within threshold": ratio is not None and ratio <= threshold, "path": str(adapter_dir)})
    return _ranked(pd.DataFrame(rows, columns=[*RANKING_COLUMNS[:-1], "path"]))


def _ranked(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return table.assign(rank=pd.Series(dtype="Int64"))
    complete = table["held-out perplexity"].notna() & table["forgetting ratio"].notna()
    order = table.assign(_complete=complete).sort_values(
        ["_complete", "within threshold", "held-out perplexity"], ascending=[False, False, True],
        na_position="last", kind="stable").drop(columns="_complete").reset_index(drop=True)
    ranks = [i + 1 if ok and math.isfinite(p) else None
             for i, (ok, p) in enumerate(zip(order["within threshold"], order["held-out perplexity"].fillna(math.inf)))]
    return order.assign(rank=pd.array(ranks, dtype="Int64"))


def best_adapter(table: pd.DataFrame) -> dict | None:
    """The best row (rank 1), or None when no adapter stays under the threshold with both numbers stored."""
    winners = table[table["rank"] == 1] if "rank" in table else table.iloc[0:0]
    return None if winners.empty else winners.iloc[0].to_dict()


def ranking_sentence(table: pd.DataFrame, threshold: float) -> str:
    best = best_adapter(table)
    if best is None:
        missing = int((table["held-out perplexity"].isna() | table["forgetting ratio"].isna()).sum()) if len(table) else 0
        if missing:
            return f"{missing} adapter(s) still need their evaluations: evaluate them to rank them."
        return f"No adapter keeps its forgetting ratio under {threshold:g}: try a lower learning rate or fewer steps."
    return (f"Best: {best['run']} ({best['adapter']}), held-out perplexity {best['held-out perplexity']:.3f}, "
            f"forgetting ratio {best['forgetting ratio']:.3f} (under {threshold:g}).")


def experiment_ranking(name: str, checkpoints: bool = False, threshold: float = DEFAULT_THRESHOLD,
                       settings: EvaluationSettings | None = None, held_out_file: str | None = None) -> pd.DataFrame:
    """ranking_table of an experiment's runs, with each swept parameter as a column (after `run`)."""
    from .sweeps import experiment_run_dirs, read_experiment

    swept = list(read_experiment(name).get("swept", {}))
    run_dirs = experiment_run_dirs(name)
    table = ranking_table(run_dirs, checkpoints, threshold, settings, held_out_file)
    values = {Path(d).name: run_parameters(d) for d in run_dirs}
    for offset, parameter in enumerate(swept):
        table.insert(1 + offset, parameter, [values.get(run, {}).get(parameter) for run in table["run"]])
    return table


def ranking_records(table: pd.DataFrame) -> list[dict]:
    """The table as JSON-ready rows (missing numbers as null)."""
    return [{key: (None if value is pd.NA or (isinstance(value, float) and math.isnan(value)) else
                   value.item() if hasattr(value, "item") else value) for key, value in row.items()}
            for row in table.astype(object).to_dict("records")]


def evaluate_and_wait(run_dirs: list[Path], checkpoints: bool = False, settings: EvaluationSettings | None = None,
                      held_out_file: str | None = None, poll_s: float = 0.5) -> dict:
    """Start the perplexity job a ranking needs (evaluations already stored are reused) and wait until it and
    any job already computing some of them have ended; a failed job is raised with its sentence."""
    import time

    from .jobs import job_dir_for, job_sentence, job_state, list_jobs, start_perplexity
    from .processes import LIVE_STATES

    started = start_perplexity(ranking_tasks(run_dirs, checkpoints, settings, held_out_file), title="ranking")
    waiting = {started["job"]} if started["job"] else set()
    if started["running"]:
        waiting |= {job["id"] for job in list_jobs(50) if job["kind"] == "perplexity" and job["state"] in LIVE_STATES}
    while waiting:
        states = {job_id: job_state(job_dir_for(job_id)) for job_id in waiting}
        for job_id, state in states.items():
            if state["state"] == "failed":
                raise DashboardError(job_sentence(state))
        waiting = {job_id for job_id, state in states.items() if state["state"] in LIVE_STATES}
        time.sleep(poll_s if waiting else 0)
    return started
