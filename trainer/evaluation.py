"""Reading finished and running runs for the Evaluate page, without Streamlit.

- run summaries and the runs table (ours and text-generation-webui's run folders);
- metrics.jsonl as a pandas DataFrame (fast, cached, incremental for a growing file);
- chart data: smoothing, and downsampling that keeps each bucket's minimum and maximum, so a chart never
  has more than a few thousand rows and a loss of 0.0 is never dropped;
- the Altair charts themselves;
- parameter differences between runs;
- the perplexity results store (results/perplexity.jsonl) with reuse of identical evaluations;
- the forgetting check's ratio and its reading in plain words;
- prompt templates and generation for the side-by-side try.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import re
import tempfile
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .errors import DashboardError
from .home import home_dir
from .runfiles import (
    LIVE_STATES, METRICS_FILE, PARAMS_FILE, effective_status, now_iso, read_json,
)

WEBUI_LOG_FILE = "training_log.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NUMERIC_COLUMNS = ("step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens",
                   "tokens_per_second", "elapsed_s", "eta_s", "eval_loss", "eval_perplexity")
# Altair refuses more than 5,000 rows per chart by default; stay below it by construction.
MAX_CHART_ROWS = 4800
MAX_POINTS_PER_SERIES = 2000


# =============================================================================================
# metrics.jsonl -> DataFrame


def empty_metrics() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in NUMERIC_COLUMNS})
    frame["is_eval"] = pd.Series(dtype="bool")
    return frame


def _finish(frame: pd.DataFrame) -> pd.DataFrame:
    for column in NUMERIC_COLUMNS:
        if column not in frame:
            frame[column] = np.nan
    frame = frame[list(NUMERIC_COLUMNS)].astype("float64")
    frame["is_eval"] = frame["eval_loss"].notna() | frame["eval_perplexity"].notna()
    return frame.reset_index(drop=True)


def _number(value: Any) -> float:
    """A metric value as a float: numbers, and the strings "nan"/"inf" the trainer writes for non-finite ones."""
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _parse_slow(data: bytes) -> pd.DataFrame:
    columns: dict[str, list[float]] = {c: [] for c in NUMERIC_COLUMNS}
    for line in data.decode("utf-8", errors="replace").split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a broken line (a writer killed mid-line, then appended to) is skipped
        if not isinstance(record, dict):
            continue
        for column in NUMERIC_COLUMNS:
            columns[column].append(_number(record.get(column)))
    return _finish(pd.DataFrame(columns))


def parse_metrics_bytes(data: bytes) -> pd.DataFrame:
    """Complete metrics lines (bytes ending in a newline) as a DataFrame of float columns plus `is_eval`.

    The fast path is pyarrow's JSON reader with a fixed float schema (about 0.4 s for 200,000 lines on two
    cores); anything it refuses (a broken line, "nan" written as a string) goes through the line-by-line reader.
    """
    if not data.strip():
        return empty_metrics()
    try:
        import pyarrow as pa
        import pyarrow.json as pj

        schema = pa.schema([(c, pa.float64()) for c in NUMERIC_COLUMNS])
        table = pj.read_json(
            io.BytesIO(data),
            read_options=pj.ReadOptions(block_size=max(1 << 20, min(len(data) + 1, 16 << 20))),
            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
        return _finish(table.to_pandas())
    except Exception:  # pyarrow.ArrowInvalid and friends: fall back to the tolerant reader
        return _parse_slow(data)


class _MetricsCache:
    """Parsed metrics files by path. A file that only grew is parsed from where the last parse stopped."""

    def __init__(self, size: int = 16):
        self.size = size
        self.entries: OrderedDict[str, dict] = OrderedDict()

    def get(self, path: Path) -> pd.DataFrame:
        try:
            stat = path.stat()
        except OSError:
            return empty_metrics()
        key = str(path)
        entry = self.entries.get(key)
        if entry is not None:
            same_file = entry["ino"] == stat.st_ino and stat.st_size >= entry["offset"]
            if same_file and stat.st_size == entry["size"] and stat.st_mtime_ns == entry["mtime"]:
                self.entries.move_to_end(key)
                return entry["frame"]
            if same_file and self._head(path, len(entry["head"])) == entry["head"]:
                tail = self._read_from(path, entry["offset"])
                complete = tail[: tail.rfind(b"\n") + 1]
                if complete:
                    new = parse_metrics_bytes(complete)
                    entry["frame"] = pd.concat([entry["frame"], new], ignore_index=True) if len(entry["frame"]) \
                        else new
                entry.update(offset=entry["offset"] + len(complete), size=stat.st_size, mtime=stat.st_mtime_ns)
                self.entries.move_to_end(key)
                return entry["frame"]
        data = self._read_from(path, 0)
        complete = data[: data.rfind(b"\n") + 1]  # a torn last line is still being written: wait for it
        frame = parse_metrics_bytes(complete)
        self.entries[key] = {"ino": stat.st_ino, "size": stat.st_size, "mtime": stat.st_mtime_ns,
                             "offset": len(complete), "head": complete[:256], "frame": frame}
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return frame

    @staticmethod
    def _read_from(path: Path, offset: int) -> bytes:
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                return handle.read()
        except OSError:
            return b""

    @staticmethod
    def _head(path: Path, n: int) -> bytes:
        try:
            with open(path, "rb") as handle:
                return handle.read(n)
        except OSError:
            return b""


_metrics_cache = _MetricsCache()


def read_webui_log(run_dir: Path) -> list[dict]:
    """training_log.json of a text-generation-webui run: its latest entry (a dict) or a list of entries."""
    path = Path(run_dir) / WEBUI_LOG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list):
        return [entry for entry in data if isinstance(entry, dict)]
    return []


def webui_metrics_frame(run_dir: Path) -> pd.DataFrame:
    """What can be charted from a webui run: one train row per entry with a loss, one eval row per eval loss."""
    rows = []
    for entry in read_webui_log(run_dir):
        step = _number(entry.get("current_steps", entry.get("step", entry.get("global_step"))))
        common = {"step": step, "epoch": _number(entry.get("epoch"))}
        if "loss" in entry:
            rows.append({**common, "loss": _number(entry.get("loss")),
                         "learning_rate": _number(entry.get("learning_rate")),
                         "grad_norm": _number(entry.get("grad_norm"))})
        if "eval_loss" in entry:
            eval_loss = _number(entry.get("eval_loss"))
            rows.append({**common, "eval_loss": eval_loss,
                         "eval_perplexity": math.exp(min(eval_loss, 700)) if math.isfinite(eval_loss) else math.nan})
    if not rows:
        return empty_metrics()
    return _finish(pd.DataFrame(rows))


def metrics_frame(run_dir: Path) -> pd.DataFrame:
    """Every metrics line of a run (ours from metrics.jsonl, else the webui's training_log.json).

    Columns: the numeric metric fields (NaN where a line lacks one) and `is_eval`. Cached per file, so a
    page rerun does not parse a large file again; do not modify the returned frame.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if path.is_file():
        return _metrics_cache.get(path)
    return webui_metrics_frame(run_dir)


# =============================================================================================
# Run summaries and the runs table


def is_webui_run(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return not (run_dir / METRICS_FILE).exists() and not (run_dir / "status.json").exists()


def run_parameters(run_dir: Path) -> dict:
    """training_parameters.json as stored, with values we know coerced to their types (webui stores "3e-4")."""
    raw = read_json(Path(run_dir) / PARAMS_FILE) or {}
    from .params import FIELDS, TrainingParameters

    # The webui writes "None" for a dataset or format that was not chosen.
    raw = {k: ("" if k in ("dataset", "eval_dataset", "format", "raw_text_file") and v in ("None", None) else v)
           for k, v in raw.items()}
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
    config = read_json(run_dir / "adapter_config.json") or {}
    name = config.get("base_model_name_or_path")
    return Path(str(name)).name if name else ""


def has_adapter(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "adapter_config.json").is_file() and (folder / ADAPTER_WEIGHTS).is_file()


def _parse_time(value: Any) -> pd.Timestamp | None:
    if not value:
        return None
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError):
        return None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def run_summary(run_dir: Path) -> dict:
    """One row of the runs table: what a person compares runs by."""
    run_dir = Path(run_dir)
    params = run_parameters(run_dir)
    status = effective_status(run_dir)
    webui = status is None and is_webui_run(run_dir)
    frame = metrics_frame(run_dir)
    train = frame[~frame["is_eval"]]
    evals = frame[frame["is_eval"]]
    losses = train["loss"]
    if status is not None:
        state = status.get("state") or "unknown"
    else:
        state = "completed" if has_adapter(run_dir) else "unknown"
    step = (status or {}).get("step")
    if step is None and len(frame):
        step = frame["step"].max()
    total = (status or {}).get("total_steps")
    if total is None and train["total_steps"].notna().any():
        total = train["total_steps"].max()
    duration = None
    if train["elapsed_s"].notna().any():
        duration = float(train["elapsed_s"].max())
    elif status:
        begin, end = _parse_time(status.get("started_at")), _parse_time(status.get("finished_at"))
        if begin is not None and end is None and state in LIVE_STATES:
            end = pd.Timestamp.now(tz="UTC")
        if begin is not None and end is not None:
            duration = (end - begin).total_seconds()
    started = _parse_time((status or {}).get("started_at"))
    if started is None:
        source_file = run_dir / PARAMS_FILE if (run_dir / PARAMS_FILE).exists() else run_dir
        started = pd.Timestamp(source_file.stat().st_mtime, unit="s", tz="UTC")
    data = params.get("dataset") or params.get("raw_text_file") or ""
    return {
        "run": run_dir.name,
        "source": "webui" if webui else "dashboard",
        "base model": run_base_model(run_dir, params),
        "state": state,
        "step": _int_or_none(step),
        "total steps": _int_or_none(total),
        "final loss": float(losses.iloc[-1]) if len(losses) else None,
        "best loss": float(losses.min()) if losses.notna().any() else None,
        "best eval loss": float(evals["eval_loss"].min()) if evals["eval_loss"].notna().any() else None,
        "tokens": _int_or_none(train["tokens"].max()) if train["tokens"].notna().any() else None,
        "duration (min)": round(duration / 60, 2) if duration is not None else None,
        "started": started,
        "rank": _int_or_none(params.get("lora_rank")),
        "alpha": _int_or_none(params.get("lora_alpha")),
        "learning rate": _float_or_none(params.get("learning_rate")),
        "cutoff": _int_or_none(params.get("cutoff_len")),
        "batch": _int_or_none(params.get("batch_size")),
        "epochs": _float_or_none(params.get("epochs")),
        "max steps": _int_or_none(params.get("max_steps")),
        "data": str(data),
        "format": str(params.get("format") or ""),
        "error": (status or {}).get("error") or "",
    }


def _int_or_none(value: Any) -> int | None:
    number = _number(value)
    return int(number) if math.isfinite(number) else None


def _float_or_none(value: Any) -> float | None:
    number = _number(value)
    return number if math.isfinite(number) else None


def runs_table(run_dirs: Iterable[Path] | None = None) -> pd.DataFrame:
    """The runs table, newest first (every folder under loras/ unless given)."""
    from .runs import list_runs

    rows = [run_summary(p) for p in (list_runs() if run_dirs is None else run_dirs)]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["run", "source", "base model", "state"])
    for column in ("step", "total steps", "tokens", "rank", "alpha", "cutoff", "batch", "max steps"):
        frame[column] = frame[column].astype("Int64")
    frame["started"] = pd.to_datetime(frame["started"], utc=True)
    return frame


# =============================================================================================
# Parameter differences


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


# =============================================================================================
# Chart data: smoothing and downsampling

X_AXES = {"step": "Step", "epoch": "Epoch", "time": "Time"}


def ema(values: np.ndarray, factor: float) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing); NaN values are skipped.

    factor 0 returns the values unchanged; 0.9 averages over roughly the last ten points.
    """
    values = np.asarray(values, dtype="float64")
    if not 0 <= factor < 1:
        raise DashboardError(f"The smoothing factor must be in [0, 1); got {factor}.")
    if factor == 0 or len(values) == 0:
        return values.copy()
    smoothed = pd.Series(values).ewm(alpha=1 - factor, adjust=True, ignore_na=True).mean().to_numpy(copy=True)
    smoothed[np.isnan(values)] = np.nan
    return smoothed


def downsample_indices(values: np.ndarray, max_points: int) -> np.ndarray:
    """Positions to keep so that at most `max_points` remain: in each of max_points/2 equal buckets its
    minimum and its maximum (and the first and last point). Every series charted here is non-negative, so a
    0.0 is always its bucket's minimum and is always kept."""
    values = np.asarray(values, dtype="float64")
    n = len(values)
    if n <= max_points:
        return np.arange(n)
    buckets = max(1, (max_points - 2) // 2)
    starts = (np.arange(buckets) * n) // buckets
    ends = np.append(starts[1:], n)
    width = int((ends - starts).max())
    index = starts[:, None] + np.arange(width)[None, :]
    inside = index < ends[:, None]
    index = np.minimum(index, n - 1)
    lows = np.where(inside, np.where(np.isnan(values), np.inf, values)[index], np.inf).argmin(axis=1)
    highs = np.where(inside, np.where(np.isnan(values), -np.inf, values)[index], -np.inf).argmax(axis=1)
    return np.unique(np.concatenate([starts + lows, starts + highs, [0, n - 1]]))


def _time_unit(max_seconds: float) -> tuple[float, str]:
    if max_seconds < 180:
        return 1.0, "Time (s)"
    if max_seconds < 3 * 3600:
        return 60.0, "Time (min)"
    return 3600.0, "Time (h)"


def _x_values(frame: pd.DataFrame, x: str) -> np.ndarray:
    """The x value of every row: step, epoch, or training time (eval rows get the time of their step)."""
    if x == "step":
        return frame["step"].to_numpy()
    if x == "epoch":
        return frame["epoch"].to_numpy()
    if x != "time":
        raise DashboardError(f"Unknown x axis {x!r}; choose step, epoch or time.")
    elapsed = frame["elapsed_s"].to_numpy(copy=True)
    known = ~np.isnan(elapsed) & ~frame["is_eval"].to_numpy()
    missing = np.isnan(elapsed)
    if known.any() and missing.any():
        steps = frame["step"].to_numpy()
        order = np.argsort(steps[known], kind="stable")
        elapsed[missing] = np.interp(steps[missing], steps[known][order], elapsed[known][order])
    return elapsed


CHARTS = {
    "loss": ("Loss", [("loss", "loss", False), ("smoothed", "loss", False), ("eval loss", "eval_loss", True)]),
    "eval_perplexity": ("Eval perplexity", [("eval perplexity", "eval_perplexity", True)]),
    "learning_rate": ("Learning rate", [("learning rate", "learning_rate", False)]),
    "tokens_per_second": ("Tokens per second", [("tokens/s", "tokens_per_second", False)]),
}


def _share_rows(lengths: list[int], max_rows: int, max_points: int) -> list[int]:
    """Rows per series so that together they fit `max_rows`: short series keep all their points, long ones
    share what is left equally (never more than `max_points` each)."""
    budgets = [0] * len(lengths)
    remaining = max_rows
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for position, i in enumerate(order):
        share = remaining // (len(lengths) - position)
        budgets[i] = max(4, min(lengths[i], share, max_points))
        remaining -= budgets[i]
    return budgets


def chart_data(frames: dict[str, pd.DataFrame], x: str = "step", smoothing: float = 0.6,
               max_rows: int = MAX_CHART_ROWS, max_points: int = MAX_POINTS_PER_SERIES) -> dict[str, Any]:
    """Long-format chart frames (columns run, series, x, value) for each chart in CHARTS, each with at most
    `max_rows` rows and at most `max_points` per run and series, plus the x axis title under "x_title" and
    the run names under "runs".

    Smoothing is computed on the full series before downsampling, so it is the same at any zoom.
    """
    xs = {run: _x_values(frame, x) for run, frame in frames.items()}
    scale, x_title = 1.0, X_AXES.get(x, x)
    if x == "time":
        longest = max((np.nanmax(v) for v in xs.values() if len(v) and not np.isnan(v).all()), default=0.0)
        scale, x_title = _time_unit(float(longest))
    result: dict[str, Any] = {"x_title": x_title, "runs": list(frames)}
    for chart, (_, series_list) in CHARTS.items():
        pieces = []
        for run, frame in frames.items():
            is_eval = frame["is_eval"].to_numpy()
            for series, column, eval_rows in series_list:
                if series == "smoothed" and smoothing <= 0:
                    continue
                rows = is_eval if eval_rows else ~is_eval
                values = frame[column].to_numpy()[rows]
                if series == "smoothed":
                    values = ema(values, smoothing)
                x_values = xs[run][rows] / scale
                usable = ~np.isnan(values) & ~np.isnan(x_values)
                if usable.any():
                    pieces.append((run, series, x_values[usable], values[usable]))
        if not pieces:
            result[chart] = pd.DataFrame(columns=["run", "series", "x", "value"])
            continue
        budgets = _share_rows([len(values) for _, _, _, values in pieces], max_rows, max_points)
        parts = []
        for (run, series, x_values, values), budget in zip(pieces, budgets):
            keep = downsample_indices(values, budget)
            parts.append(pd.DataFrame({"run": run, "series": series, "x": x_values[keep], "value": values[keep]}))
        result[chart] = pd.concat(parts, ignore_index=True)
    return result


# =============================================================================================
# Altair charts

SERIES_STYLE = {  # series: (dash, opacity)
    "loss": ([1, 0], 0.35), "smoothed": ([1, 0], 1.0), "eval loss": ([6, 3], 1.0),
}


def metric_chart(data: pd.DataFrame, chart: str, x_title: str, height: int = 280, runs: list[str] | None = None):
    """A line chart of one chart frame from `chart_data`, colour by run, or None when it has no rows.

    `runs` fixes the colour of each run, so a run has the same colour in every chart."""
    import altair as alt

    if data is None or data.empty:
        return None
    title, series_list = CHARTS[chart]
    names = [s for s, _, _ in series_list if s in set(data["series"])]
    tooltip = [alt.Tooltip("run:N", title="Run"), alt.Tooltip("series:N", title="Series"),
               alt.Tooltip("x:Q", title=x_title, format=",.4~f"), alt.Tooltip("value:Q", title=title, format=",.5~g")]
    # Steps are whole numbers; a learning rate reads best as 3e-4. (Formats without a precision are avoided:
    # Vega derives one from the tick step and prints 40,000 as 4e+4.)
    x_axis = alt.Axis(format=",d", tickMinStep=1) if x_title == X_AXES["step"] else alt.Axis()
    y_axis = alt.Axis(format=".1e") if chart == "learning_rate" else alt.Axis()
    # Perplexity is exp(loss): a log scale keeps a good and a bad run readable on one chart. A loss curve
    # fills the chart (a fall from 2.1 to 1.8 is the story; an axis from 0 flattens it); a learning rate
    # keeps its zero, where warm-up starts and decay ends.
    y_scale = (alt.Scale(type="log") if chart == "eval_perplexity"
               else alt.Scale(zero=chart == "learning_rate"))
    encoding = dict(x=alt.X("x:Q", title=x_title, axis=x_axis),
                    y=alt.Y("value:Q", title=title, axis=y_axis, scale=y_scale),
                    color=alt.Color("run:N", title="Run", legend=alt.Legend(labelLimit=140),
                                    scale=alt.Scale(scheme="tableau10", domain=runs or sorted(set(data["run"])))),
                    tooltip=tooltip)
    if len(names) > 1:
        encoding["strokeDash"] = alt.StrokeDash(
            "series:N", legend=None,  # explained under the charts: faint raw, solid smoothed, dashed eval
            scale=alt.Scale(domain=names, range=[SERIES_STYLE[n][0] for n in names]))
        encoding["opacity"] = alt.Opacity(
            "series:N", legend=None, scale=alt.Scale(domain=names, range=[SERIES_STYLE[n][1] for n in names]))
    lines = alt.Chart().mark_line(strokeWidth=1.6).encode(**encoding, detail="series:N")
    # Points where a series is short (eval lines, a webui run with a single entry) so they stay visible.
    counts = data.groupby(["run", "series"])["value"].transform("size")
    data = data.assign(sparse=counts <= 60)
    points = alt.Chart().mark_point(filled=True, size=28).encode(**encoding).transform_filter("datum.sparse")
    return alt.layer(lines, points, data=data).properties(height=height, title=title).interactive(bind_y=False)


def perplexity_chart(results: pd.DataFrame, height: int = 260):
    """Perplexity by checkpoint step for one run's results (columns step, perplexity, dataset), or None.

    The base model is drawn at step 0: a LoRA starts as the identity, so step 0 is the base model."""
    import altair as alt

    if results is None or results.empty:
        return None
    tooltip = ["dataset:N", "label:N", alt.Tooltip("perplexity:Q", format=",.4f"), "stride:Q", "max_length:Q"]
    base = alt.Chart(results).encode(
        x=alt.X("step:Q", title="Checkpoint step (0: base model)"),
        y=alt.Y("perplexity:Q", title="Perplexity", scale=alt.Scale(zero=False)),
        color=alt.Color("dataset:N", title="Text"), detail="setting:N", tooltip=tooltip)
    return (base.mark_line() + base.mark_point(filled=True, size=50)).properties(height=height,
                                                                                  title="Perplexity by checkpoint")


# =============================================================================================
# Results store: results/perplexity.jsonl

RESULTS_FILE = "perplexity.jsonl"
RESULT_COLUMNS = ["model", "adapter", "checkpoint", "dataset", "stride", "max_length", "tokens", "perplexity",
                  "date", "comment"]
KEY_FIELDS = ("model", "adapter_path", "checkpoint", "dataset_path", "dataset_sha256", "adapter_sha256", "stride",
              "max_length", "precision")


def results_dir() -> Path:
    return home_dir() / "results"


def results_path() -> Path:
    return results_dir() / RESULTS_FILE


@contextmanager
def _results_lock():
    results_dir().mkdir(parents=True, exist_ok=True)
    with open(results_dir() / f".{RESULTS_FILE}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def home_relative(path: Path | str | None) -> str:
    """A path as stored in results: relative to the home folder when inside it, else absolute."""
    if not path:
        return ""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(home_dir()))
    except ValueError:
        return str(path)


def checkpoint_label(adapter_dir: Path | None) -> str:
    if adapter_dir is None:
        return ""
    name = Path(adapter_dir).name
    return name if re.fullmatch(r"checkpoint-\d+", name) else "final"


def adapter_run_name(adapter_dir: Path | None) -> str:
    if adapter_dir is None:
        return ""
    adapter_dir = Path(adapter_dir)
    return adapter_dir.parent.name if checkpoint_label(adapter_dir) != "final" else adapter_dir.name


def evaluation_key(model: str, adapter_dir: Path | None, text_file: Path, stride: int, max_length: int,
                   precision: str = "full") -> dict:
    """What makes two evaluations identical: model, adapter (path and weights), text (path and content),
    stride, max length and precision."""
    text_file = Path(text_file)
    if not text_file.is_file():
        raise DashboardError(f"Text file not found: {text_file}")
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS if adapter_dir else None
    return {
        "model": str(model), "adapter_path": home_relative(adapter_dir), "checkpoint": checkpoint_label(adapter_dir),
        "dataset_path": home_relative(text_file), "dataset_sha256": file_sha256(text_file),
        "adapter_sha256": file_sha256(weights) if weights and weights.is_file() else "",
        "stride": int(stride), "max_length": int(max_length), "precision": precision,
    }


def read_results() -> list[dict]:
    """Every stored result, oldest first (broken lines skipped)."""
    records = []
    try:
        handle = open(results_path(), encoding="utf-8")
    except OSError:
        return records
    with handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "perplexity" in record:
                records.append(record)
    return records


def same_key(record: dict, key: dict) -> bool:
    return all(record.get(field) == key.get(field) for field in KEY_FIELDS)


def find_result(key: dict, records: list[dict] | None = None) -> dict | None:
    """The stored result of an identical evaluation (the newest), or None."""
    for record in reversed(read_results() if records is None else records):
        if same_key(record, key):
            return record
    return None


def append_result(record: dict) -> dict:
    """Store a result (with an id and date); an identical evaluation already stored is returned instead."""
    with _results_lock():
        existing = find_result(record)
        if existing is not None:
            return existing
        record = {"id": uuid.uuid4().hex[:12], "date": now_iso(), "comment": "", **record}
        with open(results_path(), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    return record


def save_comments(comments: dict[str, str]) -> int:
    """Set the comments of results by id; the file is rewritten atomically. Returns how many changed."""
    with _results_lock():
        records = read_results()
        changed = 0
        for record in records:
            new = comments.get(record.get("id"))
            if new is not None and str(new) != record.get("comment", ""):
                record["comment"] = str(new)
                changed += 1
        if changed:
            fd, tmp = tempfile.mkstemp(prefix=f".{RESULTS_FILE}.", suffix=".tmp", dir=results_dir())
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    for record in records:
                        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, results_path())
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    return changed


def results_frame(records: list[dict] | None = None) -> pd.DataFrame:
    """The results table: one row per stored result, newest first, indexed by result id."""
    records = read_results() if records is None else records
    frame = pd.DataFrame(records)
    if frame.empty:
        frame = pd.DataFrame(columns=["id", *RESULT_COLUMNS])
    for column in RESULT_COLUMNS:
        if column not in frame:
            frame[column] = ""
    frame = frame.set_index("id")[RESULT_COLUMNS].iloc[::-1]
    frame["comment"] = frame["comment"].fillna("").astype(str)
    return frame


def checkpoint_results(run_dir: Path, records: list[dict] | None = None) -> pd.DataFrame:
    """Results of one run's base model, checkpoints and final adapter, with the step each stands for."""
    run_dir = Path(run_dir)
    records = read_results() if records is None else records
    summary_step = run_summary(run_dir)["step"] or 0
    base_model = run_base_model(run_dir)
    rows = []
    for record in records:
        run, checkpoint = record.get("adapter", ""), record.get("checkpoint", "")
        if record.get("model") != base_model:
            continue
        if run == run_dir.name and checkpoint.startswith("checkpoint-"):
            step, label = int(checkpoint.split("-")[1]), checkpoint
        elif run == run_dir.name and checkpoint == "final":
            step, label = summary_step, "final adapter"
        elif not run:
            step, label = 0, "base model"
        else:
            continue
        rows.append({"step": step, "label": label, "perplexity": record["perplexity"],
                     "dataset": record.get("dataset", ""), "stride": record.get("stride"),
                     "max_length": record.get("max_length"),
                     "setting": f"{record.get('dataset', '')} {record.get('stride')}/{record.get('max_length')}"})
    frame = pd.DataFrame(rows, columns=["step", "label", "perplexity", "dataset", "stride", "max_length", "setting"])
    # Only texts the run itself was evaluated on (a base result alone is no curve).
    own = set(frame.loc[frame["label"] != "base model", "setting"])
    frame = frame[frame["setting"].isin(own)]
    return frame.drop_duplicates(["step", "setting"], keep="last").sort_values("step").reset_index(drop=True)


# =============================================================================================
# Texts to evaluate on


def texts_dir() -> Path:
    return results_dir() / "texts"


def run_data_text(run_dir: Path, which: str = "train") -> str:
    """The text a run trained on (which="train") or was evaluated on ("eval"), as one string.

    Raw text: the file or the folder's files joined by blank lines. Formatted data: every row rendered
    through the run's format file (rows matching no key are left out), joined by blank lines.
    """
    from .data import load_format, load_rows, raw_text_files, read_text_file, render
    from .home import resolve_user_path

    params = run_parameters(run_dir)
    if which == "train":
        name, is_raw = (params.get("raw_text_file"), True) if not params.get("dataset") else (params["dataset"], False)
    elif which == "eval":
        name = params.get("eval_dataset")
        is_raw = bool(name) and str(name).lower().endswith(".txt")
    else:
        raise DashboardError(f"Unknown data part {which!r}.")
    if not name:
        raise DashboardError(f"{Path(run_dir).name} has no {'training' if which == 'train' else 'eval'} data set.")
    path = resolve_user_path(str(name), "dataset")
    if is_raw or path.is_dir():
        return "\n\n".join(read_text_file(p) for p in raw_text_files(path))
    if path.suffix.lower() == ".txt":
        return read_text_file(path)
    rows = load_rows(path)
    if not params.get("format"):
        raise DashboardError(f"{Path(run_dir).name} trained on {path.name} without a format file (chat messages); "
                             f"choose a .txt text instead.")
    fmt = load_format(resolve_user_path(str(params["format"]), "format"))
    texts = []
    for row in rows:
        matched = fmt.match(row)
        if matched:
            texts.append(render(matched[1], row))
    if not texts:
        raise DashboardError(f"No row of {path.name} matches the format {params['format']}.")
    return "\n\n".join(texts)


def save_text(text: str, label: str) -> Path:
    """Store a text to evaluate on under results/texts/, named by its label and content hash."""
    if not text.strip():
        raise DashboardError("The text is empty.")
    texts_dir().mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.")[:60] or "text"
    path = texts_dir() / f"{safe}-{digest}.txt"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=".text.", suffix=".tmp", dir=texts_dir())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    return path


# =============================================================================================
# Forgetting check


def forgetting_ratio(base_perplexity: float, adapter_perplexity: float) -> float:
    """How many times more surprised the adapter is than the base model by the same text (> 1: worse)."""
    if not base_perplexity or base_perplexity <= 0 or not math.isfinite(base_perplexity):
        raise DashboardError("The base model's perplexity must be a positive number.")
    return adapter_perplexity / base_perplexity


def forgetting_sentence(ratio: float, what: str = "general text") -> str:
    """The ratio in plain words, with a reading of how much was forgotten."""
    if not math.isfinite(ratio):
        return f"The adapter's perplexity on {what} is not a finite number: the adapter is broken."
    if abs(ratio - 1) < 0.005:
        return (f"The adapter leaves the model about as surprised by {what} as before (ratio {ratio:.2f}): no sign "
                f"of forgetting.")
    if ratio < 1:
        return (f"The adapter makes the model {1 / ratio:.2f} times less surprised by {what} (ratio {ratio:.3f}): "
                f"no sign of forgetting.")
    if ratio < 1.1:
        reading = "little forgetting"
    elif ratio < 1.5:
        reading = "some forgetting: check a few answers in Try it before using it"
    else:
        reading = "strong forgetting: try an earlier checkpoint, a lower learning rate or fewer steps"
    return f"The adapter makes the model {ratio:.2f} times more surprised by {what}: {reading}."


def forgetting_result(model: str, adapter_dir: Path, text_file: Path, stride: int, max_length: int,
                      records: list[dict] | None = None, precision: str = "full") -> dict | None:
    """The forgetting check from stored results (base and adapter on the same text and settings), or None."""
    records = read_results() if records is None else records
    base = find_result(evaluation_key(model, None, text_file, stride, max_length, precision), records)
    adapted = find_result(evaluation_key(model, adapter_dir, text_file, stride, max_length, precision), records)
    if base is None or adapted is None:
        return None
    ratio = forgetting_ratio(base["perplexity"], adapted["perplexity"])
    return {"base": base["perplexity"], "adapter": adapted["perplexity"], "ratio": ratio,
            "sentence": forgetting_sentence(ratio)}


# =============================================================================================
# Try it: prompt templates and generation


def adapter_choices(run_dir: Path) -> dict[str, Path]:
    """The adapters of a run by label: "final" (when saved) and each checkpoint-STEP."""
    from .train import list_checkpoints

    run_dir = Path(run_dir)
    choices = {"final": run_dir} if has_adapter(run_dir) else {}
    for checkpoint in list_checkpoints(run_dir):
        if has_adapter(checkpoint):
            choices[checkpoint.name] = checkpoint
    return choices


def run_format_name(run_dir: Path) -> str:
    """The format file a run was trained with ("" for raw text or chat data)."""
    params = run_parameters(run_dir)
    return str(params.get("format") or "") if params.get("dataset") else ""


def apply_format(format_name: str, instruction: str) -> str:
    """The prompt as the run saw its training rows: the format's instruction template filled in and cut
    where the output would begin (so the model writes the output)."""
    from .data import load_format, render
    from .home import resolve_user_path

    fmt = load_format(resolve_user_path(format_name, "format"))
    candidates = [(fields, template) for fields, _, template in fmt.entries
                  if "instruction" in fields and "%output%" in template]
    if not candidates:
        raise DashboardError(f"The format {format_name} has no template with %instruction% and %output%.")
    exact = [c for c in candidates if c[0] == {"instruction", "output"}]
    fields, template = (exact or sorted(candidates, key=lambda c: len(c[0])))[0]
    before_output = template[: template.index("%output%")]
    return render(before_output, {name: "" for name in fields} | {"instruction": instruction})


def apply_chat_template(tokenizer, prompt: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DashboardError("This model has no chat template.")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  seed: int = 0) -> str:
    """The model's continuation of the prompt (new text only). Temperature 0: greedy, the same every time;
    above 0: sampling, reproducible for a given seed."""
    import torch
    from transformers import GenerationConfig

    if not prompt:
        raise DashboardError("The prompt is empty.")
    if max_new_tokens < 1:
        raise DashboardError("Max new tokens must be at least 1.")
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=int(max_new_tokens), do_sample=sample, temperature=float(temperature) if sample else None,
        top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(int(seed))
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, generation_config=config)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def load_for_generation(model_name: str, adapter_dir: Path | None = None):
    """A model (with the adapter attached when given) ready for generate_text; the caller caches it."""
    from .models import attach_adapter, load_model

    model = load_model(model_name, progress=lambda message: None)
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir)
    model.eval()
    return model
