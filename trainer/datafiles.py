"""The user's data files: which files are datasets, and reading them (text, rows, tables, format files).

One rule decides what a dataset is, by its ending (`dataset_kind`): a `.txt` or `.md` file or a folder of
them is raw text; a `.json` list, `.jsonl` rows or a `.csv`, `.tsv` or `.parquet` table is rows (formatted
data: records for a format file, chat rows, prompt/completion or text rows, see trainer/shapes.py). The Data
page's lists and its uploader, the Train page's pickers, build_samples (the preview on the command line and
the trainer) and the sample cache all follow it. Datasets are found in the home's datasets/ and in a webui's
training/datasets/. FORMATS.md documents the files themselves.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from natsort import natsorted, ns

from .errors import DashboardError
from .home import (DATASET_ENDINGS, RAW_TEXT_ENDINGS, ROWS_ENDINGS, TABLE_ENDINGS, check_name, datasets_dir,
                   datasets_dirs, formats_dirs, resolve_inside)
from .storage import write_bytes_atomic


# ---- which files are datasets ----------------------------------------------------------------------
def kind_by_ending(name: str) -> str | None:
    """"raw" for a name ending in .txt/.md, "formatted" for .json/.jsonl/.csv/.tsv/.parquet, None for any other."""
    suffix = Path(name).suffix.lower()
    if suffix in RAW_TEXT_ENDINGS:
        return "raw"
    return "formatted" if suffix in ROWS_ENDINGS else None


def dataset_kind(path: Path) -> str | None:
    """What a path holds: "raw" (a .txt/.md file, or a folder: its text files), "formatted", or None."""
    path = Path(path)
    return "raw" if path.is_dir() else kind_by_ending(path.name)


def dataset_names(kind: str = "any", folders: bool = True) -> list[str]:
    """Names of this kind ("raw", "formatted" or "any") under datasets/ and a webui's training/datasets/
    (each name once: datasets/ wins, as a bare name resolves), hidden names left out. A folder is listed when
    it holds text files (and `folders` is true)."""
    names: list[str] = []
    for root in datasets_dirs():
        if not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            found = dataset_kind(path)
            if path.name.startswith(".") or found is None or kind not in (found, "any") or path.name in names:
                continue
            if path.is_dir() and not (folders and _text_files_in(path)):
                continue
            names.append(path.name)
    return sorted(names)


def find_dataset(name: str) -> Path:
    """A name `dataset_names` lists, resolved safely inside the folder that holds it (datasets/ first)."""
    folders = [folder for folder in datasets_dirs() if folder.is_dir()] or [datasets_dir()]
    for folder in folders:
        path = resolve_inside(folder, name, "dataset")
        if path.exists():
            return path
    return resolve_inside(folders[0], name, "dataset")


def format_names() -> list[str]:
    """Format file names (without .json) in the home's formats/ and the shipped ones, each name once."""
    names = []
    for folder in formats_dirs():
        if folder.is_dir():
            names += [p.stem for p in sorted(folder.glob("*.json")) if not p.name.startswith(".")]
    return list(dict.fromkeys(names))


def save_dataset(name: str, data: bytes, replace: bool = False) -> Path:
    """Write uploaded bytes into datasets/ under a checked name (a dataset ending, inside datasets/, links
    followed); an existing file is replaced only with `replace`. Returns the file written."""
    name = check_name(name, "file name")
    if kind_by_ending(name) is None:
        endings = list(DATASET_ENDINGS)
        raise DashboardError(f"{name} must end in {', '.join(endings[:-1])} or {endings[-1]}.")
    folder = datasets_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target = resolve_inside(folder, name, "file name")
        if target.is_dir():
            raise DashboardError(f"datasets/{name} is a folder; choose another name.")
        if target.exists() and not replace:
            raise DashboardError(f"datasets/{name} already exists; tick 'Replace the existing file' or rename it.")
        write_bytes_atomic(target, data)
    except OSError as exc:
        raise DashboardError(f"Cannot write into datasets/: {exc.strerror or exc}. Is the home folder writable?") \
            from None
    return target


def _text_files_in(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if kind_by_ending(p.name) == "raw" and p.is_file()]
    return natsorted(files, key=lambda p: p.name, alg=ns.IGNORECASE)  # part2 before part10


# ---- reading ----------------------------------------------------------------------------------------
def read_text_file(path: Path) -> str:
    """A text file as UTF-8 with \\r\\n and \\r turned into \\n; a clear error names the first bad byte."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DashboardError(f"File not found: {path}") from None
    except IsADirectoryError:
        raise DashboardError(f"{path} is a folder, not a file.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DashboardError(
            f"{path.name} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} "
            f"cannot be decoded. Save the file as UTF-8 and try again."
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark is not text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def raw_text_files(path: Path) -> list[Path]:
    """A .txt file, or every .txt file of a folder in natural order."""
    path = Path(path)
    if path.is_dir():
        files = _text_files_in(path)
        if not files:
            raise DashboardError(f"The folder {path.name} holds no .txt files.")
        return files
    if not path.exists():
        raise DashboardError(f"Raw text file not found: {path}")
    return [path]


def load_rows(path: Path) -> list[Any]:
    """Rows of a .json file (a list of objects), a .jsonl file (one object per line) or a table."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TABLE_ENDINGS:
        from .tables import table_rows

        rows = table_rows(path)
    else:
        text = read_text_file(path)
        rows = _jsonl_rows(path, text) if suffix == ".jsonl" else _json_rows(path, text)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DashboardError(
                f"{path.name}: row {index} is {_a(type(row).__name__)}, not an object; a dataset is a list of objects.")
    if not rows:
        raise DashboardError(f"{path.name} holds no rows.")
    return rows


def _jsonl_rows(path: Path, text: str) -> list[Any]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DashboardError(f"{path.name}, line {number}: not valid JSON ({exc.msg}).") from None
        except RecursionError:
            raise DashboardError(f"{path.name}, line {number}: JSON nested too deeply to read.") from None
    return rows


def _json_rows(path: Path, text: str) -> list[Any]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DashboardError(
            f"{path.name} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.") from None
    except RecursionError:
        raise DashboardError(f"{path.name} nests JSON too deeply to read.") from None
    if not isinstance(rows, list):
        raise DashboardError(f"{path.name} must hold a JSON list of objects; it holds a {type(rows).__name__}.")
    return rows


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


# ---- format files -----------------------------------------------------------------------------------
_FIELD_RE = re.compile(r"%([A-Za-z0-9_]+)%")


@dataclass
class FormatFile:
    entries: list[tuple[frozenset[str], str, str]]  # (field set, key as written, template)

    def match(self, row: dict) -> tuple[str, str] | None:
        """The first key whose field set equals the row's non-empty string fields: (key, template)."""
        fields = row_fields(row)
        for field_set, key, template in self.entries:
            if field_set == fields:
                return key, template
        return None


def row_fields(row: dict) -> frozenset[str]:
    return frozenset(k for k, v in row.items() if isinstance(v, str) and v.strip())


def load_format(path: Path) -> FormatFile:
    path = Path(path)
    if not path.exists():
        raise DashboardError(f"Format file not found: {path}")
    try:
        data = json.loads(read_text_file(path))
    except json.JSONDecodeError as exc:
        raise DashboardError(f"Format file {path.name} is not valid JSON: {exc.msg} at line {exc.lineno}.") from None
    except RecursionError:
        raise DashboardError(f"Format file {path.name} nests JSON too deeply to read.") from None
    if not isinstance(data, dict) or not data:
        raise DashboardError(
            f"Format file {path.name} must be a JSON object mapping field lists such as \"instruction,output\" "
            f"to templates.")
    entries = []
    for key, template in data.items():
        if not isinstance(template, str):
            raise DashboardError(f"Format file {path.name}: the template for {key!r} must be a string.")
        field_set = frozenset(part.strip() for part in key.split(",") if part.strip())
        if not field_set:
            raise DashboardError(f"Format file {path.name}: the key {key!r} lists no fields.")
        unknown = sorted(set(_FIELD_RE.findall(template)) - field_set)
        if unknown:
            raise DashboardError(
                f"Format file {path.name}: the template for {key!r} uses "
                f"{', '.join('%' + u + '%' for u in unknown)}, which its key does not list.")
        entries.append((field_set, key, template))
    return FormatFile(entries)


def render(template: str, row: dict) -> str:
    return render_parts(template, row)[0]


def render_parts(template: str, row: dict) -> tuple[str, list[tuple[int, int]]]:
    """The template with `%field%` replaced by the row's values (in one pass: a value's own `%x%` stays),
    and the character ranges of the result that come from the template's own text."""
    pieces: list[str] = []
    literal: list[tuple[int, int]] = []
    at = pos = 0
    for match in _FIELD_RE.finditer(template):
        text = template[pos:match.start()]
        value = row.get(match.group(1))
        value = value if isinstance(value, str) else match.group(0)
        pieces += [text, value]
        literal.append((at, at + len(text)))
        at += len(text) + len(value)
        pos = match.end()
    pieces.append(template[pos:])
    literal.append((at, at + len(template) - pos))
    return "".join(pieces), literal


def find_marker_end(text: str, marker: str, literal: list[tuple[int, int]] | None = None) -> int | None:
    """Where the trained part starts: just after the first `marker` that begins in the format template's own
    text (so an "Assistant:" inside a user's question does not unmask the rest of the prompt); failing
    that, after the first `marker` anywhere; None when the text does not contain it."""
    first = text.find(marker)
    if first < 0:
        return None
    at = first
    while literal and at >= 0:
        if any(a <= at < b for a, b in literal):
            return at + len(marker)
        at = text.find(marker, at + 1)
    return first + len(marker)
