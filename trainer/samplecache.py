"""Samples prepared once per content: a run, a resumed run or a second run on the same data reuses them.

The cache key is a SHA-256 over everything that shapes the samples: the bytes of every input file (the
raw text files, or the dataset, its format file and the chosen instruction template), the data options,
and the tokenizer's whole
definition (vocabulary, merges, normaliser, added tokens, chat template). Change any byte of any of them
and the samples are built afresh; nothing is keyed on file names or modification times.

An entry is `HOME/cache/samples/KEY.npz`: the token ids and label masks as flat integer arrays, the texts
and the rest as JSON, read back with `allow_pickle=False`. A damaged or unreadable entry is rebuilt.
The newest MAX_ENTRIES entries are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .data import Preview, Problem, Sample, build_samples
from .datafiles import dataset_kind, raw_text_files
from .home import home_dir, resolve_user_path
from .params import SAMPLE_OPTIONS
from .storage import write_bytes_atomic

CACHE_VERSION = 3  # raise when build_samples changes what it makes from the same inputs
MAX_ENTRIES = 20


def cache_dir() -> Path:
    return home_dir() / "cache" / "samples"


def input_files(params, dataset: str | None = None) -> list[Path]:
    """The files whose bytes the samples come from (raises DashboardError as build_samples would)."""
    if dataset is None and params.is_raw_text:
        return raw_text_files(resolve_user_path(params.raw_text_file, "dataset"))
    path = resolve_user_path(dataset or params.dataset, "dataset")
    if dataset_kind(path) == "raw":
        return raw_text_files(path)
    files = [path] + ([resolve_user_path(params.format, "format")] if params.format else [])
    template = params.chat_template
    if template:
        from .chattemplates import instruction_template_path

        files.append(instruction_template_path(template))
    return files


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A digest of the tokenizer's full definition, or None when it cannot be read (then nothing is cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256(backend.to_str().encode("utf-8"))
    extra = {"class": type(tokenizer).__name__, "chat_template": getattr(tokenizer, "chat_template", None),
             "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()


def samples_key(params, tokenizer, dataset: str | None = None) -> str | None:
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        return None
    digest = hashlib.sha256()
    options = {name: getattr(params, name) for name in SAMPLE_OPTIONS}
    digest.update(json.dumps({"version": CACHE_VERSION, "options": options, "eval_dataset": dataset,
                              "tokenizer": fingerprint}, sort_keys=True).encode("utf-8"))
    for path in input_files(params, dataset):
        digest.update(f"\0{path.name}\0".encode("utf-8"))
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def save_preview(path: Path, preview: Preview) -> None:
    samples = preview.samples
    lengths = np.array([s.n_tokens for s in samples], dtype=np.int64)
    meta = {"kind": preview.kind, "shape": preview.shape, "stats": preview.stats,
            "problems": [asdict(p) for p in preview.problems],
            "texts": [s.text for s in samples], "sources": [s.source for s in samples]}
    buffer = io.BytesIO()
    np.savez(buffer, lengths=lengths,
             input_ids=np.fromiter((t for s in samples for t in s.input_ids), dtype=np.int64, count=int(lengths.sum())),
             label_mask=np.fromiter((m for s in samples for m in s.label_mask), dtype=np.int8, count=int(lengths.sum())),
             overlap=np.array([s.overlap for s in samples], dtype=np.int64),
             truncated=np.array([s.truncated for s in samples], dtype=np.bool_),
             meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))
    write_bytes_atomic(path, buffer.getvalue())


def load_preview(path: Path) -> Preview:
    with np.load(path, allow_pickle=False) as stored:
        meta = json.loads(stored["meta"].tobytes().decode("utf-8"))
        lengths = stored["lengths"]
        ids = stored["input_ids"].tolist()
        masks = stored["label_mask"].tolist()
        overlaps = stored["overlap"].tolist()
        truncated = stored["truncated"].tolist()
    if not (len(meta["texts"]) == len(meta["sources"]) == len(lengths) == len(overlaps) == len(truncated)) \
            or len(ids) != int(lengths.sum()) or len(masks) != len(ids):
        raise ValueError("inconsistent cache entry")
    samples, at = [], 0
    for i, n in enumerate(lengths.tolist()):
        samples.append(Sample(text=meta["texts"][i], input_ids=ids[at:at + n], label_mask=masks[at:at + n],
                              source=meta["sources"][i], overlap=overlaps[i], truncated=truncated[i]))
        at += n
    return Preview(meta["kind"], samples, [Problem(**p) for p in meta["problems"]], meta["stats"], meta["shape"])


def cached_build_samples(params, tokenizer, dataset: str | None = None) -> tuple[Preview, bool]:
    """`build_samples(params, tokenizer, dataset)`, read from the cache when the same content was built
    before. Returns the preview and whether it came from the cache."""
    key = samples_key(params, tokenizer, dataset)
    if key is None:
        return build_samples(params, tokenizer, dataset), False
    folder = cache_dir()
    entry = folder / f"{key}.npz"
    if entry.exists():
        try:
            preview = load_preview(entry)
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
            with contextlib.suppress(OSError):  # a read-only home keeps it; it is built afresh below anyway
                entry.unlink(missing_ok=True)  # damaged
        else:
            with contextlib.suppress(OSError):  # a read-only home reads the cache all the same
                os.utime(entry)  # recently used: kept longest
            return preview, True
    preview = build_samples(params, tokenizer, dataset)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_preview(entry, preview)
        _prune(folder)
    except (OSError, TypeError, ValueError):
        pass  # a full or read-only disk (or an unexpected value) costs only the cache, never the run
    return preview, False


def _prune(folder: Path) -> None:
    entries = sorted((p for p in folder.glob("*.npz") if not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[MAX_ENTRIES:]:
        old.unlink(missing_ok=True)
