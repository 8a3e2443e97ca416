"""Tables as dataset rows: `.csv` and `.tsv` (through pandas) and `.parquet` (through pyarrow).

Each row becomes an object whose keys are the column names, so a table works exactly as a `.jsonl` file of
the same rows would: its columns are the fields of a format file, or, named so, a recognised shape
(`text`, `prompt` + `completion`, `messages`, `conversations`; see trainer/shapes.py). CSV and TSV cells
are read as text (an empty cell is an empty field, never NaN); a `messages` or `conversations` cell holding
a JSON list of messages is read as that list. Parquet keeps its column types (a list column of structs is a list of
objects, as in a JSON row).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from .errors import DashboardError

JSON_COLUMNS = ("messages", "conversations", "prompt", "completion")  # cells that may hold chat messages


def table_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a .csv, .tsv or .parquet file, as objects keyed by column name."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        return _parquet_rows(path)
    from .datafiles import read_text_file

    return _delimited_rows(path, read_text_file(path), "\t" if path.suffix.lower() == ".tsv" else ",")


def _delimited_rows(path: Path, text: str, separator: str) -> list[dict[str, Any]]:
    import pandas as pd

    if not text.strip():
        raise DashboardError(f"{path.name} holds no rows.")
    try:
        frame = pd.read_csv(io.StringIO(text), sep=separator, dtype=str, keep_default_na=False,
                            skip_blank_lines=True)
    except pd.errors.ParserError as exc:
        raise DashboardError(f"{path.name} is not a readable {_kind(path)} table: {_first_line(exc)}") from None
    except (ValueError, pd.errors.EmptyDataError) as exc:
        raise DashboardError(f"{path.name} is not a readable {_kind(path)} table: {_first_line(exc)}") from None
    unnamed = [str(c) for c in frame.columns if str(c).startswith("Unnamed:")]
    if unnamed:
        raise DashboardError(f"{path.name}: the first line must name every column; "
                             f"{len(unnamed)} column(s) have no name.")
    rows = frame.to_dict(orient="records")
    for row in rows:
        for column in JSON_COLUMNS:
            if column in row:
                row[column] = _json_list(row[column])
    return rows


def _json_list(value: Any) -> Any:
    """A cell holding a JSON list of objects (chat messages) as that list; any other cell as it is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
        return parsed if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed) else value
    return value


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        raise DashboardError(f"File not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DashboardError(f"{path.name} is not a readable Parquet file: {_first_line(exc)}") from None
    return table.to_pylist()


def _kind(path: Path) -> str:
    return "TSV" if path.suffix.lower() == ".tsv" else "CSV"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
