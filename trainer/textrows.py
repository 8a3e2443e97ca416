"""Text rows (`{"text": ...}`, text-generation-webui's text datasets): each row a document, chunked with the
raw-text rules of trainer/chunking.py (cutoff, overlap, newline favour, hard cut string, minimum block
size), so a webui text dataset trains as it does there and no text is lost.

A row is cut at the hard cut string into blocks; a block at most the minimum block size long is dropped
(listed as a problem); each kept block is chunked exactly as a block of a raw text file is.
"""

from __future__ import annotations

from typing import Any

from .chunking import _block_chunks, encode_ahead
from .data import Problem, Sample, special_tokens
from .params import overlap_problem


def _row_blocks(rows: list[tuple[int, str]], hard_cut: str) -> list[tuple[int, str, str]]:
    """(row index, where, stripped text) of every block of every row, cut at the hard cut string."""
    hard_cut = hard_cut.replace("\r\n", "\n").replace("\r", "\n")
    blocks = []
    for index, text in rows:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        parts = text.split(hard_cut) if hard_cut else [text]
        for number, part in enumerate(parts):
            where = f"row {index}" if len(parts) == 1 else f"row {index} block {number}"
            blocks.append((index, where, part.strip()))
    return blocks


def text_row_samples(rows: list[tuple[int, str]], params, tokenizer) -> tuple[list[Sample], list[Problem],
                                                                              dict[str, Any]]:
    """The chunks of the text rows `(row index, text)`, the blocks dropped, and block statistics."""
    bos, eos = special_tokens(params, tokenizer)
    problem = overlap_problem(params.overlap_len, params.cutoff_len, len(bos) + len(eos))
    if problem:
        raise problem
    blocks = _row_blocks(rows, params.hard_cut)
    problems, kept = [], []
    for index, where, text in blocks:
        if len(text) <= params.min_chars:
            reason = "empty" if not text else f"only {len(text)} characters (minimum block size {params.min_chars})"
            problems.append(Problem(where, f"dropped: {reason}", index))
        else:
            kept.append((where, text))
    samples: list[Sample] = []
    for (where, text), (ids, offsets) in zip(kept, encode_ahead(tokenizer, [t for _, t in kept])):
        samples += _block_chunks(text, ids, offsets, where, params, bos, eos)
    stats = {"files": 1, "blocks": len(blocks), "kept_blocks": len(kept), "dropped_blocks": len(blocks) - len(kept),
             "text_rows": len(rows)}
    return samples, problems, stats
