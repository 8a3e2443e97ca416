"""The perplexity results store (results/perplexity.jsonl, FORMATS.md), the texts evaluations run on, and the
forgetting check read from stored results.

An evaluation is identified by its key (model, adapter path and weights, text path and content, stride, max
length, precision): asking for an identical one again reuses the stored result.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from pathlib import Path

import pandas as pd

from .adapters import ADAPTER_WEIGHTS
from .checkpoints import CHECKPOINT_PREFIX
from .datafiles import (dataset_names, find_dataset, kind_by_ending, load_format, load_rows, raw_text_files,
                        read_text_file, render)
from .errors import DashboardError
from .home import home_dir, resolve_user_path
from .runfiles import now_iso
from .runtable import run_base_model, run_parameters, run_summary
from .shapes import Unmatched, recognise
from .storage import append_jsonl, iter_jsonl, lock_beside, named_lock, rewrite_jsonl, write_text_atomic

RESULTS_FILE = "perplexity.jsonl"
RESULT_COLUMNS = ["model", "adapter", "checkpoint", "dataset", "stride", "max_length", "tokens", "perplexity",
                  "date", "comment"]
KEY_FIELDS = ("model", "adapter_path", "checkpoint", "dataset_path", "dataset_sha256", "adapter_sha256", "stride",
              "max_length", "precision")
CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
# Where the text of an evaluation comes from (the Evaluate page's choices).
TEXT_FROM_FILE = "A .txt file from datasets/"
TEXT_FROM_TRAINING = "The run's training data"
TEXT_FROM_EVAL = "The run's eval data"
TEXT_PASTED = "A held-out text (paste it)"
# Forgetting ratios: under the first, little forgetting; from the second, strong forgetting.
SOME_FORGETTING, STRONG_FORGETTING = 1.1, 1.5


def results_dir() -> Path:
    return home_dir() / "results"


def results_path() -> Path:
    return results_dir() / RESULTS_FILE


def texts_dir() -> Path:
    return results_dir() / "texts"


def _results_lock():
    """Held around every change of the results file: appends check for an identical result first."""
    return named_lock(lock_beside(results_path()))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


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
    """"" for the base model alone, "checkpoint-STEP" for a checkpoint, "final" for a run's final adapter."""
    if adapter_dir is None:
        return ""
    name = Path(adapter_dir).name
    return name if CHECKPOINT_NAME.fullmatch(name) else "final"


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
    """Every stored result, oldest first (torn and broken lines skipped)."""
    return [record for record in iter_jsonl(results_path()) if "perplexity" in record]


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
        append_jsonl(results_path(), record, fsync=True)
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
            rewrite_jsonl(results_path(), records)
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


def run_results(run_dir: Path, records: list[dict] | None = None) -> list[dict]:
    """The results that concern one run: its adapters' (final and checkpoints) and its base model's alone,
    the yardstick they are compared with."""
    run_dir = Path(run_dir)
    records = read_results() if records is None else records
    base_model = run_base_model(run_dir)
    return [record for record in records if record.get("adapter") == run_dir.name
            or (not record.get("adapter") and record.get("model") == base_model)]


def checkpoint_results(run_dir: Path, records: list[dict] | None = None) -> pd.DataFrame:
    """Results of one run's base model, checkpoints and final adapter, with the step each stands for."""
    run_dir = Path(run_dir)
    records = read_results() if records is None else records
    final_step = run_summary(run_dir)["step"] or 0
    base_model = run_base_model(run_dir)
    rows = []
    for record in records:
        run, checkpoint = record.get("adapter", ""), record.get("checkpoint", "")
        if record.get("model") != base_model:
            continue
        if run == run_dir.name and CHECKPOINT_NAME.fullmatch(checkpoint):
            step, label = int(CHECKPOINT_NAME.fullmatch(checkpoint)[1]), checkpoint
        elif run == run_dir.name and checkpoint == "final":
            step, label = final_step, "final adapter"
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


# ---- texts to evaluate on -----------------------------------------------------------------------------


def text_file_names() -> list[str]:
    """The text files directly under datasets/ and a webui's training/datasets/, by name (`find_dataset` finds
    each)."""
    return dataset_names("raw", folders=False)


def _rendered_rows(run_dir: Path, path: Path, params: dict) -> str:
    """The text of every row of a rows dataset, recognised as the trainer recognises it (trainer/shapes.py):
    format-file records rendered through the run's format file, text rows and prompt/completion text as they
    are. Chat rows are left out: their text depends on the chat template and the model's tokenizer."""
    fmt = load_format(resolve_user_path(str(params["format"]), "format")) if params.get("format") else None
    texts, chats = [], 0
    for row in load_rows(path):
        shape = recognise(row, fmt)
        if isinstance(shape, Unmatched):
            chats += shape.chat
        elif shape.shape == "format":
            texts.append(render(shape.template, row))
        elif shape.text is not None:
            texts.append(shape.text)
        else:
            chats += 1
    if texts:
        return "\n\n".join(texts)
    name = Path(run_dir).name
    if chats:
        raise DashboardError(f"{name} trained on chat rows ({path.name}), whose text depends on the chat template; "
                             f"evaluate on a .txt file or a pasted held-out text instead.")
    if fmt is not None:
        raise DashboardError(f"No row of {path.name} matches the format {params['format']}.")
    raise DashboardError(f"{name} trained on {path.name} without a format file, and none of its rows is text, "
                         f"prompt/completion or a chat; evaluate on a .txt file instead.")


def run_data_text(run_dir: Path, which: str = "train") -> str:
    """The text a run trained on (which="train") or was evaluated on ("eval"), as one string.

    Raw text: the file or the folder's files joined by blank lines. Rows: the text of each row (`_rendered_rows`;
    rows matching no key of the format file are left out, as the trainer leaves them), joined by blank lines.
    """
    params = run_parameters(run_dir)
    if which == "train":
        name, is_raw = (params.get("raw_text_file"), True) if not params.get("dataset") else (params["dataset"], False)
    elif which == "eval":
        name = params.get("eval_dataset")
        is_raw = bool(name) and kind_by_ending(str(name)) == "raw"
    else:
        raise DashboardError(f"Unknown data part {which!r}.")
    if not name:
        raise DashboardError(f"{Path(run_dir).name} has no {'training' if which == 'train' else 'eval'} data set.")
    # Resolved as the trainer resolved it: a path, or a name in datasets/ then a webui's training/datasets/.
    path = resolve_user_path(str(name), "dataset")
    if is_raw or path.is_dir() or kind_by_ending(path.name) == "raw":
        return "\n\n".join(read_text_file(p) for p in raw_text_files(path))
    return _rendered_rows(run_dir, path, params)


def save_text(text: str, label: str) -> Path:
    """Store a text to evaluate on under results/texts/, named by its label and content hash."""
    if not text.strip():
        raise DashboardError("The text is empty.")
    texts_dir().mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.")[:60] or "text"
    path = texts_dir() / f"{safe}-{digest}.txt"
    if not path.exists():
        write_text_atomic(path, text)
    return path


def text_sources(run_dir: Path) -> list[str]:
    """Where a run's evaluation text can come from (its eval data only when it has some)."""
    sources = [TEXT_FROM_FILE, TEXT_FROM_TRAINING]
    if run_parameters(run_dir).get("eval_dataset"):
        sources.append(TEXT_FROM_EVAL)
    return sources + [TEXT_PASTED]


def text_to_evaluate(source: str, run_dir: Path, file_name: str | None = None,
                     pasted: str | None = None) -> tuple[Path, str]:
    """The text file to evaluate on and its label in the results table, for one of `text_sources`.

    A run's data and a pasted text are stored under results/texts/ first, so the evaluation reads a file."""
    name = Path(run_dir).name
    if source == TEXT_FROM_FILE:
        if not file_name:
            raise DashboardError("There is no .txt file in datasets/.")
        return find_dataset(file_name), file_name  # listed from datasets/ and a webui's training/datasets/
    if source == TEXT_FROM_TRAINING:
        return save_text(run_data_text(run_dir, "train"), f"{name}-train"), f"{name}: training data"
    if source == TEXT_FROM_EVAL:
        return save_text(run_data_text(run_dir, "eval"), f"{name}-eval"), f"{name}: eval data"
    if source != TEXT_PASTED:
        raise DashboardError(f"Unknown text source {source!r}.")
    text_file = save_text(pasted or "", "held-out")
    return text_file, f"held-out {text_file.stem[-12:]}"


def chosen_adapters(adapters: dict[str, Path], base: bool, final: bool, checkpoints: list[str]) -> list[Path | None]:
    """The models to evaluate: None for the base model alone, then the final adapter and the checkpoints."""
    return (([None] if base else []) + ([adapters["final"]] if final and "final" in adapters else [])
            + [adapters[c] for c in checkpoints])


def start_sentence(started: dict) -> str:
    """What happened to a request for evaluations (jobs.start_perplexity's answer), in words."""
    reused, running = len(started["reused"]), started["running"]
    if started["job"]:
        message = f"{started['pending']} evaluation(s) started in the background"
    elif running:
        message = f"{running} identical evaluation(s) are already running in the background"
    else:
        message = f"All {reused} evaluation(s) were done before; their stored results are shown"
    if started["job"] and running:
        message += f"; {running} identical one(s) already running"
    if (started["job"] or running) and reused:
        message += f"; {reused} identical one(s) reused from earlier results"
    return message + "."


# ---- forgetting check ---------------------------------------------------------------------------------


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
    if ratio < SOME_FORGETTING:
        reading = "little forgetting"
    elif ratio < STRONG_FORGETTING:
        reading = "some forgetting: check a few answers in Try it before using it"
    else:
        reading = "strong forgetting: try an earlier checkpoint, a lower learning rate or fewer steps"
    return f"The adapter makes the model {ratio:.2f} times more surprised by {what}: {reading}."


def forgetting_result(model: str, adapter_dir: Path, text_file: Path, stride: int, max_length: int,
                      records: list[dict] | None = None, precision: str = "full") -> dict | None:
    """The forgetting check from stored results (base and adapter on the same text and settings), or None.

    "worrying": some forgetting or more, worth a warning."""
    records = read_results() if records is None else records
    base = find_result(evaluation_key(model, None, text_file, stride, max_length, precision), records)
    adapted = find_result(evaluation_key(model, adapter_dir, text_file, stride, max_length, precision), records)
    if base is None or adapted is None:
        return None
    ratio = forgetting_ratio(base["perplexity"], adapted["perplexity"])
    return {"base": base["perplexity"], "adapter": adapted["perplexity"], "ratio": ratio,
            "sentence": forgetting_sentence(ratio), "worrying": ratio >= SOME_FORGETTING}
