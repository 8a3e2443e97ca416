"""Raw-text chunking: hypothesis properties with the real SmolLM2 tokenizer, plus examples.

The reference model used here is the spec of issue 2: text is read as UTF-8 with \\r\\n and \\r made
\\n, cut into blocks at the hard cut string, each block stripped, blocks of at most `min_chars`
characters dropped; each kept block is tokenised on its own and cut into chunks of at most
`cutoff_len` tokens (BOS/EOS included) that overlap, start and end on line starts where the text
allows, and together hold every token of the block.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from trainer.chunking import _line_start_tokens, build_raw_samples, chunk_spans, encode_ahead, overlap_band
from trainer.data import build_samples, encode_with_offsets
from trainer.errors import DashboardError
from trainer.params import TrainingParameters, decode_escapes

SOURCE_RE = re.compile(r"^block (\d+) \((.+)\) chunk (\d+)$")

WORDS = [
    "the", "LoRA", "adapter", "trains", "on", "chunks", "of", "text.", "Hello,", "world!", "a", "x", "42",
    "3.14", "café", "naïve", "Zürich", "façade", "Ωμέγα", "Привет", "😀", "🎉🎉", "👩‍💻", "🇫🇷", "世界",
    "日本語のテキスト", "한국어", "—", "...", "#", "##", "-", "---", "\t", "(x)", "e\u0301",
]
# Hard cut strings as a user types them (escapes allowed); "" means no hard cut.
HARD_CUTS = ["\\n\\n\\n", "\\n\\n\\n", "###", "\\n---\\n", "<cut>", ""]

word = st.one_of(
    st.sampled_from(WORDS),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), min_size=1, max_size=5),
)
line = st.builds(lambda indent, ws: " " * indent + " ".join(ws), st.integers(0, 2), st.lists(word, max_size=12))
# Assigned characters only: every token sequence of such text decodes back to it.
assigned_word = st.one_of(
    st.sampled_from(WORDS),
    st.text(st.characters(exclude_categories=("Cs", "Cn", "Co"), exclude_characters="\r\n"), min_size=1, max_size=5),
)
assigned_line = st.builds(lambda ws: " ".join(ws), st.lists(assigned_word, max_size=12))


@st.composite
def raw_case(draw):
    """Random text (lines, blank-line runs, hard cuts, unicode) and random chunking options."""
    hard_cut_string = draw(st.sampled_from(HARD_CUTS))
    hard_cut = decode_escapes(hard_cut_string)
    separators = ["\n", "\n", "\n", "\n\n", "\n\n\n", "\n\n\n\n", "\n" * 6, " "]
    if hard_cut:
        separators += [hard_cut, "\n" + hard_cut + "\n"]
    lines = draw(st.lists(line, min_size=1, max_size=40))
    text = lines[0]
    for item in lines[1:]:
        text += draw(st.sampled_from(separators)) + item
    text = draw(st.sampled_from(["", "\n", hard_cut])) + text + draw(st.sampled_from(["", "\n", "\n\n", hard_cut]))
    cutoff = draw(st.integers(8, 128))
    add_bos = draw(st.booleans())
    add_eos = draw(st.booleans())
    budget = cutoff - add_bos - add_eos
    options = dict(
        cutoff_len=cutoff,
        overlap_len=draw(st.integers(0, budget - 1)),
        newline_favor_len=draw(st.sampled_from([0, 0, draw(st.integers(1, 200))])),
        min_chars=draw(st.integers(0, 50)),
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        hard_cut_string=hard_cut_string,
    )
    return text, options


def reference_blocks(text: str, hard_cut: str, min_chars: int) -> tuple[list[str], list[tuple[int, str]]]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks = [part.strip() for part in (text.split(hard_cut) if hard_cut else [text])]
    return blocks, [(i, b) for i, b in enumerate(blocks) if len(b) > min_chars]


def write_and_build(home: Path, text: str, tokenizer, name: str = "prop.txt", newline: str | None = None, **options):
    path = home / "datasets" / name
    path.write_bytes(text.encode("utf-8"))
    params = TrainingParameters(raw_text_file=name, dataset="", **options)
    return build_raw_samples(params, tokenizer)


def body_of(sample, bos: list[int], eos: list[int], last: bool) -> list[int]:
    ids = list(sample.input_ids)
    assert ids[: len(bos)] == bos
    ids = ids[len(bos):]
    if last and eos:
        assert ids[-1:] == eos
        ids = ids[:-1]
    return ids


def _group(preview):
    groups = {}
    for sample in preview.samples:
        groups.setdefault(sample.source.split(" chunk ")[0], []).append(sample)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------
# The main property: build_raw_samples on random texts against the reference model


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=raw_case(), line_ending=st.sampled_from(["\r\n", "\r", "mixed"]), data=st.data())
def test_raw_chunking_properties(home, tokenizer, case, line_ending, data):
    text, options = case
    params = TrainingParameters(**options)
    hard_cut = params.hard_cut
    blocks, kept = reference_blocks(text, hard_cut, params.min_chars)
    if not kept:
        with pytest.raises(DashboardError, match="No text left"):
            write_and_build(home, text, tokenizer, **options)
        return
    preview = write_and_build(home, text, tokenizer, **options)
    bos = [tokenizer.bos_token_id] if params.add_bos_token else []
    eos = [tokenizer.eos_token_id] if params.add_eos_token else []
    budget = params.cutoff_len - len(bos) - len(eos)

    # (f) dropped blocks are counted and listed
    dropped = [i for i, b in enumerate(blocks) if len(b) <= params.min_chars]
    assert preview.stats["blocks"] == len(blocks)
    assert preview.stats["dropped_blocks"] == len(dropped)
    assert preview.stats["kept_blocks"] == len(kept)
    assert [p.index for p in preview.problems] == dropped
    assert all(p.reason.startswith("dropped") for p in preview.problems)
    assert preview.stats["samples"] == len(preview.samples)
    assert preview.stats["tokens"] == sum(s.n_tokens for s in preview.samples)

    event(f"kept blocks: {min(len(kept), 3)}{'+' if len(kept) > 3 else ''}")
    event(f"most chunks in a block: {min(max(len(by) for by in _group(preview)), 5)}")
    by_block: dict[int, list] = {}
    for sample in preview.samples:
        # (a) no sample over cutoff_len tokens
        assert 0 < sample.n_tokens <= params.cutoff_len
        assert len(sample.label_mask) == sample.n_tokens
        assert sample.label_mask == [0] * len(bos) + [1] * (sample.n_tokens - len(bos))
        # (b) no chunk contains the hard cut string
        if hard_cut:
            assert hard_cut not in sample.text
            assert hard_cut not in tokenizer.decode(sample.input_ids)
        match = SOURCE_RE.match(sample.source)
        assert match, sample.source
        assert match.group(2) == "prop.txt"
        by_block.setdefault(int(match.group(1)), []).append((int(match.group(3)), sample))

    # (b) chunks come from one block only, blocks in order, chunk numbers consecutive
    assert list(by_block) == [i for i, _ in kept]
    for index, block_text in kept:
        chunks = by_block[index]
        assert [n for n, _ in chunks] == list(range(len(chunks)))
        ids = tokenizer(block_text, add_special_tokens=False)["input_ids"]
        # (c) every token of the block is covered: chunks are contiguous slices of the block's tokens,
        # each starting `overlap` tokens before the previous one ended, the last one ending at the end.
        covered_to = 0
        text_at = 0
        for number, sample in chunks:
            last = number == len(chunks) - 1
            body = body_of(sample, bos, eos, last)
            assert 0 < len(body) <= budget + (0 if last else len(eos))
            start = covered_to - sample.overlap
            assert 0 <= sample.overlap
            if number == 0:
                assert sample.overlap == 0
            else:
                # progress: every chunk brings new tokens, and shares tokens only with what came before
                assert sample.overlap < len(body)
                # (d) overlaps as configured: exact without newline favour, else inside the band
                low, high = overlap_band(params.overlap_len, budget)
                if params.newline_favor_len == 0:
                    assert sample.overlap == params.overlap_len
                else:
                    assert low <= sample.overlap <= high, (sample.overlap, params.overlap_len, budget)
                # (d') a chunk adds at least half its tokens as new text, where the overlap asked allows it
                if not last and params.overlap_len <= budget // 2:
                    assert 2 * (len(body) - sample.overlap) >= len(body), (len(body), sample.overlap)
            assert body == ids[start:start + len(body)]
            covered_to = start + len(body)
            if not last:
                assert not eos or sample.input_ids[-1] != eos[0]
                if params.newline_favor_len == 0:
                    assert len(body) == budget
            # the text shown is the block's text, in order
            found = block_text.find(sample.text, text_at)
            assert found >= 0
            text_at = found
        assert covered_to == len(ids)
        if params.overlap_len == 0:
            assert sum(s.n_tokens - len(bos) for _, s in chunks) == len(ids) + len(eos)

    # (e) \r\n and \r input gives exactly the same samples as \n input
    if line_ending == "mixed":
        pieces = text.split("\n")
        other = pieces[0]
        for piece in pieces[1:]:
            other += data.draw(st.sampled_from(["\n", "\r\n"])) + piece
    else:
        other = text.replace("\n", line_ending)
    again = write_and_build(home, other, tokenizer, name="prop-crlf.txt", **options)
    assert [s.input_ids for s in again.samples] == [s.input_ids for s in preview.samples]
    assert [s.text for s in again.samples] == [s.text for s in preview.samples]
    assert [s.label_mask for s in again.samples] == [s.label_mask for s in preview.samples]
    assert [s.overlap for s in again.samples] == [s.overlap for s in preview.samples]
    assert [s.source.replace("prop-crlf.txt", "prop.txt") for s in again.samples] == [
        s.source for s in preview.samples]


# ---------------------------------------------------------------------------------------------
# chunk_spans on its own: random line starts, random character positions (0-width: inside a character)


@st.composite
def span_case(draw):
    n = draw(st.integers(0, 300))
    widths = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    char_pos = np.concatenate([[0], np.cumsum(widths, dtype=np.int64)]).astype(np.int64)
    inner = draw(st.sets(st.integers(1, max(1, n - 1)), max_size=max(0, n - 1))) if n > 1 else set()
    line_starts = np.array(sorted({0, n} | inner), dtype=np.int64)
    budget = draw(st.integers(1, 64))
    overlap = draw(st.integers(0, budget - 1))
    favor = draw(st.sampled_from([0, draw(st.integers(1, 200))]))
    return line_starts, char_pos, n, budget, overlap, favor


def check_spans(line_starts, char_pos, n, budget, overlap, favor):
    spans = chunk_spans(line_starts, char_pos, n, budget, overlap, favor)
    if n == 0:
        assert spans == []
        return spans
    starts_set = set(int(x) for x in line_starts)
    assert spans[0][0] == 0 and spans[-1][1] == n
    # (g) progress and termination: a bounded number of spans, each bringing new tokens
    assert len(spans) <= n
    previous = None
    for k, (start, end) in enumerate(spans):
        assert 0 <= start < end <= n
        assert end - start <= budget
        planned = min(start + budget, n)
        if previous is not None:
            p_start, p_end = previous
            assert p_start < start, "starts must move forward"
            assert p_end < end, "a chunk lying inside the previous one adds nothing"
            assert start <= p_end, "a gap between chunks throws tokens away"
            planned_start = p_end - overlap
            low, high = overlap_band(overlap, budget)
            if overlap == 0:
                assert start == p_end
            elif favor == 0:
                assert start == planned_start
            else:
                assert start < p_end, "overlap > 0 must give shared tokens"
                assert low <= p_end - start <= high, "the overlap stays in its band"
                if start != planned_start:
                    assert start in starts_set
                    assert abs(int(char_pos[start]) - int(char_pos[planned_start])) <= favor
            if end < n and overlap <= budget // 2:
                assert 2 * (end - p_end) >= end - start, "a chunk adds at least half its tokens as new text"
        if end < n:
            if favor == 0:
                assert end == planned
            else:
                # (h) the cut moves back to the latest line start within newline_favor_len characters
                # (keeping room for the next overlap, and half the chunk new), and only there.
                p_end = previous[1] if previous else 0
                lower = max(start + overlap, p_end, 2 * p_end - start)
                eligible = [s for s in starts_set
                            if lower < s <= planned and char_pos[planned] - char_pos[s] <= favor]
                if eligible:
                    assert end == max(eligible)
                else:
                    assert end == planned
        previous = (start, end)
    return spans


@settings(max_examples=1000, deadline=None)
@given(case=span_case())
@example(case=(np.array([0, 4, 8, 30, 40]), np.arange(41), 40, 10, 3, 200))
def test_chunk_spans_properties(case):
    check_spans(*case)


def test_overlap_band():
    assert overlap_band(0, 255) == (0, 0)
    assert overlap_band(32, 255) == (16, 64)
    assert overlap_band(100, 255) == (50, 127)  # never past half the budget ...
    assert overlap_band(200, 255) == (100, 200)  # ... unless the overlap asked is more


def test_cjk_text_overlaps_as_asked(home, tokenizer):
    """The issue's case: Chinese text, cutoff 256, overlap 32, newline favour 128. A character is about a
    token, so a line start 128 characters away used to make chunks share up to 209 of their 255 tokens."""
    sentences = ["训练数据被切成有重叠的片段", "每个片段最多二百五十六个词元", "换行处优先切开",
                 "重叠部分应当接近所要求的长度", "这样每个片段都带来新的文本"]
    lines = ["，".join(sentences[(i + j) % len(sentences)] for j in range(1 + i % 4)) + "。" for i in range(400)]
    preview = write_and_build(home, "\n".join(lines), tokenizer, name="cjk.txt", cutoff_len=256, overlap_len=32,
                              newline_favor_len=128, add_eos_token=True, hard_cut_string="")
    overlaps = [s.overlap for s in preview.samples[1:]]
    assert len(overlaps) > 10
    assert all(16 <= o <= 64 for o in overlaps), overlaps
    for sample in preview.samples[1:-1]:
        assert 2 * (sample.n_tokens - sample.overlap) >= sample.n_tokens


def test_chunk_spans_never_repeats_a_chunk_inside_the_previous_one():
    # Line starts at 0, 4, 8 then a long line: the second chunk used to be [4, 8), inside [0, 8).
    spans = chunk_spans(np.array([0, 4, 8, 30, 40]), np.arange(41), 40, 10, 3, 200)
    assert spans[0] == (0, 8)
    assert all(b[1] > a[1] for a, b in zip(spans, spans[1:]))


# ---------------------------------------------------------------------------------------------
# Line starts from the real tokenizer


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(assigned_line, min_size=1, max_size=12), seps=st.lists(st.sampled_from(["\n", "\n\n", " \n", "\n "]),
                                                                   min_size=12, max_size=12))
@example(lines=["ab", "世界", "😀"], seps=["\n"] * 12)
def test_line_starts_are_real_line_starts(tokenizer, lines, seps):
    text = lines[0] + "".join(sep + item for sep, item in zip(seps, lines[1:]))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    assume(tokenizer.decode(ids) == text)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    line_starts, char_pos = _line_start_tokens(text, offsets)
    n = len(ids)
    assert line_starts[0] == 0 and line_starts[-1] == n
    assert np.all(np.diff(char_pos) >= 0)
    assert char_pos[-1] == len(text)
    expected = {0, n}
    for b in range(1, n):
        prefix = tokenizer.decode(ids[:b])
        if prefix.endswith("\n") and prefix == text[: len(prefix)]:
            expected.add(b)
    # A boundary inside a character (emoji, CJK split into byte tokens) is never a line start.
    assert set(int(x) for x in line_starts) == expected


# ---------------------------------------------------------------------------------------------
# Examples


def test_chunk_ends_move_to_line_starts(home, tokenizer):
    text = "\n".join(f"Line {i} has a few plain words in it." for i in range(30))
    options = dict(cutoff_len=40, overlap_len=8, add_eos_token=False, add_bos_token=False, min_chars=0)
    favoured = write_and_build(home, text, tokenizer, newline_favor_len=200, **options)
    assert len(favoured.samples) > 3
    for sample in favoured.samples[:-1]:
        assert sample.text.endswith("\n"), sample.text
    for sample in favoured.samples:
        assert sample.text.startswith("Line "), sample.text
        assert sample.overlap >= 0
    assert all(s.overlap > 0 for s in favoured.samples[1:])
    plain = write_and_build(home, text, tokenizer, newline_favor_len=0, **options)
    assert any(not s.text.endswith("\n") for s in plain.samples[:-1])
    assert all(s.overlap == 8 for s in plain.samples[1:])


def test_non_utf8_file_names_byte_offset(home, tokenizer):
    (home / "datasets" / "latin1.txt").write_bytes(b"hello\nworld caf\xe9 and more")
    params = TrainingParameters(raw_text_file="latin1.txt", cutoff_len=32, overlap_len=4)
    with pytest.raises(DashboardError, match=r"byte offset 15"):
        build_raw_samples(params, tokenizer)


def test_folder_is_read_in_natural_order_each_file_its_own_block(home, tokenizer):
    folder = home / "datasets" / "parts"
    folder.mkdir()
    (folder / "part10.txt").write_text("ten ten ten", encoding="utf-8")
    (folder / "part2.txt").write_text("two two two", encoding="utf-8")
    (folder / "part1.txt").write_text("one one one", encoding="utf-8")
    (folder / "notes.rst").write_text("not text for training", encoding="utf-8")
    params = TrainingParameters(raw_text_file="parts", cutoff_len=32, overlap_len=4, hard_cut_string="")
    preview = build_raw_samples(params, tokenizer)
    assert [s.text for s in preview.samples] == ["one one one", "two two two", "ten ten ten"]
    assert [s.source for s in preview.samples] == [
        "block 0 (part1.txt) chunk 0", "block 1 (part2.txt) chunk 0", "block 2 (part10.txt) chunk 0"]
    assert preview.stats["files"] == 3 and preview.stats["blocks"] == 3
    eos = tokenizer.eos_token_id
    assert all(s.input_ids[-1] == eos for s in preview.samples)  # each file ends a block
    # build_samples takes a folder given as the dataset too
    via_dataset = build_samples(TrainingParameters(dataset="parts", cutoff_len=32, overlap_len=4,
                                                   hard_cut_string=""), tokenizer)
    assert [s.text for s in via_dataset.samples] == [s.text for s in preview.samples]


@pytest.mark.parametrize("content", [b"", b"   \n\n  ", b"\n\n\n\n\n\n\n\n\n", b"\r\n\r\n\r\n"])
def test_nothing_to_train_on_is_an_error(home, tokenizer, content):
    (home / "datasets" / "empty.txt").write_bytes(content)
    params = TrainingParameters(raw_text_file="empty.txt", cutoff_len=32, overlap_len=4)
    with pytest.raises(DashboardError, match="No text left"):
        build_raw_samples(params, tokenizer)


def test_min_chars_drops_short_blocks_and_says_so(home, tokenizer):
    text = "ab\n\n\nabcdef\n\n\n  abc  \n\n\nthe longest block of them all"
    preview = write_and_build(home, text, tokenizer, cutoff_len=32, overlap_len=4, min_chars=3)
    assert [s.text for s in preview.samples] == ["abcdef", "the longest block of them all"]
    assert preview.stats["dropped_blocks"] == 2
    assert [(p.index, p.where) for p in preview.problems] == [(0, "block 0 (prop.txt)"), (2, "block 2 (prop.txt)")]
    assert "3 characters" in preview.problems[1].reason


def test_overlap_at_or_over_budget_is_an_error_before_any_work(home, tokenizer):
    # The file does not even exist: the options are checked first.
    params = TrainingParameters(raw_text_file="missing.txt", cutoff_len=16, overlap_len=16)
    with pytest.raises(DashboardError) as info:
        build_raw_samples(params, tokenizer)
    assert info.value.field == "overlap_len"
    # BOS and EOS take room from the budget too
    params = TrainingParameters(raw_text_file="user-guide.txt", cutoff_len=16, overlap_len=14,
                                add_bos_token=True, add_eos_token=True)
    with pytest.raises(DashboardError) as info:
        build_raw_samples(params, tokenizer)
    assert info.value.field == "overlap_len"
    params = TrainingParameters(raw_text_file="user-guide.txt", cutoff_len=16, overlap_len=13,
                                add_bos_token=True, add_eos_token=True)
    assert all(s.n_tokens <= 16 for s in build_raw_samples(params, tokenizer).samples)


def test_custom_hard_cut_and_escaped_carriage_returns(home, tokenizer):
    text = "first part\r\n\r\nsecond part\r\n\r\nthird"
    # Typed as Windows line ends: the text's \r\n became \n, so the hard cut must too.
    preview = write_and_build(home, text, tokenizer, cutoff_len=32, overlap_len=4, hard_cut_string="\\r\\n\\r\\n")
    assert [s.text for s in preview.samples] == ["first part", "second part", "third"]
    preview = write_and_build(home, "a b c ### d e f###g", tokenizer, cutoff_len=32, overlap_len=4,
                              hard_cut_string="###")
    assert [s.text for s in preview.samples] == ["a b c", "d e f", "g"]


def test_bom_is_not_text(home, tokenizer):
    a = write_and_build(home, "\ufeffHello there", tokenizer, cutoff_len=32, overlap_len=4)
    assert a.samples[0].text == "Hello there"


def test_demo_raw_text_chunks(home, tokenizer):
    params = TrainingParameters(raw_text_file="user-guide.txt", cutoff_len=128, overlap_len=32,
                                newline_favor_len=128)
    preview = build_samples(params, tokenizer)
    assert preview.kind == "raw"
    assert preview.stats["kept_blocks"] > 3
    assert all(s.n_tokens <= 128 for s in preview.samples)
    assert all("\n\n\n" not in s.text for s in preview.samples)


# ---- the tokenisation the chunking reads ---------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.lists(st.sampled_from(list("ab \n\t.é漢🙂") + ["<|im_start|>", "User:", "  "]),
                              max_size=40).map("".join), min_size=1, max_size=5))
def test_direct_backend_encoding_equals_the_tokenizer_call(tokenizer, texts):
    """The fast path (the Rust encodings read directly) gives exactly the ordinary call's ids and offsets."""
    ids, offsets = encode_with_offsets(tokenizer, texts)
    expected = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == expected["input_ids"]
    assert [[tuple(o) for o in row] for row in offsets] == [[tuple(o) for o in row] for row in expected["offset_mapping"]]


def test_a_truncating_backend_takes_the_ordinary_call(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    tok.backend_tokenizer.enable_truncation(max_length=3)  # as a tokenizer.json with truncation set would
    text = "one two three four five six seven"
    ids, _ = encode_with_offsets(tok, [text])
    # The ordinary call resets the backend's truncation first, so every token comes back.
    assert ids == [tok(text, add_special_tokens=False)["input_ids"]] and len(ids[0]) > 3


@pytest.mark.parametrize("batch", [1, 3, 7, 100])
def test_tokenising_ahead_in_batches_keeps_every_text_in_order(tokenizer, batch):
    texts = [f"Block {i}:\n" + "word " * (i % 5) + "end." for i in range(10)]
    ids, offsets = encode_with_offsets(tokenizer, texts)
    assert list(encode_ahead(tokenizer, texts, batch=batch)) == list(zip(ids, offsets))
