"""Charts of runs: the chart data (smoothing, and downsampling that keeps each bucket's minimum and maximum, so
a chart never has more than a few thousand rows and a loss of 0.0 is never dropped) and the Altair charts
the Evaluate and Train pages draw from it.
"""

from __future__ import annotations

from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from .errors import DashboardError

X_AXES = {"step": "Step", "epoch": "Epoch", "time": "Time"}
# Altair refuses more than 5,000 rows per chart by default; stay below it by construction.
MAX_CHART_ROWS = 4800
MAX_POINTS_PER_SERIES = 2000
# Each chart: its title and its series as (series name, metrics column, drawn from eval lines).
CHARTS = {
    "loss": ("Loss", [("loss", "loss", False), ("smoothed", "loss", False), ("eval loss", "eval_loss", True)]),
    "eval_perplexity": ("Eval perplexity", [("eval perplexity", "eval_perplexity", True)]),
    "learning_rate": ("Learning rate", [("learning rate", "learning_rate", False)]),
    "tokens_per_second": ("Tokens per second", [("tokens/s", "tokens_per_second", False)]),
}
SERIES_STYLE = {  # series: (dash, opacity)
    "loss": ([1, 0], 0.35), "smoothed": ([1, 0], 1.0), "eval loss": ([6, 3], 1.0),
}
# A series with at most this many points is drawn with its points too, so a short line stays visible.
SPARSE_POINTS = 60
CHART_COLUMNS = ["run", "series", "x", "value"]


# ---- chart data ----------------------------------------------------------------------------------------


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


def _series_of_chart(frames: dict[str, pd.DataFrame], xs: dict[str, np.ndarray], chart: str,
                     smoothing: float) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(run, series, x values, values) of one chart, full length, without the points that cannot be drawn.

    Smoothing is computed on the full series before downsampling, so it is the same at any zoom."""
    pieces = []
    for run, frame in frames.items():
        is_eval = frame["is_eval"].to_numpy()
        for series, column, eval_rows in CHARTS[chart][1]:
            if series == "smoothed" and smoothing <= 0:
                continue
            rows = is_eval if eval_rows else ~is_eval
            values = frame[column].to_numpy()[rows]
            if series == "smoothed":
                values = ema(values, smoothing)
            x_values = xs[run][rows]
            usable = ~np.isnan(values) & ~np.isnan(x_values)
            if usable.any():
                pieces.append((run, series, x_values[usable], values[usable]))
    return pieces


def _downsampled(pieces: list[tuple[str, str, np.ndarray, np.ndarray]], max_rows: int,
                 max_points: int) -> pd.DataFrame:
    """The pieces as one long frame of at most `max_rows` rows, each piece min/max downsampled to its share."""
    if not pieces:
        return pd.DataFrame(columns=CHART_COLUMNS)
    budgets = _share_rows([len(values) for _, _, _, values in pieces], max_rows, max_points)
    parts = []
    for (run, series, x_values, values), budget in zip(pieces, budgets):
        keep = downsample_indices(values, budget)
        parts.append(pd.DataFrame({"run": run, "series": series, "x": x_values[keep], "value": values[keep]}))
    return pd.concat(parts, ignore_index=True)


def chart_data(frames: dict[str, pd.DataFrame], x: str = "step", smoothing: float = 0.6,
               max_rows: int = MAX_CHART_ROWS, max_points: int = MAX_POINTS_PER_SERIES) -> dict[str, Any]:
    """Long-format chart frames (columns run, series, x, value) for each chart in CHARTS, each with at most
    `max_rows` rows and at most `max_points` per run and series, plus the x axis title under "x_title" and
    the run names under "runs". The frames are metrics frames (trainer.metrics.metrics_frame) by run name.
    """
    xs = {run: _x_values(frame, x) for run, frame in frames.items()}
    x_title = X_AXES.get(x, x)
    if x == "time":
        longest = max((np.nanmax(v) for v in xs.values() if len(v) and not np.isnan(v).all()), default=0.0)
        scale, x_title = _time_unit(float(longest))
        xs = {run: values / scale for run, values in xs.items()}
    result: dict[str, Any] = {"x_title": x_title, "runs": list(frames)}
    for chart in CHARTS:
        result[chart] = _downsampled(_series_of_chart(frames, xs, chart, smoothing), max_rows, max_points)
    return result


def empty_chart_note(chart: str, x: str) -> str:
    """What the page says in place of a chart with nothing to draw."""
    why = (" (no eval lines: set an eval dataset when training)." if "eval" in chart else
           (" on a time axis (webui runs log no times)." if x == "time" else "."))
    return f"**{CHARTS[chart][0]}**: nothing to draw for these runs{why}"


# ---- Altair charts --------------------------------------------------------------------------------------


def _value_axes(chart: str, x_title: str) -> dict:
    """The x and y encodings of a metric chart, and its tooltip."""
    title = CHARTS[chart][0]
    # Steps are whole numbers; a learning rate reads best as 3e-4. (Formats without a precision are avoided:
    # Vega derives one from the tick step and prints 40,000 as 4e+4.)
    x_axis = alt.Axis(format=",d", tickMinStep=1) if x_title == X_AXES["step"] else alt.Axis()
    y_axis = alt.Axis(format=".1e") if chart == "learning_rate" else alt.Axis()
    # Perplexity is exp(loss): a log scale keeps a good and a bad run readable on one chart. A loss curve
    # fills the chart (a fall from 2.1 to 1.8 is the story; an axis from 0 flattens it); a learning rate
    # keeps its zero, where warm-up starts and decay ends.
    y_scale = alt.Scale(type="log") if chart == "eval_perplexity" else alt.Scale(zero=chart == "learning_rate")
    tooltip = [alt.Tooltip("run:N", title="Run"), alt.Tooltip("series:N", title="Series"),
               alt.Tooltip("x:Q", title=x_title, format=",.4~f"), alt.Tooltip("value:Q", title=title, format=",.5~g")]
    return dict(x=alt.X("x:Q", title=x_title, axis=x_axis),
                y=alt.Y("value:Q", title=title, axis=y_axis, scale=y_scale), tooltip=tooltip)


def _lines_with_sparse_points(data: pd.DataFrame, encoding: dict, height: int, title: str):
    """Lines, plus points where a series is short (eval lines, a webui run with one entry) so they stay visible."""
    lines = alt.Chart().mark_line(strokeWidth=1.6).encode(**encoding, detail="series:N")
    counts = data.groupby(["run", "series"])["value"].transform("size")
    data = data.assign(sparse=counts <= SPARSE_POINTS)
    points = alt.Chart().mark_point(filled=True, size=28).encode(**encoding).transform_filter("datum.sparse")
    return alt.layer(lines, points, data=data).properties(height=height, title=title).interactive(bind_y=False)


def metric_chart(data: pd.DataFrame, chart: str, x_title: str, height: int = 280, runs: list[str] | None = None):
    """A line chart of one chart frame from `chart_data`, colour by run, or None when it has no rows.

    `runs` fixes the colour of each run, so a run has the same colour in every chart."""
    if data is None or data.empty:
        return None
    names = [s for s, _, _ in CHARTS[chart][1] if s in set(data["series"])]
    encoding = _value_axes(chart, x_title)
    encoding["color"] = alt.Color("run:N", title="Run", legend=alt.Legend(labelLimit=140),
                                  scale=alt.Scale(scheme="tableau10", domain=runs or sorted(set(data["run"]))))
    if len(names) > 1:
        encoding["strokeDash"] = alt.StrokeDash(
            "series:N", legend=None,  # explained under the charts: faint raw, solid smoothed, dashed eval
            scale=alt.Scale(domain=names, range=[SERIES_STYLE[n][0] for n in names]))
        encoding["opacity"] = alt.Opacity(
            "series:N", legend=None, scale=alt.Scale(domain=names, range=[SERIES_STYLE[n][1] for n in names]))
    return _lines_with_sparse_points(data, encoding, height, CHARTS[chart][0])


def loss_chart(frame: pd.DataFrame, height: int = 260, max_points: int = MAX_POINTS_PER_SERIES):
    """The Train page's live loss chart of one run (a metrics frame): training loss and eval loss by step,
    colour by series, or None before the first loss.

    Drawn from the same chart data as the Evaluate page, so a long run is min/max downsampled and a spike or
    a loss of exactly 0.0 never vanishes from it."""
    data = chart_data({"run": frame}, "step", 0.0, max_points=max_points)["loss"]
    if data.empty:
        return None
    names = [s for s in ("loss", "eval loss") if s in set(data["series"])]
    encoding = _value_axes("loss", X_AXES["step"])
    encoding["color"] = alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom"),
                                  scale=alt.Scale(domain=names, range=["#1f77b4", "#2b8a3e"][: len(names)]))
    return _lines_with_sparse_points(data, encoding, height, "Training loss")


def perplexity_chart(results: pd.DataFrame, height: int = 260):
    """Perplexity by checkpoint step for one run's results (columns step, perplexity, dataset), or None.

    The base model is drawn at step 0: a LoRA starts as the identity, so step 0 is the base model."""
    if results is None or results.empty:
        return None
    tooltip = ["dataset:N", "label:N", alt.Tooltip("perplexity:Q", format=",.4f"), "stride:Q", "max_length:Q"]
    base = alt.Chart(results).encode(
        x=alt.X("step:Q", title="Checkpoint step (0: base model)"),
        y=alt.Y("perplexity:Q", title="Perplexity", scale=alt.Scale(zero=False)),
        color=alt.Color("dataset:N", title="Text"), detail="setting:N", tooltip=tooltip)
    return (base.mark_line() + base.mark_point(filled=True, size=50)).properties(height=height,
                                                                                  title="Perplexity by checkpoint")
