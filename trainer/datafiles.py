"""The user's data files: which files are datasets, and reading them (text, rows, tables, format files).

One rule decides what a dataset is, by its ending (`dataset_kind`): a `.txt` or `.md` file or a folder of
them is raw text; a `.json` list, `.jsonl` rows or a `.csv`, `.tsv` or `.parquet` table is rows (formatted
data: records for a format file, chat rows, prompt/completion or text rows, see trainer/shapes.py). The Data
page's lists and its uploader, the Train page's pickers, build_samples (the preview on the command line and
the trainer) and the sample cache all follow it. Datasets are found in the home's datasets/ and in a webui's
training/datasets/. Uploads are checked by the preview's own readers before they are written (into datasets/ or
formats/), and deletes stay inside the home, never touching a shipped format file. FORMATS.md documents the
files themselves.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from natsort import natsorted, ns

from .errors import DashboardError
from .home import (CODE_ROOT, DATASET_ENDINGS, RAW_TEXT_ENDINGS, ROWS_ENDINGS, TABLE_ENDINGS, check_name,
                   datasets_dir, datasets_dirs, formats_dirs, home_dir, resolve_inside)
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


# ---- uploads and deletes ---------------------------------------------------------------------------
# The folders of the home an upload goes into, and what each one takes.
UPLOAD_FOLDERS = {"datasets": DATASET_ENDINGS, "formats": (".json",)}
# The format files this project ships (in the checkout's formats/): never replaced or deleted from a page.
SHIPPED_FORMATS = frozenset({"alpaca-chatbot-format", "alpaca-format", "chatml-format", "vicuna-format"})


def upload_path(name: str, folder: str = "datasets") -> Path:
    """Where an upload named `name` goes in the home's `folder` ("datasets" or "formats"): a checked name with
    an ending that folder takes, inside it (links followed). Raises DashboardError saying what to change."""
    name = check_name(name, "file name")
    endings = UPLOAD_FOLDERS[folder]
    if not name.lower().endswith(endings):
        listed = ", ".join(endings[:-1]) + f" or {endings[-1]}" if len(endings) > 1 else endings[0]
        what = "A format file" if folder == "formats" else "A dataset"
        raise DashboardError(f"{what} must end in {listed}; {name} does not.")
    target = resolve_inside(home_dir() / folder, name, "file name")
    if target.is_dir():
        raise DashboardError(f"{folder}/{name} is a folder; choose another name.")
    if folder == "formats" and target.parent == (CODE_ROOT / "formats").resolve() and target.stem in SHIPPED_FORMATS:
        raise DashboardError(f"formats/{name} is a format file shipped with the dashboard; save yours under another "
                             f"name.")
    return target


def upload_folder_for(name: str, data: bytes) -> str:
    """The folder an upload most likely belongs in: "formats" for a .json file holding one JSON object (a
    format file maps field lists to templates; a dataset is a list of rows), else "datasets"."""
    return "formats" if name.lower().endswith(".json") and data[:4096].lstrip()[:1] == b"{" else "datasets"


def check_upload(name: str, data: bytes, folder: str = "datasets") -> None:
    """Refuse an upload the preview would refuse, with the preview's own sentence: the bytes are read from a
    temporary copy (never from datasets/ or formats/) by the readers the preview uses: a format file by
    load_format, raw text by read_text_file (and refused when it holds no text), rows by load_rows."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lora-upload-") as scratch:
        path = Path(scratch) / name
        path.write_bytes(data)
        try:
            if folder == "formats":
                load_format(path)
            elif kind_by_ending(name) == "raw":
                from .params import TrainingParameters

                text, hard_cut = read_text_file(path), TrainingParameters().hard_cut
                if not text.strip():
                    raise no_text_error(len(text.split(hard_cut)))
            else:
                load_rows(path)
        except DashboardError as exc:  # a reader that names the whole path names the file the person chose
            raise DashboardError(exc.message.replace(str(path), str(home_dir() / folder / name)), exc.field) \
                from None


def no_text_error(blocks: int) -> DashboardError:
    """The error for raw text whose every block is empty or under the minimum block size."""
    return DashboardError(
        "No text left to train on: every block is empty or shorter than the minimum block size "
        f"({blocks} block{'s' if blocks != 1 else ''} after cutting at the hard cut string).")


def save_upload(name: str, data: bytes, folder: str = "datasets", replace: bool = False) -> Path:
    """Write uploaded bytes into the home's datasets/ or formats/ after `check_upload`; an existing file is
    replaced only with `replace`, a shipped format file never. Returns the file written."""
    target = upload_path(name, folder)
    name = target.name
    if target.exists() and not replace:
        raise DashboardError(f"{folder}/{name} already exists; tick 'Replace the existing file' or rename it.")
    check_upload(name, data, folder)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, data)
    except OSError as exc:
        raise DashboardError(f"Cannot write into {folder}/: {exc.strerror or exc}. Is the home folder writable?") \
            from None
    return target


def save_dataset(name: str, data: bytes, replace: bool = False) -> Path:
    """An upload into datasets/ (see save_upload)."""
    return save_upload(name, data, "datasets", replace)


def save_format(name: str, data: bytes, replace: bool = False) -> Path:
    """An upload into formats/ (see save_upload)."""
    return save_upload(name, data, "formats", replace)


def _inside_home(entry: Path, what: str) -> str:
    """`entry`'s place in the home ("datasets/notes.txt"), its folder's links followed; raises when that folder
    lies outside the home (a link elsewhere, or the checkout's shipped files under another home)."""
    home = home_dir().resolve()
    folder = entry.parent.resolve()
    if folder != home and home not in folder.parents:
        raise DashboardError(f"The {what} {entry.name} lies outside the home folder {home} (its folder is "
                             f"{folder}); it is not deleted from here.")
    return str((folder / entry.name).relative_to(home))


def _dataset_entry(name: str) -> Path:
    if name not in dataset_names():
        raise DashboardError(f"There is no dataset {name!r} in datasets/ or training/datasets/ to delete.")
    name = check_name(name, "dataset")
    return next(folder / name for folder in datasets_dirs() if os.path.lexists(folder / name))  # as listed


def _format_entry(name: str) -> Path:
    if name not in format_names():
        raise DashboardError(f"There is no format file {name!r} in formats/ or training/formats/ to delete.")
    name = check_name(name, "format")
    entry = next(folder / f"{name}.json" for folder in formats_dirs() if os.path.lexists(folder / f"{name}.json"))
    if entry.parent.resolve() == (CODE_ROOT / "formats").resolve() and name in SHIPPED_FORMATS:
        raise DashboardError(f"The format file {name}.json is shipped with the dashboard; it is not deleted.")
    return entry


def deletable_files() -> dict[str, tuple[str, str]]:
    """What the Data page may delete, by its place in the home ("datasets/notes.txt", "formats/qa.json"):
    (kind, name) of each dataset and format file a name resolves to, inside the home, not shipped."""
    found = {}
    for kind, names, entry_of in (("dataset", dataset_names(), _dataset_entry),
                                  ("format", format_names(), _format_entry)):
        for name in names:
            try:
                found[_inside_home(entry_of(name), kind)] = (kind, name)
            except DashboardError:
                continue
    return found


def delete_dataset(name: str) -> str:
    """Delete the dataset `name` (a file, a folder of text files, or a link: only the link) from the home's
    datasets/ or training/datasets/. Returns its place in the home."""
    entry = _dataset_entry(name)
    place = _inside_home(entry, "dataset")
    _remove(entry)
    return place


def delete_format(name: str) -> str:
    """Delete the format file `name` (without .json) from the home's formats/ or training/formats/; a shipped
    one never. Returns its place in the home."""
    entry = _format_entry(name)
    place = _inside_home(entry, "format file")
    _remove(entry)
    return place


def delete_file(place: str) -> str:
    """Delete what `deletable_files` lists under `place`."""
    listed = deletable_files().get(place)
    if listed is None:
        raise DashboardError(f"{place} is not something the Data page can delete (it is gone, shipped with the "
                             f"dashboard or outside the home folder).")
    kind, name = listed
    return delete_dataset(name) if kind == "dataset" else delete_format(name)


def _remove(entry: Path) -> None:
    """Remove a file or a link (never what it points to), or a folder: renamed to a hidden name first, so a
    delete cut short leaves no half dataset listed."""
    import shutil

    try:
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink()
            return
        hidden = entry.with_name(f".{entry.name}.deleting")
        shutil.rmtree(hidden, ignore_errors=True)  # left by a delete cut short
        entry.rename(hidden)
        shutil.rmtree(hidden)
    except OSError as exc:
        raise DashboardError(f"Cannot delete {entry.name}: {exc.strerror or exc}. Is the home folder writable?") \
            from None


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
