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


def step_axis() -> alt.Axis:
    """An axis of whole numbers (steps, samples): ticks 1, 2, 3, never 1.0, 1.1, 1.2. (Formats without a
    precision are avoided: Vega derives one from the tick step and prints 40,000 as 4e+4.)"""
    return alt.Axis(format=",d", tickMinStep=1)


def padded_domain(values, integer: bool = False, zero: bool = False, log: bool = False) -> list[float] | None:
    """An explicit scale domain where the values span no range (one point, or all equal), so the axis shows a
    few readable ticks around the value instead of one value printed as 1.000000; None otherwise."""
    values = np.asarray(values, dtype="float64")
    values = values[np.isfinite(values)]
    if len(values) == 0 or values.min() != values.max():
        return None
    value = float(values[0])
    if log and value > 0:
        return [value / 2, value * 2]
    if zero:
        return [min(0.0, value * 1.25), max(0.0, value * 1.25)] if value else [0.0, 1.0]
    pad = 1.0 if integer else (abs(value) * 0.1 or 1.0)
    return [value - pad, value + pad]


def _scale(domain: list[float] | None, **options) -> alt.Scale:
    return alt.Scale(domain=domain, nice=False, **options) if domain else alt.Scale(**options)


def _value_axes(chart: str, x_title: str, data: pd.DataFrame | None = None) -> dict:
    """The x and y encodings of a metric chart, and its tooltip (`data`: the rows, for one-point charts)."""
    title = CHARTS[chart][0]
    steps = x_title == X_AXES["step"]
    x_axis = step_axis() if steps else alt.Axis()
    y_axis = alt.Axis(format=".1e") if chart == "learning_rate" else alt.Axis()
    # Perplexity is exp(loss): a log scale keeps a good and a bad run readable on one chart. A loss curve
    # fills the chart (a fall from 2.1 to 1.8 is the story; an axis from 0 flattens it); a learning rate
    # keeps its zero, where warm-up starts and decay ends.
    log, zero = chart == "eval_perplexity", chart == "learning_rate"
    x_domain = y_domain = None
    if data is not None and len(data):
        x_domain = padded_domain(data["x"], integer=steps)
        y_domain = padded_domain(data["value"], zero=zero, log=log)
    y_scale = _scale(y_domain, type="log") if log else _scale(y_domain, zero=zero)
    tooltip = [alt.Tooltip("run:N", title="Run"), alt.Tooltip("series:N", title="Series"),
               alt.Tooltip("x:Q", title=x_title, format=",.4~f"), alt.Tooltip("value:Q", title=title, format=",.5~g")]
    return dict(x=alt.X("x:Q", title=x_title, axis=x_axis, scale=_scale(x_domain)),
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
    encoding = _value_axes(chart, x_title, data)
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
    encoding = _value_axes("loss", X_AXES["step"], data)
    encoding["color"] = alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom"),
                                  scale=alt.Scale(domain=names, range=["#1f77b4", "#2b8a3e"][: len(names)]))
    return _lines_with_sparse_points(data, encoding, height, "Training loss")


def perplexity_chart(results: pd.DataFrame, height: int = 260):
    """Perplexity by checkpoint step for one run's results (columns step, perplexity, dataset), or None.

    The base model is drawn at step 0: a LoRA starts as the identity, so step 0 is the base model."""
    if results is None or results.empty:
        return None
    tooltip = ["dataset:N", "label:N", alt.Tooltip("perplexity:Q", format=",.4f"), "stride:Q", "max_length:Q"]
    x_scale = _scale(padded_domain(results["step"], integer=True))
    y_scale = _scale(padded_domain(results["perplexity"]), zero=False)
    base = alt.Chart(results).encode(
        x=alt.X("step:Q", title="Checkpoint step (0: base model)", axis=step_axis(), scale=x_scale),
        y=alt.Y("perplexity:Q", title="Perplexity", scale=y_scale),
        color=alt.Color("dataset:N", title="Text"), detail="setting:N", tooltip=tooltip)
    return (base.mark_line() + base.mark_point(filled=True, size=50)).properties(height=height,
                                                                                  title="Perplexity by checkpoint")


# ---- the Data page's length histogram ------------------------------------------------------------------

CUTOFF_COLOR = "#d9480f"  # the accent colour: readable on the light and the dark background
HISTOGRAM_BINS = 40
HEADROOM = 1.3  # the y axis goes 30% above the highest bar: the cutoff label sits in that free band


def _nice_bin_width(top: int, bins: int = HISTOGRAM_BINS) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... tokens that cuts [0, top] into at most `bins` bins."""
    scale = 1
    while True:
        for factor in (1, 2, 5):
            if top / (factor * scale) <= bins:
                return factor * scale
        scale *= 10


def length_bins(lengths: np.ndarray, cutoff: int) -> pd.DataFrame:
    """Sample lengths counted in bins of a round width that end at the cutoff: (cutoff - w, cutoff],
    (cutoff - 2w, cutoff - w], ... down to 0 (and above the cutoff, should a sample be longer), so every
    sample the cutoff allows is left of its line. Columns start, end (bins hold start < length <= end), count;
    every bin from 0 to the last one, empty ones with count 0."""
    lengths = np.asarray(lengths, dtype="int64")
    cutoff = max(int(cutoff), 1)
    top = max(cutoff, int(lengths.max()) if len(lengths) else 0)
    width = _nice_bin_width(top)
    lowest, highest = -(-cutoff // width), -(-(top - cutoff) // width)  # bins below and above the cutoff
    index = -(-(lengths - cutoff) // width) + lowest - 1  # ceil((length - cutoff) / width), from 0
    counts = np.bincount(np.clip(index, 0, None), minlength=lowest + highest)
    ends = cutoff + (np.arange(len(counts)) - lowest + 1) * width
    return pd.DataFrame({"start": np.maximum(ends - width, 0), "end": ends, "count": counts})


def histogram(lengths: np.ndarray, cutoff: int, height: int = 200) -> alt.LayerChart:
    """Token lengths of the samples as bars, with the cutoff as a dashed rule labelled "cutoff N".

    The label stays inside the plot: it sits in the band above the highest bar, on the side of the rule
    with more room (left of it when the cutoff is in the right half)."""
    bins = length_bins(lengths, cutoff)
    x_max = float(max(bins["end"].iloc[-1], cutoff)) * 1.02  # the cutoff's line clear of the plot's edge
    x_scale = alt.Scale(domain=[0, x_max], nice=False)
    y_scale = alt.Scale(domain=[0, max(1, int(bins["count"].max())) * HEADROOM], nice=False)
    bars = alt.Chart(bins[bins["count"] > 0]).mark_bar().encode(
        x=alt.X("start:Q", bin="binned", scale=x_scale, title="tokens per sample", axis=step_axis()), x2="end:Q",
        y=alt.Y("count:Q", scale=y_scale, title="samples", axis=step_axis()),
        tooltip=[alt.Tooltip("start:Q", title="more than (tokens)"), alt.Tooltip("end:Q", title="up to (tokens)"),
                 alt.Tooltip("count:Q", title="samples")])
    marker = pd.DataFrame({"cutoff": [cutoff], "label": [f"cutoff {cutoff}"]})
    rule = alt.Chart(marker).mark_rule(color=CUTOFF_COLOR, strokeDash=[5, 3], strokeWidth=2).encode(
        x=alt.X("cutoff:Q", scale=x_scale))
    right_half = cutoff > x_max / 2
    text = alt.Chart(marker).mark_text(align="right" if right_half else "left", dx=-5 if right_half else 5,
                                       dy=4, baseline="top", color=CUTOFF_COLOR, fontWeight="bold").encode(
        x=alt.X("cutoff:Q", scale=x_scale), y=alt.value(0), text="label:N")
    return alt.layer(bars, rule, text).properties(height=height)
