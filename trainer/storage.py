"""How every file of the dashboard is written and read safely: one place for each rule.

- `write_text_atomic` / `write_json_atomic` / `write_bytes_atomic`: a reader sees the old file or the new
  one, never a torn one (temp file in the same folder, fsync, rename);
- `append_jsonl` and `JsonlAppender`: one JSON line per record, flushed (and fsynced where asked);
- `iter_jsonl`: every complete line; a torn last line (a writer still writing, or killed mid-line) and a
  broken line are skipped;
- `rewrite_jsonl`: replace a JSONL file's records atomically;
- `named_lock`: an exclusive lock between processes and threads (filelock), usually on a hidden
  `.NAME.lock` file beside what it guards (`lock_beside`). Lock files are never removed: that races.

FORMATS.md documents the files themselves.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from filelock import FileLock


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def json_safe(value: Any) -> Any:
    """NaN and infinity are not JSON: a float that is not finite is written as the string "nan"/"inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write bytes so that a reader sees the old file or the new one, never a torn one (temp + fsync + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default)
    write_text_atomic(path, text)


def read_json(path: Path) -> dict | None:
    """A JSON object from disk, or None where it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def jsonl_line(record: dict) -> str:
    return json.dumps({k: json_safe(v) for k, v in record.items()}, ensure_ascii=False, default=_json_default) + "\n"


def append_jsonl(path: Path, record: dict, fsync: bool = True) -> None:
    """Append one record as one line (a single write, so concurrent appenders never interleave a line)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(jsonl_line(record))
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())


class JsonlAppender:
    """An open JSONL file that appends one flushed line per record (a reader sees every finished line)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._handle.write(jsonl_line(record))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def iter_jsonl(path: Path) -> Iterator[dict]:
    """Every complete JSON-object line; a torn last line or a broken line is skipped."""
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except OSError:
        return
    with handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # torn last line: still being written, or the writer died mid-line
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def rewrite_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Replace a JSONL file's content atomically."""
    write_text_atomic(path, "".join(jsonl_line(record) for record in records))


def lock_beside(guarded: Path) -> Path:
    """The usual lock file of a file or folder: a hidden `.NAME.lock` beside it."""
    guarded = Path(guarded)
    return guarded.parent / f".{guarded.name}.lock"


def named_lock(lock_file: Path) -> FileLock:
    """An exclusive lock held on `lock_file` (created with its folder when missing), between processes and
    threads. Use as a context manager; `lock_beside(path)` names the lock of a file or folder.
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: one Streamlit process serves several sessions in threads, and separate lock
    # objects on one file still exclude each other. preserve_lock_file: removing a lock file races with a
    # process that has just opened it (it would lock a file nobody else sees).
    return FileLock(str(lock_file), thread_local=False, preserve_lock_file=True)
