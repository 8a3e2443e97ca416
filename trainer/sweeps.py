"""Sweeps: a grid of parameter values becomes named runs, grouped as one experiment and queued.

A sweep is a base set of parameters and, for some of them, a list of values; every combination is one run,
named after the base name and its values (`NAME-lr1e-4-r8`). The experiment is recorded in
`loras/.experiments/NAME.json` (FORMATS.md): its swept parameters with their values, and its runs.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DashboardError
from .home import check_name, loras_dir
from .params import FIELDS, TrainingParameters, label
from .runfiles import now_iso
from .storage import read_json, write_json_atomic

EXPERIMENTS_DIR = ".experiments"
# Short names for the parameters people sweep most, so run names stay readable.
SHORT_NAMES = {"learning_rate": "lr", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "drop",
               "epochs": "ep", "max_steps": "steps", "cutoff_len": "cut", "batch_size": "bs",
               "micro_batch_size": "mbs", "warmup_steps": "wu", "weight_decay": "wd", "seed": "seed",
               "target_modules": "t", "lr_scheduler_type": "sched", "optimizer": "opt"}
SWEEPABLE_TYPES = (int, float, str)


def sweepable_parameters() -> list[str]:
    """The parameters the Train page offers to sweep, in form order: every numeric or choice parameter, read
    from its metadata in params.py; not the name, switches, free text or a field naming a file."""
    return [name for name, f in FIELDS.items() if name != "lora_name" and not f.metadata["choices_from"]
            and (f.metadata["choices"] or f.type in ("int", "float"))]


def value_text(value: Any) -> str:
    """A value as it appears in a run name: 1e-4 for 0.0001, 8 for 8, q-v for "q-v"."""
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return np.format_float_scientific(value, trim="-", exp_digits=1)
        return f"{value:g}"
    return str(value)


def parse_values(name: str, text: str) -> list[Any]:
    """A comma-separated list of values for one parameter, each read as that parameter reads it."""
    field = FIELDS.get(name)
    if field is None:
        raise DashboardError(f"There is no parameter named {name}.")
    pieces = [piece.strip() for piece in str(text).split(",") if piece.strip()]
    if not pieces:
        raise DashboardError(f"{label(name)}: give at least one value.", field=name)
    values = []
    for piece in pieces:
        params = TrainingParameters.from_dict({name: piece})
        values.append(getattr(params, name))
    if len(set(map(repr, values))) < len(values):
        raise DashboardError(f"{label(name)}: a value is listed twice ({text}).", field=name)
    return values


def grid(base: TrainingParameters, swept: dict[str, list[Any]]) -> list[TrainingParameters]:
    """Every combination of the swept values on top of `base`, each named `BASE-short1value1-short2value2`,
    in the order of the lists (the first parameter varies slowest). Each run is validated."""
    if not swept:
        raise DashboardError("A sweep needs at least one parameter with a list of values.")
    for name, values in swept.items():
        if name not in FIELDS or name in ("lora_name", "base_model"):
            raise DashboardError(f"{name} cannot be swept.")
        if not values:
            raise DashboardError(f"{label(name)}: give at least one value.", field=name)
    check_name(base.lora_name, "LoRA name")
    runs = []
    for combination in itertools.product(*swept.values()):
        changes = dict(zip(swept, combination))
        suffix = "-".join(f"{SHORT_NAMES.get(k, k)}{value_text(v)}" for k, v in changes.items())
        params = TrainingParameters.from_dict({**base.to_dict(), **changes, "lora_name": f"{base.lora_name}-{suffix}"})
        problems = params.problems()
        if problems:  # named after its run: the person sees which combination fails
            raise DashboardError(f"{params.lora_name}: " + " ".join(p.message for p in problems),
                                 field=problems[0].field)
        runs.append(params)
    return runs


def experiments_dir() -> Path:
    return loras_dir() / EXPERIMENTS_DIR


def record_experiment(name: str, swept: dict[str, list[Any]], runs: list[str]) -> Path:
    """Write loras/.experiments/NAME.json; an existing experiment of that name is refused."""
    path = experiments_dir() / f"{check_name(name, 'experiment name')}.json"
    if path.exists():
        raise DashboardError(f"An experiment named {name} already exists; choose another name.", field="lora_name")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"name": name, "created": now_iso(), "swept": swept, "runs": runs})
    return path


def read_experiment(name: str) -> dict:
    data = read_json(experiments_dir() / f"{check_name(name, 'experiment name')}.json")
    if data is None:
        raise DashboardError(f"There is no experiment named {name}.")
    return data


def list_experiments() -> list[dict]:
    """Every recorded experiment, newest first."""
    folder = experiments_dir()
    found = [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return sorted((e for e in found if e and e.get("runs")), key=lambda e: e.get("created", ""), reverse=True)


def read_sweep_file(path: Path) -> tuple[TrainingParameters, dict[str, list[Any]]]:
    """A sweep file: `{"base": {parameters...}, "sweep": {"learning_rate": [1e-4, 2e-4], ...}}` (JSON).
    Values may also be written as one comma-separated string ("1e-4, 2e-4")."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DashboardError(f"Cannot read the sweep file {path}: {exc.strerror or exc}.") from None
    except ValueError as exc:
        raise DashboardError(f"The sweep file {path} is not valid JSON: {exc}.") from None
    if not isinstance(data, dict) or not isinstance(data.get("base"), dict) or not isinstance(data.get("sweep"), dict):
        raise DashboardError(f"The sweep file {path} must hold an object with \"base\" (parameters) and \"sweep\" "
                             f"(parameter: list of values).")
    swept = {name: parse_values(name, ",".join(map(str, values)) if isinstance(values, list) else values)
             for name, values in data["sweep"].items()}
    return TrainingParameters.from_dict(data["base"]), swept


def read_sweep_texts(texts: dict[str, str]) -> tuple[dict[str, list[Any]], list[DashboardError]]:
    """The Train page's lists of values (parameter: comma-separated text), each read with `parse_values`:
    the values read, and one problem per parameter whose list cannot be read (it names the field)."""
    swept, problems = {}, []
    for name, text in texts.items():
        try:
            swept[name] = parse_values(name, text)
        except DashboardError as exc:
            problems.append(exc if exc.field else DashboardError(exc.message, field=name))
    return swept, problems


def plan_sweep(base: TrainingParameters, swept: dict[str, list[Any]],
               name: str | None = None) -> list[TrainingParameters]:
    """The runs a sweep makes (experiment `name`, default the base LoRA name; the runs are named after it), or
    the refusal `launch_sweep` gives before writing anything: an invalid combination, a run or the experiment
    name that exists."""
    from .runs import run_dir_for

    name = name or base.lora_name
    runs = grid(TrainingParameters.from_dict({**base.to_dict(), "lora_name": name}), swept)
    taken = [p.lora_name for p in runs if run_dir_for(p.lora_name).exists()]
    if taken:
        raise DashboardError(f"A LoRA named {', '.join(taken)} already exists; choose another sweep name.",
                             field="lora_name")
    if (experiments_dir() / f"{check_name(name, 'experiment name')}.json").exists():
        raise DashboardError(f"An experiment named {name} already exists; choose another name.", field="lora_name")
    return runs


def launch_sweep(base: TrainingParameters, swept: dict[str, list[Any]], name: str | None = None) -> list[Path]:
    """Plan the sweep (`plan_sweep`), record it as experiment `name` and put every run in the run queue: the
    first starts at once when its device is idle. Nothing is written when `plan_sweep` refuses. Returns the
    run folders."""
    from .runs import launch

    name = name or base.lora_name
    runs = plan_sweep(base, swept, name)
    record_experiment(name, swept, [p.lora_name for p in runs])
    return [launch(params, mode="new") for params in runs]


def experiment_run_dirs(name: str) -> list[Path]:
    """The run folders of an experiment that exist, in the experiment's order."""
    from .runs import run_dir_for

    return [d for d in (run_dir_for(run) for run in read_experiment(name)["runs"]) if d.is_dir()]
