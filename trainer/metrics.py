"""A run's metrics as a pandas DataFrame: ours from metrics.jsonl, text-generation-webui's from training_log.json.

metrics.jsonl can hold hundreds of thousands of lines and grows while a run trains, so parsed files are
cached by path and a file that only grew is parsed from where the last parse stopped (FORMATS.md documents
both files).
"""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .runfiles import METRICS_FILE

WEBUI_LOG_FILE = "training_log.json"
NUMERIC_COLUMNS = ("step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens",
                   "tokens_per_second", "elapsed_s", "eta_s", "eval_loss", "eval_perplexity")
# The first bytes of a file, compared on each read: a file rewritten from scratch (a resumed run cuts its
# metrics back) no longer starts with them and is parsed again.
HEAD_BYTES = 256


def as_float(value: Any) -> float:
    """A metric value as a float: numbers, and the strings "nan"/"inf" the trainer writes for non-finite ones."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def empty_metrics() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in NUMERIC_COLUMNS})
    frame["is_eval"] = pd.Series(dtype="bool")
    return frame


def as_metrics_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame with every metric column as float64 (NaN where missing) and `is_eval` (an eval line)."""
    for column in NUMERIC_COLUMNS:
        if column not in frame:
            frame[column] = np.nan
    frame = frame[list(NUMERIC_COLUMNS)].astype("float64")
    frame["is_eval"] = frame["eval_loss"].notna() | frame["eval_perplexity"].notna()
    return frame.reset_index(drop=True)


def _parse_line_by_line(data: bytes) -> pd.DataFrame:
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
            columns[column].append(as_float(record.get(column)))
    return as_metrics_frame(pd.DataFrame(columns))


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
        return as_metrics_frame(table.to_pandas())
    except Exception:  # pyarrow.ArrowInvalid and friends: fall back to the tolerant reader
        return _parse_line_by_line(data)


def _read_bytes(path: Path, offset: int = 0, size: int = -1) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)
    except OSError:
        return b""


def _complete_lines(data: bytes) -> bytes:
    """The bytes up to the last newline: a torn last line is still being written, so it waits for the next read."""
    return data[: data.rfind(b"\n") + 1]


class MetricsCache:
    """Parsed metrics files by path (the `size` most recent). A file that only grew is parsed from where the
    last parse stopped."""

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
        same_file = entry is not None and entry["ino"] == stat.st_ino and stat.st_size >= entry["offset"]
        if same_file and (stat.st_size, stat.st_mtime_ns) == (entry["size"], entry["mtime"]):
            pass  # unchanged
        elif same_file and _read_bytes(path, 0, len(entry["head"])) == entry["head"]:
            complete = _complete_lines(_read_bytes(path, entry["offset"]))
            if complete:
                new = parse_metrics_bytes(complete)
                entry["frame"] = pd.concat([entry["frame"], new], ignore_index=True) if len(entry["frame"]) else new
            entry["offset"] += len(complete)
        else:
            complete = _complete_lines(_read_bytes(path))
            entry = {"ino": stat.st_ino, "offset": len(complete), "head": complete[:HEAD_BYTES],
                     "frame": parse_metrics_bytes(complete)}
        entry.update(size=stat.st_size, mtime=stat.st_mtime_ns)
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return entry["frame"]


_metrics_cache = MetricsCache()


def read_webui_log(run_dir: Path) -> list[dict]:
    """training_log.json of a text-generation-webui run: its latest entry (a dict) or a list of entries."""
    try:
        data = json.loads((Path(run_dir) / WEBUI_LOG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list):
        return [entry for entry in data if isinstance(entry, dict)]
    return []


def _webui_entries(run_dir: Path) -> list[dict]:
    """A webui run's log lines: the HF Trainer's log_history of its newest checkpoint (every logged step, its
    `step` counting optimiser steps) when that holds more than training_log.json (only the latest entry, its
    `current_steps` counting micro-batches)."""
    from .storage import read_json

    entries = read_webui_log(run_dir)
    states = sorted(run_dir.glob("checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[-1]) if p.parent.name.split("-")[-1].isdigit() else -1)
    history = (read_json(states[-1]) or {}).get("log_history") if states else None
    history = [entry for entry in history if isinstance(entry, dict)] if isinstance(history, list) else []
    if not history:
        return entries
    # training_log.json's latest entry goes on after the checkpoint: its optimiser step from its epoch.
    last = history[-1]
    per_epoch = as_float(last.get("step")) / as_float(last.get("epoch")) if as_float(last.get("epoch")) else math.nan
    later = [{**entry, "step": round(as_float(entry["epoch"]) * per_epoch)} for entry in entries
             if math.isfinite(per_epoch) and as_float(entry.get("epoch")) > as_float(last.get("epoch"))]
    return history + later


def webui_metrics_frame(run_dir: Path) -> pd.DataFrame:
    """What can be charted from a webui run: one train row per entry with a loss, one eval row per eval loss."""
    rows = []
    for entry in _webui_entries(Path(run_dir)):
        step = as_float(entry.get("step", entry.get("current_steps", entry.get("global_step"))))
        common = {"step": step, "epoch": as_float(entry.get("epoch"))}
        if "loss" in entry:
            rows.append({**common, "loss": as_float(entry.get("loss")),
                         "learning_rate": as_float(entry.get("learning_rate")),
                         "grad_norm": as_float(entry.get("grad_norm"))})
        if "eval_loss" in entry:
            eval_loss = as_float(entry.get("eval_loss"))
            rows.append({**common, "eval_loss": eval_loss,
                         "eval_perplexity": math.exp(min(eval_loss, 700)) if math.isfinite(eval_loss) else math.nan})
    if not rows:
        return empty_metrics()
    return as_metrics_frame(pd.DataFrame(rows))


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


def latest_train_line(frame: pd.DataFrame) -> dict[str, float]:
    """The last train line of a metrics frame as a dict of its values (missing ones left out), {} before it."""
    train = frame[~frame["is_eval"]]
    if train.empty:
        return {}
    return {k: float(v) for k, v in train.iloc[-1].drop("is_eval").items() if pd.notna(v)}
