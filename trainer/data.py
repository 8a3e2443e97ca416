"""From the user's files to the exact samples the trainer trains on.

`build_samples(params, tokenizer)` is the one function both `python -m trainer preview` and the trainer
call, so the preview is what gets trained. Raw text is cut into overlapping token chunks; JSON/JSONL
rows are rendered through a format file (or the tokenizer's chat template for `messages` rows) and
masked so that only the answer part counts in the loss when `train_only_after` is set.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DashboardError
from .home import resolve_user_path

IGNORE_INDEX = -100
MAX_DATASET_BYTES = 2 * 1024**3


@dataclass
class Sample:
    text: str
    input_ids: list[int]
    label_mask: list[int]  # 1: the token is trained (counts in the loss); 0: context only
    source: str
    overlap: int = 0  # raw text: tokens shared with the previous chunk of the same block
    truncated: bool = False

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(self.label_mask)

    def labels(self) -> list[int]:
        return [t if m else IGNORE_INDEX for t, m in zip(self.input_ids, self.label_mask)]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["n_tokens"] = self.n_tokens
        data["n_trained"] = self.n_trained
        return data


@dataclass
class Problem:
    """A row or block that is not trained, and why."""

    where: str  # "row 12" / "block 3 (guide.txt)"
    reason: str
    index: int
    fields: list[str] = field(default_factory=list)


@dataclass
class Preview:
    kind: str  # "raw" or "formatted"
    samples: list[Sample]
    problems: list[Problem]
    stats: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "stats": self.stats,
            "problems": [asdict(p) for p in self.problems],
            "samples": [s.to_json() for s in self.samples],
        }


# ---------------------------------------------------------------------------------------------
# Reading files


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


def natural_key(name: str) -> list:
    """Sort key so that part2 comes before part10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def raw_text_files(path: Path) -> list[Path]:
    """A .txt file, or every .txt file of a folder in natural order."""
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file()),
                       key=lambda p: natural_key(p.name))
        if not files:
            raise DashboardError(f"The folder {path.name} holds no .txt files.")
        return files
    if not path.exists():
        raise DashboardError(f"Raw text file not found: {path}")
    return [path]


def load_rows(path: Path) -> list[Any]:
    """Rows of a .json file (a list of objects) or a .jsonl file (one object per line)."""
    path = Path(path)
    text = read_text_file(path)
    if path.suffix.lower() == ".jsonl":
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
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DashboardError(
                f"{path.name} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.") from None
        except RecursionError:
            raise DashboardError(f"{path.name} nests JSON too deeply to read.") from None
        if not isinstance(rows, list):
            raise DashboardError(f"{path.name} must hold a JSON list of objects; it holds a {type(rows).__name__}.")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DashboardError(
                f"{path.name}: row {index} is {_a(type(row).__name__)}, not an object; a dataset is a list of objects.")
    if not rows:
        raise DashboardError(f"{path.name} holds no rows.")
    return rows


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


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


# ---------------------------------------------------------------------------------------------
# Raw text


def chunk_spans(line_starts: np.ndarray, char_pos: np.ndarray, n_tokens: int, budget: int, overlap: int,
                newline_favor_len: int) -> list[tuple[int, int]]:
    """Token spans [start, end) covering 0..n_tokens, each at most `budget` long.

    `line_starts` is the sorted array of token indices that begin a line (0 and n_tokens included);
    `char_pos[b]` is the character offset of token boundary b. A cut moves back to a line start lying
    within `newline_favor_len` characters, and the next chunk starts `overlap` tokens before the cut,
    moved to a nearby line start too. Every token is in at least one span: nothing is thrown away.
    Both ends move forward from span to span, so each span brings tokens the previous one did not hold
    (a span never lies inside the previous one), and with `overlap > 0` consecutive spans share tokens.
    """
    if n_tokens == 0:
        return []
    spans = []
    start = 0
    previous_end = 0
    while True:
        end = min(start + budget, n_tokens)
        if end < n_tokens and newline_favor_len > 0:
            # The latest line start in (start + overlap, end] close enough to the planned cut, and past
            # the previous cut (a start moved back to a line start may lie more than `overlap` before it).
            i = np.searchsorted(line_starts, end, side="right") - 1
            if i >= 0:
                candidate = int(line_starts[i])
                if (candidate > max(start + overlap, previous_end)
                        and char_pos[end] - char_pos[candidate] <= newline_favor_len):
                    end = candidate
        spans.append((start, end))
        if end >= n_tokens:
            return spans
        next_start = end - overlap
        if overlap > 0 and newline_favor_len > 0:
            # The line start nearest the planned start, strictly inside (start, end) so we progress
            # and keep some overlap.
            i = np.searchsorted(line_starts, next_start)
            best = None
            for j in (i - 1, i):
                if 0 <= j < len(line_starts):
                    candidate = int(line_starts[j])
                    distance = abs(int(char_pos[candidate]) - int(char_pos[next_start]))
                    if start < candidate < end and distance <= newline_favor_len:
                        if best is None or distance < best[0]:
                            best = (distance, candidate)
            if best is not None:
                next_start = best[1]
        previous_end = end
        start = max(next_start, start + 1)


def _line_start_tokens(text: str, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token boundaries that begin a line, and the character offset of every boundary."""
    n = len(offsets)
    char_pos = np.empty(n + 1, dtype=np.int64)
    char_pos[:n] = offsets[:, 0] if n else 0
    char_pos[n] = len(text)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    after_newline = np.zeros(len(text) + 1, dtype=bool)
    after_newline[1:] = codes == 10
    is_start = after_newline[char_pos]
    # A byte-level tokenizer splits an emoji or a CJK character into several tokens that all carry the
    # character's offsets: a boundary inside a character (the previous token ends after this one
    # starts) is no line start, even right after a newline.
    if n > 1:
        is_start[1:n] &= offsets[:-1, 1] <= offsets[1:, 0]
    is_start[0] = True
    is_start[n] = True
    return np.flatnonzero(is_start), char_pos


def encode_with_offsets(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and character offsets of each text, without special tokens.

    A fast (Rust) tokenizer is asked directly: its encodings already hold both, and going through
    `tokenizer(..., return_offsets_mapping=True)` costs about a third more on large texts, converting every
    encoding into Python dictionaries first. The direct call is used only when the backend would not
    truncate or pad; otherwise (or for a slow tokenizer) the ordinary call gives the same lists.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not texts:
        return [], []
    if backend is not None and backend.truncation is None and backend.padding is None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], encoded["offset_mapping"]


ENCODE_BATCH_TEXTS = 1000


def encode_ahead(tokenizer, texts: list[str], batch: int = ENCODE_BATCH_TEXTS):
    """Yield (ids, offsets) for each text, tokenising the next batch of texts in a background thread while
    the caller works on the current one: the Rust tokenizer runs without Python's lock, so the chunking
    of one batch overlaps the tokenisation of the next (a large text's preview then costs little more
    than its tokenisation)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(texts) <= batch:
        yield from zip(*encode_with_offsets(tokenizer, texts))
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenise") as pool:
        pending = pool.submit(encode_with_offsets, tokenizer, texts[:batch])
        for start in range(batch, len(texts) + batch, batch):
            ids, offsets = pending.result()
            if start < len(texts):
                pending = pool.submit(encode_with_offsets, tokenizer, texts[start:start + batch])
            yield from zip(ids, offsets)


@contextlib.contextmanager
def collector_paused():
    """Pause Python's cyclic garbage collector: building millions of small lists (the samples of a large
    text) otherwise sets it off again and again, scanning them all each time, for nothing to collect."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_raw_samples(params, tokenizer) -> Preview:
    # The options are checked before any file is read or tokenised.
    bos = [tokenizer.bos_token_id] if params.add_bos_token and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if params.add_eos_token and tokenizer.eos_token_id is not None else []
    budget = params.cutoff_len - len(bos) - len(eos)
    if params.overlap_len >= budget:
        raise DashboardError(
            f"Overlap length ({params.overlap_len}) must be below the cutoff length minus the BOS/EOS tokens "
            f"({budget}).", field="overlap_len")
    files = raw_text_files(resolve_user_path(params.raw_text_file, "dataset"))
    # The text's line ends became \n, so a hard cut typed with \r\n or \r (Windows habits) must too.
    hard_cut = params.hard_cut.replace("\r\n", "\n").replace("\r", "\n")
    blocks: list[tuple[str, str]] = []  # (text, file name)
    for file in files:
        text = read_text_file(file)
        parts = text.split(hard_cut) if hard_cut else [text]
        blocks.extend((part.strip(), file.name) for part in parts)

    problems, kept = [], []
    for index, (text, name) in enumerate(blocks):
        if len(text) <= params.min_chars:
            reason = "empty" if not text else f"only {len(text)} characters (minimum block size {params.min_chars})"
            problems.append(Problem(f"block {index} ({name})", f"dropped: {reason}", index))
        else:
            kept.append((index, text, name))
    if not kept:
        raise DashboardError(
            "No text left to train on: every block is empty or shorter than the minimum block size "
            f"({len(blocks)} block{'s' if len(blocks) != 1 else ''} after cutting at the hard cut string).")

    samples = []
    for (index, text, name), (ids, offsets) in zip(kept, encode_ahead(tokenizer, [t for _, t, _ in kept])):
        # fromiter over the flattened pairs: several times faster than np.asarray on a list of tuples.
        offsets = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets))
        offsets = offsets.reshape(-1, 2)
        line_starts, char_pos = _line_start_tokens(text, offsets)
        spans = chunk_spans(line_starts, char_pos, len(ids), budget, params.overlap_len, params.newline_favor_len)
        previous_end = None
        for number, (start, end) in enumerate(spans):
            last = end == len(ids)
            chunk_ids = bos + ids[start:end] + (eos if last else [])
            overlap = max(0, previous_end - start) if previous_end is not None else 0
            text_start = int(char_pos[start])
            text_end = int(char_pos[end])
            samples.append(Sample(
                text=text[text_start:text_end],
                input_ids=chunk_ids,
                label_mask=[0] * len(bos) + [1] * (len(chunk_ids) - len(bos)),
                source=f"block {index} ({name}) chunk {number}",
                overlap=overlap,
            ))
            previous_end = end
    stats = _stats(samples, params.cutoff_len)
    stats.update(blocks=len(blocks), kept_blocks=len(kept), dropped_blocks=len(blocks) - len(kept),
                 files=len(files))
    return Preview("raw", samples, problems, stats)


# ---------------------------------------------------------------------------------------------
# Formatted data


def _chat_text_and_spans(tokenizer, messages: list) -> tuple[str, list[tuple[int, int]]]:
    """A chat rendered with the tokenizer's template, and the character spans of assistant replies."""
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError("each message needs a string 'role' and 'content'")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if i:
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        else:
            # A chat that opens with the assistant: the template may still put a system prompt and the
            # assistant header first, which are not the reply. The reply starts at its content.
            at = upto.rfind(message["content"]) if message["content"] else -1
            before = upto[:at] if at >= 0 else None
        if before is not None and full.startswith(upto) and upto.startswith(before):
            spans.append((len(before), len(upto)))
    if not spans:
        raise ValueError("no assistant message to learn from")
    return full, spans


def build_formatted_samples(params, tokenizer, dataset: str | None = None) -> Preview:
    dataset_path = resolve_user_path(dataset or params.dataset, "dataset")
    if not dataset_path.exists():
        raise DashboardError(f"Dataset not found: {dataset_path}", field="dataset")
    rows = load_rows(dataset_path)
    fmt = load_format(resolve_user_path(params.format, "format")) if params.format else None

    problems: list[Problem] = []
    texts: list[str] = []
    trained_spans: list[list[tuple[int, int]]] = []
    sources: list[str] = []
    matched_keys: dict[str, int] = {}
    after = params.train_only_after
    for index, row in enumerate(rows):
        if "messages" in row and isinstance(row["messages"], list):
            try:
                text, spans = _chat_text_and_spans(tokenizer, row["messages"])
            except ValueError as exc:
                problems.append(Problem(f"row {index}", f"chat row not used: {exc}", index, sorted(row)))
                continue
            key = "messages (chat template)"
        else:
            match = fmt.match(row) if fmt else None
            if match is None:
                fields = sorted(row_fields(row))
                reason = ("no format file chosen" if fmt is None
                          else f"no key of the format file matches its fields {{{', '.join(fields)}}}")
                problems.append(Problem(f"row {index}", f"unmatched: {reason}", index, fields))
                continue
            key, template = match
            text, literal = render_parts(template, row)
            spans = [(0, len(text))]
            if after:
                at = find_marker_end(text, after, literal)
                if at is None:
                    problems.append(Problem(f"row {index}", f"dropped: does not contain the train-only-after "
                                                            f"string {after!r}", index, sorted(row_fields(row))))
                    continue
                spans = [(at, len(text))]
        matched_keys[key] = matched_keys.get(key, 0) + 1
        texts.append(text)
        trained_spans.append(spans)
        sources.append(f"row {index}")

    bos = [tokenizer.bos_token_id] if params.add_bos_token and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if params.add_eos_token and tokenizer.eos_token_id is not None else []
    budget = params.cutoff_len - len(bos) - len(eos)
    samples: list[Sample] = []
    truncated = dropped_long = 0
    all_ids, all_offsets = encode_with_offsets(tokenizer, texts)
    for text, spans, source, ids, offsets in zip(texts, trained_spans, sources, all_ids, all_offsets):
        mask = [1 if any(a <= start < b for a, b in spans) else 0 for start, _ in offsets]
        is_truncated = len(ids) > budget
        if is_truncated:
            if params.overlong_samples == "drop":
                dropped_long += 1
                index = int(source.split()[1])
                problems.append(Problem(source, f"dropped: {len(ids) + len(bos) + len(eos)} tokens, over the cutoff "
                                                f"length {params.cutoff_len}", index))
                continue
            # Truncated text has no end, so it gets no EOS: the model must not learn to stop mid-sentence.
            ids, mask, offsets = ids[: budget + len(eos)], mask[: budget + len(eos)], offsets[: budget + len(eos)]
            truncated += 1
            ending = []
        else:
            ending = eos
        if not any(mask) and not ending:
            index = int(source.split()[1])
            problems.append(Problem(source, "dropped: no trained tokens left after truncation", index))
            continue
        end_char = offsets[-1][1] if offsets else 0
        samples.append(Sample(
            text=text[:end_char] if is_truncated else text,
            input_ids=bos + list(ids) + ending,
            label_mask=[0] * len(bos) + mask + [1] * len(ending),
            source=source,
            truncated=is_truncated,
        ))
    # No sample at all is not an error here: the preview lists every problem row; a run refuses to start.
    stats = _stats(samples, params.cutoff_len)
    stats.update(rows=len(rows), unmatched_rows=sum(p.reason.startswith("unmatched") for p in problems),
                 chat_rows_skipped=sum(p.reason.startswith("chat row") for p in problems),
                 truncated_samples=truncated, dropped_overlong=dropped_long, matched_keys=matched_keys)
    return Preview("formatted", samples, sorted(problems, key=lambda p: p.index), stats)


def _stats(samples: list[Sample], cutoff_len: int) -> dict[str, Any]:
    lengths = np.array([s.n_tokens for s in samples], dtype=np.int64)
    trained = int(sum(s.n_trained for s in samples))
    return {
        "samples": len(samples),
        "tokens": int(lengths.sum()),
        "trained_tokens": int(trained),
        "mean_tokens": float(lengths.mean()) if len(lengths) else 0.0,
        "max_tokens": int(lengths.max()) if len(lengths) else 0,
        "min_tokens": int(lengths.min()) if len(lengths) else 0,
        "cutoff_len": cutoff_len,
        "at_cutoff": int((lengths >= cutoff_len).sum()),
    }


def build_samples(params, tokenizer, dataset: str | None = None) -> Preview:
    """The samples the trainer trains on for these data options (see module docstring).

    With `dataset` given, that formatted dataset is used instead of params.dataset (the eval set).
    """
    with collector_paused():
        if dataset is None and params.is_raw_text:
            return build_raw_samples(params, tokenizer)
        if not (dataset or params.dataset):
            raise DashboardError("Choose a dataset or a raw text file.", field="dataset")
        path = resolve_user_path(dataset or params.dataset, "dataset")
        if path.suffix.lower() == ".txt" or path.is_dir():
            raw = type(params).from_dict({**params.to_dict(), "raw_text_file": str(path), "dataset": ""})
            return build_raw_samples(raw, tokenizer)
        return build_formatted_samples(params, tokenizer, dataset)


def no_samples_error(preview: Preview) -> DashboardError | None:
    """The error a run raises when nothing is left to train on."""
    if preview.samples:
        return None
    first = preview.problems[0].reason if preview.problems else "none"
    return DashboardError(f"No sample to train on: every row was unmatched or dropped (first reason: {first}).")


def unmatched_rows_error(preview: Preview) -> DashboardError | None:
    """The error a run raises before starting while rows are unmatched (unless skip_unmatched_rows)."""
    unmatched = [p for p in preview.problems if p.reason.startswith("unmatched")]
    if not unmatched:
        return None
    shown = ", ".join(f"{p.index} {{{', '.join(p.fields)}}}" for p in unmatched[:10])
    more = f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""
    return DashboardError(
        f"{len(unmatched)} rows match no key of the format file (rows {shown}{more}). Fix the format file or the "
        f"rows, or tick 'skip unmatched rows' to train without them.", field="skip_unmatched_rows")
