"""Raw text into training samples: blocks cut at the hard cut string, each tokenised once and cut into
chunks of at most the cutoff that overlap and start and end on line starts where the text allows.

`build_raw_samples` is what trainer.data.build_samples runs for raw text.
"""

from __future__ import annotations

import itertools

import numpy as np

from .data import Preview, Problem, Sample, encode_with_offsets, sample_stats, special_tokens
from .datafiles import no_text_error, raw_text_files, read_text_file
from .home import resolve_user_path
from .params import overlap_problem


def overlap_band(overlap: int, budget: int) -> tuple[int, int]:
    """The overlaps a chunk may have when its start moves to a line start: from half the requested overlap
    up to twice it, but never past half the budget unless the request itself is more (so a chunk still adds
    at least half its tokens as new text wherever the request allows it). FORMATS.md states the rule."""
    if overlap <= 0:
        return 0, 0
    return overlap - overlap // 2, max(overlap, min(2 * overlap, budget // 2))


def chunk_spans(line_starts: np.ndarray, char_pos: np.ndarray, n_tokens: int, budget: int, overlap: int,
                newline_favor_len: int) -> list[tuple[int, int]]:
    """Token spans [start, end) covering 0..n_tokens, each at most `budget` long.

    `line_starts` is the sorted array of token indices that begin a line (0 and n_tokens included);
    `char_pos[b]` is the character offset of token boundary b. A cut moves back to a line start lying
    within `newline_favor_len` characters, and the next chunk starts `overlap` tokens before the cut,
    moved to a line start within `newline_favor_len` characters too; each move only where it keeps the
    overlap inside `overlap_band` and lets the chunk add at least half its tokens as new text (in CJK text a
    character is about a token, so a move of 128 characters would otherwise be a move of 128 tokens).
    Every token is in at least one span: nothing is thrown away. Both ends move forward from span to span.
    """
    if n_tokens == 0:
        return []
    spans, start, previous_end = [], 0, 0
    band = overlap_band(overlap, budget)
    while True:
        end = min(start + budget, n_tokens)
        if end < n_tokens and newline_favor_len > 0:
            end = _cut_at_line_start(line_starts, char_pos, start, end, previous_end, overlap, newline_favor_len)
        spans.append((start, end))
        if end >= n_tokens:
            return spans
        next_start = end - overlap
        if overlap > 0 and newline_favor_len > 0:
            next_start = _start_at_line_start(line_starts, char_pos, start, end, next_start, band,
                                              newline_favor_len)
        previous_end = end
        start = max(next_start, start + 1)


def _cut_at_line_start(line_starts, char_pos, start: int, end: int, previous_end: int, overlap: int,
                       favor: int) -> int:
    """The planned cut `end`, moved back to the latest line start within `favor` characters that leaves room
    for the next chunk's overlap and keeps at least half of this chunk new (past twice the previous cut's
    overlap: c - previous_end >= previous_end - start)."""
    i = np.searchsorted(line_starts, end, side="right") - 1
    if i < 0:
        return end
    candidate = int(line_starts[i])
    lowest = max(start + overlap, previous_end, 2 * previous_end - start)
    if candidate > lowest and char_pos[end] - char_pos[candidate] <= favor:
        return candidate
    return end


def _start_at_line_start(line_starts, char_pos, start: int, end: int, planned: int, band: tuple[int, int],
                         favor: int) -> int:
    """The planned start of the next chunk moved to the nearest line start within `favor` characters whose
    overlap with this chunk (`end - line start`) stays in `band`, strictly inside (start, end)."""
    i = np.searchsorted(line_starts, planned)
    best = None
    for j in (i - 1, i):
        if 0 <= j < len(line_starts):
            candidate = int(line_starts[j])
            distance = abs(int(char_pos[candidate]) - int(char_pos[planned]))
            if start < candidate < end and distance <= favor and band[0] <= end - candidate <= band[1]:
                if best is None or distance < best[0]:
                    best = (distance, candidate)
    return planned if best is None else best[1]


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



def build_raw_samples(params, tokenizer) -> Preview:
    # The options are checked before any file is read or tokenised.
    bos, eos = special_tokens(params, tokenizer)
    problem = overlap_problem(params.overlap_len, params.cutoff_len, len(bos) + len(eos))
    if problem:
        raise problem
    files = raw_text_files(resolve_user_path(params.raw_text_file, "dataset"))
    blocks = _blocks(files, params.hard_cut)
    problems, kept = [], []
    for index, (text, name) in enumerate(blocks):
        if len(text) <= params.min_chars:
            reason = "empty" if not text else f"only {len(text)} characters (minimum block size {params.min_chars})"
            problems.append(Problem(f"block {index} ({name})", f"dropped: {reason}", index))
        else:
            kept.append((index, text, name))
    if not kept:
        raise no_text_error(len(blocks))

    samples = []
    for (index, text, name), (ids, offsets) in zip(kept, encode_ahead(tokenizer, [t for _, t, _ in kept])):
        samples += _block_chunks(text, ids, offsets, f"block {index} ({name})", params, bos, eos)
    stats = sample_stats(samples, params.cutoff_len)
    stats.update(blocks=len(blocks), kept_blocks=len(kept), dropped_blocks=len(blocks) - len(kept),
                 files=len(files))
    return Preview("raw", samples, problems, stats)


def _blocks(files, hard_cut: str) -> list[tuple[str, str]]:
    """(stripped text, file name) of every block of every file, cut at the hard cut string."""
    # The text's line ends became \n, so a hard cut typed with \r\n or \r (Windows habits) must too.
    hard_cut = hard_cut.replace("\r\n", "\n").replace("\r", "\n")
    blocks = []
    for file in files:
        text = read_text_file(file)
        parts = text.split(hard_cut) if hard_cut else [text]
        blocks.extend((part.strip(), file.name) for part in parts)
    return blocks


def _block_chunks(text: str, ids: list[int], offsets, where: str, params, bos: list[int],
                  eos: list[int]) -> list[Sample]:
    """The chunks of one tokenised block: BOS on each, EOS on the last (the block's end)."""
    # fromiter over the flattened pairs: several times faster than np.asarray on a list of tuples.
    offsets = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets))
    line_starts, char_pos = _line_start_tokens(text, offsets.reshape(-1, 2))
    budget = params.cutoff_len - len(bos) - len(eos)
    spans = chunk_spans(line_starts, char_pos, len(ids), budget, params.overlap_len, params.newline_favor_len)
    chunks, previous_end = [], None
    for number, (start, end) in enumerate(spans):
        chunk_ids = bos + ids[start:end] + (eos if end == len(ids) else [])
        chunks.append(Sample(
            text=text[int(char_pos[start]):int(char_pos[end])],
            input_ids=chunk_ids,
            label_mask=[0] * len(bos) + [1] * (len(chunk_ids) - len(bos)),
            source=f"{where} chunk {number}",
            overlap=max(0, previous_end - start) if previous_end is not None else 0,
        ))
        previous_end = end
    return chunks
