"""From the user's files to the exact samples the trainer trains on.

`build_samples(params, tokenizer)` is the one function both `python -m trainer preview` and the trainer
call (through the sample cache, trainer/samplecache.py), so the preview is what gets trained. Raw text is
cut into overlapping token chunks (trainer/chunking.py); JSON/JSONL rows are rendered through a format file
(trainer/datafiles.py) or the tokenizer's chat template for `messages` rows, and masked so that only the
answer part counts in the loss when `train_only_after` is set.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .datafiles import FormatFile, dataset_kind, find_marker_end, load_format, load_rows, render_parts, row_fields
from .errors import DashboardError
from .home import resolve_user_path

IGNORE_INDEX = -100  # the label of a token that is not trained (PyTorch's cross-entropy ignores it)


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
# Tokenising


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


def special_tokens(params, tokenizer) -> tuple[list[int], list[int]]:
    """The BOS and EOS ids a sample gets ([] where the option is off or the tokenizer has no such token)."""
    bos = [tokenizer.bos_token_id] if params.add_bos_token and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if params.add_eos_token and tokenizer.eos_token_id is not None else []
    return bos, eos


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


def _room(params, bos: list[int], eos: list[int]) -> int:
    """Tokens of text a sample may hold: the cutoff minus its BOS and EOS."""
    return params.cutoff_len - len(bos) - len(eos)


def _row_text(row: dict, index: int, fmt: FormatFile | None, tokenizer, after: str):
    """A row as (matched key, text, trained character spans), or the Problem that keeps it out."""
    if "messages" in row and isinstance(row["messages"], list):
        try:
            text, spans = _chat_text_and_spans(tokenizer, row["messages"])
        except ValueError as exc:
            return Problem(f"row {index}", f"chat row not used: {exc}", index, sorted(row))
        return "messages (chat template)", text, spans
    match = fmt.match(row) if fmt else None
    if match is None:
        fields = sorted(row_fields(row))
        reason = ("no format file chosen" if fmt is None
                  else f"no key of the format file matches its fields {{{', '.join(fields)}}}")
        return Problem(f"row {index}", f"unmatched: {reason}", index, fields)
    key, template = match
    text, literal = render_parts(template, row)
    if not after:
        return key, text, [(0, len(text))]
    at = find_marker_end(text, after, literal)
    if at is None:
        return Problem(f"row {index}", f"dropped: does not contain the train-only-after string {after!r}", index,
                       sorted(row_fields(row)))
    return key, text, [(at, len(text))]


def _formatted_sample(text: str, spans, index: int, ids: list[int], offsets, params, bos: list[int],
                      eos: list[int]) -> Sample | Problem:
    """One rendered row as a sample: masked outside its trained spans, truncated or dropped over the cutoff."""
    source = f"row {index}"
    budget = _room(params, bos, eos)
    mask = [1 if any(a <= start < b for a, b in spans) else 0 for start, _ in offsets]
    is_truncated = len(ids) > budget
    ending = eos
    if is_truncated:
        if params.overlong_samples == "drop":
            return Problem(source, f"dropped: {len(ids) + len(bos) + len(eos)} tokens, over the cutoff "
                                   f"length {params.cutoff_len}", index)
        # Truncated text has no end, so it gets no EOS: the model must not learn to stop mid-sentence.
        ids, mask, offsets = ids[: budget + len(eos)], mask[: budget + len(eos)], offsets[: budget + len(eos)]
        ending = []
    if not any(mask) and not ending:
        return Problem(source, "dropped: no trained tokens left after truncation", index)
    end_char = offsets[-1][1] if offsets else 0
    return Sample(text=text[:end_char] if is_truncated else text, input_ids=bos + list(ids) + ending,
                  label_mask=[0] * len(bos) + mask + [1] * len(ending), source=source, truncated=is_truncated)


def build_formatted_samples(params, tokenizer, dataset: str | None = None) -> Preview:
    dataset_path = resolve_user_path(dataset or params.dataset, "dataset")
    if not dataset_path.exists():
        raise DashboardError(f"Dataset not found: {dataset_path}", field="dataset")
    rows = load_rows(dataset_path)
    fmt = load_format(resolve_user_path(params.format, "format")) if params.format else None

    problems: list[Problem] = []
    rendered: list[tuple[int, str, list]] = []  # (row index, text, trained spans)
    matched_keys: dict[str, int] = {}
    for index, row in enumerate(rows):
        result = _row_text(row, index, fmt, tokenizer, params.train_only_after)
        if isinstance(result, Problem):
            problems.append(result)
            continue
        key, text, spans = result
        matched_keys[key] = matched_keys.get(key, 0) + 1
        rendered.append((index, text, spans))

    bos, eos = special_tokens(params, tokenizer)
    samples: list[Sample] = []
    overlong = 0  # truncated, or dropped with overlong_samples "drop"
    all_ids, all_offsets = encode_with_offsets(tokenizer, [text for _, text, _ in rendered])
    for (index, text, spans), ids, offsets in zip(rendered, all_ids, all_offsets):
        overlong += len(ids) > _room(params, bos, eos)
        result = _formatted_sample(text, spans, index, ids, offsets, params, bos, eos)
        (problems if isinstance(result, Problem) else samples).append(result)
    # No sample at all is not an error here: the preview lists every problem row; a run refuses to start.
    stats = sample_stats(samples, params.cutoff_len)
    stats.update(rows=len(rows), unmatched_rows=sum(p.reason.startswith("unmatched") for p in problems),
                 chat_rows_skipped=sum(p.reason.startswith("chat row") for p in problems),
                 truncated_samples=0 if params.overlong_samples == "drop" else overlong,
                 dropped_overlong=overlong if params.overlong_samples == "drop" else 0,
                 matched_keys=matched_keys)
    return Preview("formatted", samples, sorted(problems, key=lambda p: p.index), stats)


def sample_stats(samples: list[Sample], cutoff_len: int) -> dict[str, Any]:
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

    With `dataset` given, that dataset is used instead of params.dataset (the eval set).
    """
    from .chunking import build_raw_samples  # chunking builds on this module's sample types

    with collector_paused():
        if dataset is None and params.is_raw_text:
            return build_raw_samples(params, tokenizer)
        if not (dataset or params.dataset):
            raise DashboardError("Choose a dataset or a raw text file.", field="dataset")
        path = resolve_user_path(dataset or params.dataset, "dataset")
        if dataset_kind(path) == "raw":
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
