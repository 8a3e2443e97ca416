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
from .jobs import perplexity_task
from .metrics import metrics_frame
from .perplexity import EvaluationSettings
from .results import (TEXT_FROM_EVAL, TEXT_FROM_FILE, checkpoint_label, evaluation_key, find_result,
                      forgetting_ratio, read_results, text_to_evaluate)
from .runfiles import read_status
from .runtable import adapter_choices, run_base_model, run_parameters, run_summary

RANKING_COLUMNS = ["run", "adapter", "step", "held-out perplexity", "forgetting ratio", "within threshold", "rank"]
DEFAULT_THRESHOLD = 1.1  # "little forgetting" in results.forgetting_sentence


def general_text(settings: EvaluationSettings) -> Path:
    """The general text the forgetting ratio is measured on, found as the Evaluate page's text files are."""
    return text_to_evaluate(TEXT_FROM_FILE, Path(), settings.general_text)[0]


def has_held_out_text(run_dir: Path, held_out_file: str | None = None) -> bool:
    """Whether a run can be scored on held-out text: a .txt chosen for every run, or the run's own eval data."""
    return bool(held_out_file) or bool(run_parameters(run_dir).get("eval_dataset"))


def held_out_text(run_dir: Path, held_out_file: str | None = None) -> tuple[Path, str]:
    """The held-out text of a run: a chosen .txt of datasets/ for every run, else the run's own eval data."""
    if held_out_file:
        return text_to_evaluate(TEXT_FROM_FILE, run_dir, held_out_file)
    if not has_held_out_text(run_dir):
        raise DashboardError(f"{Path(run_dir).name} has no eval data: choose a held-out text for the ranking, or "
                             f"train with an eval dataset.")
    return text_to_evaluate(TEXT_FROM_EVAL, run_dir)


def ranked_adapters(run_dir: Path, checkpoints: bool) -> dict[str, Path]:
    """The adapters of a run that take part: the final one, and every checkpoint when asked."""
    choices = adapter_choices(run_dir)
    return {label: path for label, path in choices.items() if label == "final" or checkpoints}


def rankable_runs(run_dirs: list[Path], checkpoints: bool = False,
                  held_out_file: str | None = None) -> tuple[list[Path], list[str]]:
    """The runs a ranking can score (a saved adapter that takes part, and a held-out text), and for each other
    run a sentence saying why it is left out (a run still queued or running has no final adapter yet)."""
    scored, left_out = [], []
    for run_dir in run_dirs:
        name = Path(run_dir).name
        if not ranked_adapters(run_dir, checkpoints):
            left_out.append(f"{name} has no saved adapter yet")
        elif not has_held_out_text(run_dir, held_out_file):
            left_out.append(f"{name} has no eval data (choose a held-out text to rank it)")
        else:
            scored.append(Path(run_dir))
    return scored, left_out


def ranking_plan(run_dirs: list[Path], checkpoints: bool = False, settings: EvaluationSettings | None = None,
                 held_out_file: str | None = None) -> list[dict]:
    """The evaluations for the runs of `run_dirs` that can be ranked (rankable_runs); refused, with the
    reasons, when none can."""
    if not run_dirs:
        raise DashboardError("Choose the runs to rank: an experiment, or tick runs in the runs table.")
    scored, left_out = rankable_runs(run_dirs, checkpoints, held_out_file)
    if not scored:
        raise DashboardError(f"Nothing to rank: {'; '.join(left_out)}.")
    return ranking_tasks(scored, checkpoints, settings, held_out_file)


def ranking_tasks(run_dirs: list[Path], checkpoints: bool = False, settings: EvaluationSettings | None = None,
                  held_out_file: str | None = None) -> list[dict]:
    """The perplexity evaluations a ranking needs: each adapter and its base model on the held-out text and on
    the general text (identical ones are reused by jobs.start_perplexity)."""
    settings = (settings or EvaluationSettings()).validate()
    general = general_text(settings)
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
    general = general_text(settings)
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


def missing_evaluations(table: pd.DataFrame) -> int:
    """How many adapters of a ranking table still lack their held-out perplexity or forgetting ratio."""
    if table.empty:
        return 0
    return int((table["held-out perplexity"].isna() | table["forgetting ratio"].isna()).sum())


def ranking_sentence(table: pd.DataFrame, threshold: float) -> str:
    best = best_adapter(table)
    if best is None:
        missing = missing_evaluations(table)
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


EXPERIMENT_COLUMNS = ["state", "step", "final loss", "final eval loss", "held-out perplexity", "forgetting ratio",
                      "rank"]
MISSING_RUN = "missing"  # the state of a run the experiment names whose folder is gone


def final_eval_loss(run_dir: Path) -> float | None:
    """The eval loss of a run's last evaluation, or None when it was never evaluated during training."""
    frame = metrics_frame(run_dir)
    losses = frame.loc[frame["is_eval"], "eval_loss"].dropna() if "eval_loss" in frame else pd.Series(dtype=float)
    return float(losses.iloc[-1]) if len(losses) else None


def experiment_table(name: str, threshold: float = DEFAULT_THRESHOLD, settings: EvaluationSettings | None = None,
                     held_out_file: str | None = None) -> pd.DataFrame:
    """An experiment as one table: one row per run in grid order, `run`, then each swept parameter, then the
    run's state, step, final training and eval loss, and, once its final adapter is evaluated, its held-out
    perplexity, forgetting ratio and rank among the experiment's final adapters (ranking_table's rule).
    A run the experiment names whose folder is gone is listed as `missing`."""
    from .runs import run_dir_for
    from .sweeps import read_experiment

    experiment = read_experiment(name)
    swept = list(experiment.get("swept", {}))
    run_dirs = {run: run_dir_for(run) for run in experiment.get("runs", [])}
    present = [run_dir for run_dir in run_dirs.values() if run_dir.is_dir()]
    scored, _ = rankable_runs(present, False, held_out_file)
    ranked = ranking_table(scored, False, threshold, settings, held_out_file).set_index("run")
    rows = []
    for run, run_dir in run_dirs.items():
        row = {"run": run, **dict.fromkeys(swept), **dict.fromkeys(EXPERIMENT_COLUMNS), "state": MISSING_RUN}
        if run_dir.is_dir():
            params, summary = run_parameters(run_dir), run_summary(run_dir)
            row.update({parameter: params.get(parameter) for parameter in swept}, state=summary["state"],
                       step=summary["step"], **{"final loss": summary["final loss"],
                                                "final eval loss": final_eval_loss(run_dir)})
        if run in ranked.index:
            found = ranked.loc[run]
            row.update({column: found[column] for column in ("held-out perplexity", "forgetting ratio", "rank")})
        rows.append(row)
    table = pd.DataFrame(rows, columns=["run", *swept, *EXPERIMENT_COLUMNS])
    for column in ("step", "rank"):
        table[column] = pd.array([None if pd.isna(v) else int(v) for v in table[column]], dtype="Int64")
    for column in ("final loss", "final eval loss", "held-out perplexity", "forgetting ratio"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
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
