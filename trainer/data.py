"""From the user's files to the exact samples the trainer trains on.

`build_samples(params, tokenizer)` is the one function both `python -m trainer preview` and the trainer
call (through the sample cache, trainer/samplecache.py), so the preview is what gets trained. Raw text is
cut into overlapping token chunks (trainer/chunking.py). Rows (JSON, JSONL, tables) are recognised by shape
(trainer/shapes.py): records are rendered through a format file (trainer/datafiles.py) and masked so that
only the answer part counts in the loss when `train_only_after` is set; chat rows (`messages`, ShareGPT
`conversations`) are rendered with a chat template (trainer/chattemplates.py) and only assistant turns are
trained; prompt/completion rows train the completion; text rows are chunked as raw text
(trainer/textrows.py). The preview carries the sentence saying what was recognised.

End tokens: the EOS token (with *Add EOS token*) closes a sample whose trained text does not already end
with an end token; a template that closes its turns with the EOS token (ChatML's `<|im_end|>`) or another
end token gets none added, so no sample ends in two end tokens. A BOS token already at the start of the
rendered text is not added again.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .datafiles import dataset_kind, find_marker_end, load_format, load_rows, render_parts
from .errors import DashboardError
from .home import TABLE_ENDINGS, resolve_user_path
from .shapes import RowShape, Tally, Unmatched, describe, recognise

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
    kind: str  # "raw" (raw text, text rows) or "formatted"
    samples: list[Sample]
    problems: list[Problem]
    stats: dict[str, Any]
    shape: str = ""  # what was recognised and how it is read, as one sentence (trainer/shapes.py)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "shape": self.shape,
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


@dataclass
class _Rendered:
    index: int
    text: str
    spans: list[tuple[int, int]]  # trained character spans
    rule: str = "start"  # "start": a token starting in a span is trained; "overlap": one touching a span


def _render_row(shape: RowShape, row: dict, index: int, options: "_Options",
                tokenizer) -> tuple[str, _Rendered] | Problem:
    """A recognised row as (matched key, rendered text with its trained spans), or the Problem keeping it out."""
    from .chattemplates import render_chat, trained_turns

    if shape.messages is not None:
        turns = trained_turns(shape.messages, shape.first_trained, options.last_only)
        template = options.template(tokenizer)  # a broken template file raises for the whole dataset
        try:
            text, spans, rule = render_chat(tokenizer, template, shape.messages, turns)
        except ValueError as exc:
            return Problem(f"row {index}", f"chat row not used: {exc}", index, [])
        key = {"messages": "messages (chat template)", "sharegpt": "conversations (chat template)"}
        return key.get(shape.shape, "prompt/completion (chat template)"), _Rendered(index, text, spans, rule)
    if shape.shape == "prompt-completion":
        return "prompt/completion", _Rendered(index, shape.text, [(shape.prompt_len, len(shape.text))])
    text, literal = render_parts(shape.template, row)
    if not options.after:
        return shape.key, _Rendered(index, text, [(0, len(text))])
    at = find_marker_end(text, options.after, literal)
    if at is None:
        return Problem(f"row {index}", f"dropped: does not contain the train-only-after string {options.after!r}",
                       index, sorted(k for k, v in row.items() if isinstance(v, str) and v.strip()))
    return shape.key, _Rendered(index, text, [(at, len(text))])


def _mask(offsets, spans, rule: str) -> list[int]:
    if rule == "overlap":  # as transformers' assistant mask: a token touching a span is trained
        return [1 if any(start < b and end > a for a, b in spans) else 0 for start, end in offsets]
    return [1 if any(a <= start < b for a, b in spans) else 0 for start, _ in offsets]


def _end_of(row: _Rendered, ids: list[int], offsets, mask: list[int], closing: set[int]) -> str:
    """How the sample ends: "closed" (its trained text already ends with an end token: no EOS is added),
    "open" (the EOS token is added) or "continues" (the text goes on after its last trained span, as a chat
    ending with a user turn: an EOS there would be trained mid-chat, so none is added)."""
    if row.spans[-1][1] < len(row.text.rstrip()):
        return "continues"
    for i in range(len(ids) - 1, -1, -1):
        start, end = offsets[i]
        if mask[i] and (ids[i] in closing or row.text[start:end].strip()):
            return "closed" if ids[i] in closing else "open"
    return "open"


def _formatted_sample(row: _Rendered, ids: list[int], offsets, params, bos: list[int], eos: list[int],
                      closing: set[int]) -> tuple[Sample | Problem, str]:
    """One rendered row as a sample: masked outside its trained spans, truncated or dropped over the cutoff;
    and how it ends: "closed" by its own end token, "open" (EOS added), "continues", or "overlong"."""
    index, text = row.index, row.text
    source = f"row {index}"
    mask = _mask(offsets, row.spans, row.rule)
    if bos and ids[:1] == bos:
        bos = []  # the rendered text already starts with the BOS token
    end = _end_of(row, ids, offsets, mask, closing) if eos and ids else "open"
    ending = eos if end == "open" else []
    if len(ids) > params.cutoff_len - len(bos) - len(ending):
        if params.overlong_samples == "drop":
            return Problem(source, f"dropped: {len(ids) + len(bos) + len(ending)} tokens, over the cutoff "
                                   f"length {params.cutoff_len}", index), "overlong"
        # Truncated text has no end, so it gets no EOS: the model must not learn to stop mid-sentence.
        keep = params.cutoff_len - len(bos)
        ids, mask, end_char = ids[:keep], mask[:keep], offsets[keep - 1][1] if keep else 0
        if not any(mask):
            return Problem(source, "dropped: no trained tokens left after truncation", index), "overlong"
        return Sample(text=text[:end_char], input_ids=bos + list(ids), label_mask=[0] * len(bos) + mask,
                      source=source, truncated=True), "overlong"
    if not any(mask) and not ending:
        return Problem(source, "dropped: no trained tokens", index), end
    return Sample(text=text, input_ids=bos + list(ids) + ending, label_mask=[0] * len(bos) + mask + [1] * len(ending),
                  source=source), end


@dataclass
class _Options:
    """The choices rows are rendered with; the chat template is read only when a chat row needs it."""

    params: Any
    after: str = ""
    last_only: bool = False
    _template: Any = None

    def template(self, tokenizer):
        if self._template is None:
            from .chattemplates import chat_template_for

            self._template = chat_template_for(tokenizer, self.params.chat_template or "")
        return self._template


def _recognise_rows(rows: list, fmt, options: _Options, tokenizer):
    """Every row recognised and rendered: (tally, problems, rendered rows, text rows, matched keys)."""
    tally, problems, rendered, text_rows, matched = Tally(), [], [], [], {}
    for index, row in enumerate(rows):
        shape = recognise(row, fmt)
        tally.add(shape)
        if isinstance(shape, Unmatched):
            problems.append(Problem(f"row {index}", shape.reason, index, shape.fields))
            continue
        if shape.shape == "text":
            text_rows.append((index, shape.text))
            matched["text rows"] = matched.get("text rows", 0) + 1
            continue
        result = _render_row(shape, row, index, options, tokenizer)
        if isinstance(result, Problem):
            if result.reason.startswith("chat row"):
                result.fields = sorted(row)
                tally.chat_broken += 1
            problems.append(result)
            continue
        matched[result[0]] = matched.get(result[0], 0) + 1
        rendered.append(result[1])
    return tally, problems, rendered, text_rows, matched


def build_formatted_samples(params, tokenizer, dataset: str | None = None) -> Preview:
    from .chattemplates import closing_ids

    dataset_path = resolve_user_path(dataset or params.dataset, "dataset")
    if not dataset_path.exists():
        raise DashboardError(f"Dataset not found: {dataset_path}", field="dataset")
    rows = load_rows(dataset_path)
    fmt = load_format(resolve_user_path(params.format, "format")) if params.format else None
    options = _Options(params, params.train_only_after, params.train_last_turn_only)
    tally, problems, rendered, text_rows, matched_keys = _recognise_rows(rows, fmt, options, tokenizer)

    bos, eos = special_tokens(params, tokenizer)
    closing = closing_ids(tokenizer)
    samples: list[Sample] = []
    ends: dict[str, int] = {}  # how samples end (see _formatted_sample); "overlong": truncated or dropped
    all_ids, all_offsets = encode_with_offsets(tokenizer, [row.text for row in rendered])
    for row, ids, offsets in zip(rendered, all_ids, all_offsets):
        result, end = _formatted_sample(row, ids, offsets, params, bos, eos, closing)
        ends[end] = ends.get(end, 0) + 1
        (problems if isinstance(result, Problem) else samples).append(result)
    overlong, closed = ends.get("overlong", 0), ends.get("closed", 0)
    text_stats = {}
    if text_rows:
        from .textrows import text_row_samples

        chunks, dropped, text_stats = text_row_samples(text_rows, params, tokenizer)
        samples, problems = samples + chunks, problems + dropped
    # No sample at all is not an error here: the preview lists every problem row; a run refuses to start.
    if text_rows and rendered:
        samples.sort(key=lambda s: _row_number(s.source))  # in row order, text-row chunks among the others
    stats = sample_stats(samples, params.cutoff_len)
    stats.update(text_stats)
    stats.update(rows=len(rows), unmatched_rows=sum(p.reason.startswith("unmatched") for p in problems),
                 chat_rows_skipped=sum(p.reason.startswith("chat row") for p in problems),
                 truncated_samples=0 if params.overlong_samples == "drop" else overlong,
                 dropped_overlong=overlong if params.overlong_samples == "drop" else 0,
                 matched_keys=matched_keys, eos_from_template=closed)
    unused = any(p.reason.startswith(("unmatched", "chat row")) for p in problems)
    kind = "raw" if text_rows and not rendered and not unused else "formatted"  # text rows: shown as raw text
    context = _context(params, options, dataset_path, rows, ends, tokenizer, eos)
    return Preview(kind, samples, sorted(problems, key=lambda p: p.index), stats, describe(tally, context))


def _row_number(source: str) -> int:
    return int(source.split()[1]) if source.startswith("row ") else 0


def _context(params, options: _Options, path, rows: list, ends: dict[str, int], tokenizer,
             eos: list[int]) -> dict[str, Any]:
    """What the recognised-shape sentence says beyond the rows: source, template, end tokens, options."""
    context = {"last_only": options.last_only, "format": params.format or None,
               "train_only_after": params.train_only_after, "cutoff_len": params.cutoff_len,
               "overlap_len": params.overlap_len, "min_chars": params.min_chars}
    if options._template is not None:
        context["template"] = options._template.label
    if path.suffix.lower() in TABLE_ENDINGS:
        columns = list(dict.fromkeys(k for row in rows[:50] for k in row))
        kind = {".csv": "CSV", ".tsv": "TSV"}.get(path.suffix.lower(), "Parquet")
        context["source"] = f"{kind} table with columns {', '.join(map(str, columns))}"
    closed, added = ends.get("closed", 0), ends.get("open", 0)
    if eos and (closed or added):
        token = tokenizer.convert_ids_to_tokens(eos[0])
        if closed and not added:
            context["eos"] = f"Each sample already ends with an end token of its own, so no EOS ({token}) is added."
        elif closed:
            context["eos"] = (f"{closed:,} samples already end with an end token of their own (no EOS added); "
                              f"{added:,} {'gets' if added == 1 else 'get'} the EOS token {token}.")
        else:
            context["eos"] = f"The EOS token {token} is added at the end of each sample."
    return context


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
            return _said(build_raw_samples(params, tokenizer), params)
        if not (dataset or params.dataset):
            raise DashboardError("Choose a dataset or a raw text file.", field="dataset")
        path = resolve_user_path(dataset or params.dataset, "dataset")
        if dataset_kind(path) == "raw":
            raw = type(params).from_dict({**params.to_dict(), "raw_text_file": str(path), "dataset": ""})
            return _said(build_raw_samples(raw, tokenizer), raw)
        return build_formatted_samples(params, tokenizer, dataset)


def _said(preview: Preview, params) -> Preview:
    """A raw-text preview with its recognised-shape sentence."""
    stats = preview.stats
    preview.shape = (f"Raw text: {stats['files']:,} file(s), {stats['blocks']:,} block(s) after cutting at the hard "
                     f"cut string, {stats['kept_blocks']:,} kept; chunked into samples of at most "
                     f"{params.cutoff_len} tokens sharing about {params.overlap_len} tokens with the previous one; "
                     f"all of it trained.")
    return preview


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
