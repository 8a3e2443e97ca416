"""What the Evaluate page knows about each run folder: its parameters, base model and adapters, one summary row
per run (the runs table) and the parameters in which runs differ.

Run folders written by text-generation-webui (training_parameters.json and training_log.json, no
metrics.jsonl or status.json) are read as well (FORMATS.md documents both kinds).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from .adapters import ADAPTER_CONFIG, has_adapter
from .checkpoints import list_checkpoints
from .errors import DashboardError
from .metrics import as_float, metrics_frame, read_webui_log
from .params import FIELDS, TrainingParameters
from .processes import LIVE_STATES
from .runfiles import METRICS_FILE, PARAMS_FILE, STATUS_FILE, effective_status
from .runs import list_runs
from .storage import read_json
from .webui import read_webui_parameters

# status.json's flag for a run the trainer ended because its loss or gradient norm blew up (state failed).
DIVERGED_FIELD = "diverged"
# Parameters the webui stores as "None" when nothing was chosen.
WEBUI_NONE_FIELDS = ("dataset", "eval_dataset", "format", "raw_text_file")
INTEGER_COLUMNS = ("step", "total steps", "tokens", "rank", "alpha", "cutoff", "batch", "max steps")


def is_webui_run(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return not (run_dir / METRICS_FILE).exists() and not (run_dir / STATUS_FILE).exists()


def run_parameters(run_dir: Path) -> dict:
    """training_parameters.json as stored, a webui file's keys mapped onto ours (trainer/webui.py), with values
    we know coerced to their types (webui stores "3e-4")."""
    raw = read_webui_parameters(read_json(Path(run_dir) / PARAMS_FILE) or {})
    raw = {k: ("" if k in WEBUI_NONE_FIELDS and v in ("None", None) else v) for k, v in raw.items()}
    try:
        coerced = TrainingParameters.from_dict(raw).to_dict()
    except DashboardError:
        return dict(raw)
    return {k: (coerced[k] if k in FIELDS else v) for k, v in raw.items()}


def run_base_model(run_dir: Path, params: dict | None = None) -> str:
    """The base model a run was trained on: ours in training_parameters.json, the webui's in its log or the
    adapter's config (the folder name of base_model_name_or_path)."""
    run_dir = Path(run_dir)
    params = run_parameters(run_dir) if params is None else params
    if params.get("base_model"):
        return str(params["base_model"])
    for entry in reversed(read_webui_log(run_dir)):
        if entry.get("base_model_name"):
            return str(entry["base_model_name"])
    name = (read_json(run_dir / ADAPTER_CONFIG) or {}).get("base_model_name_or_path")
    return Path(str(name)).name if name else ""


def format_of(params: dict) -> str:
    """The format file of a run's parameters: only a formatted dataset has one ("" for raw text, whatever its
    `format` field says: the form keeps a format chosen for a dataset the run did not use)."""
    return str(params.get("format") or "") if params.get("dataset") else ""


def run_format_name(run_dir: Path) -> str:
    """The format file a run was trained with ("" for raw text or chat data)."""
    return format_of(run_parameters(run_dir))


def adapter_choices(run_dir: Path) -> dict[str, Path]:
    """The adapters of a run by label: "final" (when saved) and each checkpoint-STEP."""
    run_dir = Path(run_dir)
    choices = {"final": run_dir} if has_adapter(run_dir) else {}
    for checkpoint in list_checkpoints(run_dir):
        if has_adapter(checkpoint):
            choices[checkpoint.name] = checkpoint
    return choices


def _parse_time(value: Any) -> pd.Timestamp | None:
    if not value:
        return None
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError):
        return None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _int_or_none(value: Any) -> int | None:
    number = as_float(value)
    return int(number) if math.isfinite(number) else None


def _float_or_none(value: Any) -> float | None:
    number = as_float(value)
    return number if math.isfinite(number) else None


def _duration_s(status: dict | None, state: str, train: pd.DataFrame) -> float | None:
    """Training time: the last metrics line's elapsed time, else from the status's start and end."""
    if train["elapsed_s"].notna().any():
        return float(train["elapsed_s"].max())
    if not status:
        return None
    begin, end = _parse_time(status.get("started_at")), _parse_time(status.get("finished_at"))
    if begin is not None and end is None and state in LIVE_STATES:
        end = pd.Timestamp.now(tz="UTC")
    return (end - begin).total_seconds() if begin is not None and end is not None else None


def _started(run_dir: Path, status: dict | None) -> pd.Timestamp:
    """When a run started: its status says; a webui run has the date of its parameters file."""
    started = _parse_time((status or {}).get("started_at"))
    if started is not None:
        return started
    source_file = run_dir / PARAMS_FILE if (run_dir / PARAMS_FILE).exists() else run_dir
    return pd.Timestamp(source_file.stat().st_mtime, unit="s", tz="UTC")


def _metric_columns(status: dict | None, frame: pd.DataFrame) -> dict:
    """The runs table's columns read from the metrics (status.json has the last word on step and total)."""
    train, evals = frame[~frame["is_eval"]], frame[frame["is_eval"]]
    losses = train["loss"]
    step = (status or {}).get("step")
    if step is None and len(frame):
        step = frame["step"].max()
    total = (status or {}).get("total_steps")
    if total is None and train["total_steps"].notna().any():
        total = train["total_steps"].max()
    return {
        "step": _int_or_none(step),
        "total steps": _int_or_none(total),
        "final loss": float(losses.iloc[-1]) if len(losses) else None,
        "best loss": float(losses.min()) if losses.notna().any() else None,
        "best eval loss": float(evals["eval_loss"].min()) if evals["eval_loss"].notna().any() else None,
        "tokens": _int_or_none(train["tokens"].max()) if train["tokens"].notna().any() else None,
    }


def _parameter_columns(params: dict) -> dict:
    """The runs table's columns read from the training parameters."""
    return {
        "rank": _int_or_none(params.get("lora_rank")),
        "alpha": _int_or_none(params.get("lora_alpha")),
        "learning rate": _float_or_none(params.get("learning_rate")),
        "cutoff": _int_or_none(params.get("cutoff_len")),
        "batch": _int_or_none(params.get("batch_size")),
        "epochs": _float_or_none(params.get("epochs")),
        "max steps": _int_or_none(params.get("max_steps")),
        "data": str(params.get("dataset") or params.get("raw_text_file") or ""),
        "format": format_of(params),
    }


def run_summary(run_dir: Path) -> dict:
    """One row of the runs table: what a person compares runs by."""
    run_dir = Path(run_dir)
    params = run_parameters(run_dir)
    status = effective_status(run_dir)
    frame = metrics_frame(run_dir)
    if status is not None:
        state = status.get("state") or "unknown"
    else:
        state = "completed" if has_adapter(run_dir) else "unknown"
    duration = _duration_s(status, state, frame[~frame["is_eval"]])
    return {
        "run": run_dir.name,
        "source": "webui" if status is None and is_webui_run(run_dir) else "dashboard",
        "base model": run_base_model(run_dir, params),
        "state": f"{state} (diverged)" if is_diverged(status) else state,
        **_metric_columns(status, frame),
        "duration (min)": round(duration / 60, 2) if duration is not None else None,
        "started": _started(run_dir, status),
        **_parameter_columns(params),
        "error": (status or {}).get("error") or "",
    }


def is_diverged(status: dict | None) -> bool:
    """Whether the trainer ended this run because its loss or gradient norm blew up."""
    return bool((status or {}).get(DIVERGED_FIELD))


def failure_note(run_dir: Path) -> str:
    """A sentence for a failed run's detail ("" for any other run): diverged or failed, and why."""
    run_dir = Path(run_dir)
    status = effective_status(run_dir)
    if not status or status.get("state") != "failed":
        return ""
    error = str(status.get("error") or "no reason was recorded.")
    if is_diverged(status):
        return f"{run_dir.name} diverged, and the trainer ended it as failed: {error}"
    return f"{run_dir.name} failed: {error}"


def runs_table(run_dirs: Iterable[Path] | None = None) -> pd.DataFrame:
    """The runs table, newest first (every folder under loras/ unless given)."""
    rows = [run_summary(p) for p in (list_runs() if run_dirs is None else run_dirs)]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["run", "source", "base model", "state"])
    for column in INTEGER_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    frame["started"] = pd.to_datetime(frame["started"], utc=True)
    return frame


def _display_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def parameter_differences(run_dirs: list[Path], ignore: Iterable[str] = ("lora_name",)) -> pd.DataFrame:
    """Parameters whose values differ between the runs: one row per parameter, one column per run."""
    run_dirs = [Path(p) for p in run_dirs]
    if len(run_dirs) < 2:
        return pd.DataFrame()
    params = {p.name: run_parameters(p) for p in run_dirs}
    for run_dir, values in zip(run_dirs, params.values()):
        values.setdefault("base_model", run_base_model(run_dir, values) or None)  # webui runs name it elsewhere
    keys = sorted({k for values in params.values() for k in values} - set(ignore))
    rows = {}
    for key in keys:
        shown = [_display_value(values.get(key)) for values in params.values()]
        if len(set(shown)) > 1:
            rows[key] = shown
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(params))
    frame.index.name = "parameter"
    return frame
