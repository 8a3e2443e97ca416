"""Formatted datasets: format-file matching, chat rows, "train only after" masks, overlong samples,
EOS/BOS and the errors for broken files, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.data import IGNORE_INDEX, build_samples, no_samples_error, unmatched_rows_error
from trainer.datafiles import load_format, load_rows
from trainer.errors import DashboardError
from trainer.home import CODE_ROOT
from trainer.params import TrainingParameters

CHATBOT = "alpaca-chatbot-format"


def write_rows(home: Path, rows, name: str = "rows.json") -> str:
    path = home / "datasets" / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    return name


def write_format(home: Path, fmt, name: str = "custom-format") -> str:
    folder = home / "formats"
    folder.mkdir(exist_ok=True)
    text = fmt if isinstance(fmt, str) else json.dumps(fmt)
    (folder / f"{name}.json").write_text(text, encoding="utf-8")
    return name


def build(home, tokenizer, rows, fmt="alpaca-format", **options):
    dataset = write_rows(home, rows, options.pop("name", "rows.json"))
    if isinstance(fmt, dict):
        fmt = write_format(home, fmt)
    options.setdefault("cutoff_len", 256)
    options.setdefault("overlap_len", 0)
    return build_samples(TrainingParameters(dataset=dataset, format=fmt or "", **options), tokenizer)


def trained_ids(sample) -> list[int]:
    return [t for t, m in zip(sample.input_ids, sample.label_mask) if m]


def masked_ids(sample) -> list[int]:
    return [t for t, m in zip(sample.input_ids, sample.label_mask) if not m]


# ---------------------------------------------------------------------------------------------
# Matching rules


def test_first_matching_key_wins(home, tokenizer):
    rows = [{"instruction": "Say hi", "output": "hi"}]
    fmt = {"instruction,output": "FIRST %instruction% -> %output%", "output, instruction": "SECOND %output%"}
    preview = build(home, tokenizer, rows, fmt)
    assert [s.text for s in preview.samples] == ["FIRST Say hi -> hi"]
    assert preview.stats["matched_keys"] == {"instruction,output": 1}
    fmt = {" output , instruction ": "SECOND %output%", "instruction,output": "FIRST %instruction% -> %output%"}
    preview = build(home, tokenizer, rows, fmt)
    assert [s.text for s in preview.samples] == ["SECOND hi"]
    assert preview.stats["matched_keys"] == {" output , instruction ": 1}


@pytest.mark.parametrize("empty", ["", " ", "  \n\t "])
def test_empty_and_blank_strings_do_not_count_as_fields(home, tokenizer, empty):
    rows = [{"instruction": "Name a colour", "input": empty, "output": "Blue"},
            {"instruction": "Name a colour", "input": "warm ones", "output": "Red"}]
    preview = build(home, tokenizer, rows, add_eos_token=False)
    no_input, with_input = preview.samples
    assert "### Input:" not in no_input.text and "### Input:" in with_input.text
    assert no_input.text.endswith("### Instruction:\nName a colour\n\n### Response:\nBlue")
    assert preview.stats["matched_keys"] == {"instruction,output": 1, "instruction,input,output": 1}
    assert preview.problems == []


@pytest.mark.parametrize("value", [5, 1.5, None, True, [], ["a"], {"x": "y"}])
def test_non_string_values_do_not_count_as_fields(home, tokenizer, value):
    rows = [{"instruction": "Name a colour", "input": value, "output": "Blue", "id": 7}]
    preview = build(home, tokenizer, rows)
    assert preview.stats["matched_keys"] == {"instruction,output": 1}
    assert "### Input:" not in preview.samples[0].text


def test_placeholders_inside_values_are_not_substituted_again(home, tokenizer):
    rows = [{"instruction": "Explain %output% in a template", "output": "It is replaced by the answer."}]
    preview = build(home, tokenizer, rows, CHATBOT, add_eos_token=False)
    assert preview.samples[0].text == ("User: Explain %output% in a template\n"
                                       "Assistant: It is replaced by the answer.")


def test_unmatched_rows_are_reported_with_index_and_fields(home, tokenizer):
    rows = [{"instruction": "a", "output": "b"},
            {"question": "What port?", "answer": "8501"},
            {"instruction": "c", "output": "d"},
            {"instruction": "Only an instruction", "output": ""},
            {"instruction": "e", "input": "f", "output": "g"}]
    preview = build(home, tokenizer, rows)
    assert [s.source for s in preview.samples] == ["row 0", "row 2", "row 4"]
    unmatched = [p for p in preview.problems if p.reason.startswith("unmatched")]
    assert [(p.index, p.fields) for p in unmatched] == [(1, ["answer", "question"]), (3, ["instruction"])]
    assert [p.where for p in unmatched] == ["row 1", "row 3"]
    assert preview.stats["unmatched_rows"] == 2 and preview.stats["rows"] == 5
    error = unmatched_rows_error(preview)
    assert isinstance(error, DashboardError) and error.field == "skip_unmatched_rows"
    assert "2 rows" in error.message
    assert "1 {answer, question}" in error.message and "3 {instruction}" in error.message
    clean = build(home, tokenizer, [rows[0], rows[2]])
    assert unmatched_rows_error(clean) is None


def test_unmatched_rows_error_names_ten_and_counts_the_rest(home, tokenizer):
    rows = [{"instruction": "a", "output": "b"}] + [{"q": f"{i}"} for i in range(13)]
    error = unmatched_rows_error(build(home, tokenizer, rows))
    assert "13 rows" in error.message and "and 3 more" in error.message
    assert "10 {q}" in error.message and "11 {q}" not in error.message


def test_no_row_matching_is_an_error(home, tokenizer):
    rows = [{"question": "q", "answer": "a"}, {"prompt": "p"}]
    # The preview lists the rows; a run refuses to start on an empty sample list.
    preview = build(home, tokenizer, rows)
    assert preview.samples == [] and [p.index for p in preview.problems] == [0, 1]
    assert all(p.reason.startswith("unmatched") for p in preview.problems)
    assert "every row was unmatched" in no_samples_error(preview).message
    preview = build(home, tokenizer, [{"instruction": "a", "output": "b"}], fmt=None)
    assert preview.samples == [] and preview.problems[0].reason == "unmatched: no format file chosen"


# ---------------------------------------------------------------------------------------------
# Chat rows


def test_chat_rows_use_the_chat_template_and_train_only_the_answers(home, tokenizer):
    messages = [{"role": "user", "content": "What does the overlap length do?"},
                {"role": "assistant", "content": "It makes consecutive chunks share tokens."},
                {"role": "user", "content": "And the hard cut string?"},
                {"role": "assistant", "content": "No chunk crosses it."}]
    rows = [{"messages": messages[:2]}, {"messages": messages}, {"instruction": "a", "output": "b"}]
    preview = build(home, tokenizer, rows, add_eos_token=False)
    assert preview.stats["matched_keys"] == {"messages (chat template)": 2, "instruction,output": 1}
    one, two, _ = preview.samples
    assert one.text == tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert one.input_ids == tokenizer(one.text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(trained_ids(one)) == "It makes consecutive chunks share tokens.<|im_end|>\n"
    masked = tokenizer.decode(masked_ids(one))
    assert "What does the overlap length do?" in masked and "share tokens" not in masked
    trained = tokenizer.decode(trained_ids(two))
    assert "It makes consecutive chunks share tokens." in trained and "No chunk crosses it." in trained
    assert "overlap length" not in trained and "hard cut" not in trained and "user" not in trained
    assert all(label == IGNORE_INDEX for label, m in zip(two.labels(), two.label_mask) if not m)
    assert two.labels()[-1] == two.input_ids[-1]


def test_chat_row_starting_with_the_assistant_does_not_train_the_system_prompt(home, tokenizer):
    rows = [{"messages": [{"role": "assistant", "content": "Welcome to the dashboard."}]}]
    preview = build(home, tokenizer, rows, add_eos_token=False)
    sample = preview.samples[0]
    assert "system" in sample.text
    assert tokenizer.decode(trained_ids(sample)) == "Welcome to the dashboard.<|im_end|>\n"


def test_bad_chat_rows_are_listed_not_fatal(home, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    preview = build(home, tokenizer, rows)
    assert [s.source for s in preview.samples] == ["row 2"]
    assert [p.index for p in preview.problems] == [0, 1]
    assert all(p.reason.startswith("chat row not used") for p in preview.problems)
    assert "no assistant message" in preview.problems[0].reason
    assert preview.stats["chat_rows_skipped"] == 2


# ---------------------------------------------------------------------------------------------
# Train only after


def check_masked_after(tokenizer, sample, marker_end: int, eos: bool) -> None:
    """Every token starting before the end of the marker is masked (-100); every token after is trained."""
    encoded = tokenizer(sample.text, add_special_tokens=False, return_offsets_mapping=True)
    body = sample.input_ids[:-1] if eos else sample.input_ids
    assert body == encoded["input_ids"]
    for (start, end), m, label, token in zip(encoded["offset_mapping"], sample.label_mask, sample.labels(), body):
        if start < marker_end:
            assert m == 0 and label == IGNORE_INDEX, (start, end, sample.text[start:end])
        else:
            assert m == 1 and label == token
    if eos:
        assert sample.input_ids[-1] == tokenizer.eos_token_id and sample.label_mask[-1] == 1


def test_train_only_after_masks_the_prompt(home, tokenizer):
    rows = [{"instruction": "Name the three pages", "output": "Data, Train and Evaluate."},
            {"instruction": "Translate", "input": "Bonjour", "output": "Hello"}]
    preview = build(home, tokenizer, rows, CHATBOT, train_only_after="Assistant:")
    for row, sample in zip(rows, preview.samples):
        marker_end = sample.text.index("Assistant:") + len("Assistant:")
        check_masked_after(tokenizer, sample, marker_end, eos=True)
        assert tokenizer.decode(trained_ids(sample)[:-1]) == " " + row["output"]
        assert sample.labels()[:3] == [IGNORE_INDEX] * 3


def test_train_only_after_uses_the_marker_of_the_template_not_one_in_the_row(home, tokenizer):
    rows = [{"instruction": "What does Assistant: mean in a format file?",
             "output": "It marks where the answer starts."},
            {"instruction": "Render this", "input": "User: x\nAssistant: y", "output": "Done."}]
    preview = build(home, tokenizer, rows, CHATBOT, train_only_after="Assistant:", add_eos_token=False)
    for row, sample in zip(rows, preview.samples):
        assert tokenizer.decode(trained_ids(sample)) == " " + row["output"]
        marker_end = sample.text.rindex("\nAssistant:") + len("\nAssistant:")
        check_masked_after(tokenizer, sample, marker_end, eos=False)


def test_train_only_after_falls_back_to_the_rows_text(home, tokenizer):
    # The marker is not in the template at all, only in the values: the first one counts.
    fmt = {"instruction,output": "%instruction%\n%output%"}
    rows = [{"instruction": "Q: why?", "output": "A: because."}]
    preview = build(home, tokenizer, rows, fmt, train_only_after="A:", add_eos_token=False)
    assert tokenizer.decode(trained_ids(preview.samples[0])) == " because."


def test_rows_without_the_marker_are_problems(home, tokenizer):
    fmt = {"instruction,output": "User: %instruction%\nAssistant: %output%", "question,answer": "Q: %question%\nA: %answer%"}
    rows = [{"instruction": "a", "output": "b"}, {"question": "c", "answer": "d"}]
    preview = build(home, tokenizer, rows, fmt, train_only_after="Assistant:")
    assert [s.source for s in preview.samples] == ["row 0"]
    assert [(p.index, p.fields) for p in preview.problems] == [(1, ["answer", "question"])]
    assert "train-only-after" in preview.problems[0].reason
    assert unmatched_rows_error(preview) is None  # a missing marker is not an unmatched row


# ---------------------------------------------------------------------------------------------
# Overlong samples, EOS and BOS


LONG = {"instruction": "Tell a long story", "output": " ".join(f"word{i}" for i in range(200))}
SHORT = {"instruction": "Short", "output": "ok"}


def test_overlong_samples_are_truncated_without_eos(home, tokenizer):
    preview = build(home, tokenizer, [LONG, SHORT], CHATBOT, cutoff_len=32)
    long, short = preview.samples
    full = tokenizer("User: Tell a long story\nAssistant: " + LONG["output"], add_special_tokens=False)["input_ids"]
    assert long.truncated and long.n_tokens == 32 and long.input_ids == full[:32]
    assert tokenizer.decode(long.input_ids).startswith(long.text)
    assert long.input_ids[-1] != tokenizer.eos_token_id
    assert not short.truncated and short.input_ids[-1] == tokenizer.eos_token_id
    assert preview.stats["truncated_samples"] == 1 and preview.stats["dropped_overlong"] == 0
    assert preview.stats["max_tokens"] == 32


def test_overlong_samples_are_dropped_by_choice(home, tokenizer):
    preview = build(home, tokenizer, [LONG, SHORT], CHATBOT, cutoff_len=32, overlong_samples="drop")
    assert [s.source for s in preview.samples] == ["row 1"]
    assert preview.stats["dropped_overlong"] == 1 and preview.stats["truncated_samples"] == 0
    assert [p.index for p in preview.problems] == [0] and "over the cutoff length 32" in preview.problems[0].reason


def test_truncation_that_leaves_nothing_trained_drops_the_row(home, tokenizer):
    rows = [{"instruction": LONG["output"], "output": "the answer"}, SHORT]
    preview = build(home, tokenizer, rows, CHATBOT, cutoff_len=32, train_only_after="Assistant:")
    assert [s.source for s in preview.samples] == ["row 1"]
    assert [p.index for p in preview.problems] == [0]
    assert "no trained tokens" in preview.problems[0].reason


def test_a_sample_that_fits_exactly_keeps_its_eos(home, tokenizer):
    row = {"instruction": "Name the pages", "output": "Data, Train, Evaluate"}
    text = "User: Name the pages\nAssistant: Data, Train, Evaluate"
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    preview = build(home, tokenizer, [row], CHATBOT, cutoff_len=max(8, n + 1))
    sample = preview.samples[0]
    assert sample.n_tokens == n + 1 and not sample.truncated
    assert sample.input_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("add_eos", [True, False])
@pytest.mark.parametrize("add_bos", [True, False])
def test_eos_and_bos_options(home, tokenizer, add_eos, add_bos):
    preview = build(home, tokenizer, [SHORT], CHATBOT, add_eos_token=add_eos, add_bos_token=add_bos)
    sample = preview.samples[0]
    ids = tokenizer(sample.text, add_special_tokens=False)["input_ids"]
    expected = ([tokenizer.bos_token_id] if add_bos else []) + ids + ([tokenizer.eos_token_id] if add_eos else [])
    assert sample.input_ids == expected
    assert sample.label_mask == ([0] if add_bos else []) + [1] * (len(ids) + add_eos)
    if add_eos:
        assert sample.labels()[-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------
# Broken files


@pytest.mark.parametrize("content, message", [
    ('["instruction,output"]', "must be a JSON object"),
    ("{}", "must be a JSON object"),
    ('{"instruction,output": "%instruction% %input% %output%"}', "%input%"),
    ('{"instruction,output": 5}', "must be a string"),
    ('{" , ": "x"}', "lists no fields"),
    ('{"instruction,output": "x"', "not valid JSON"),
])
def test_broken_format_files(home, tokenizer, content, message):
    name = write_format(home, content, "broken-format")
    with pytest.raises(DashboardError, match=message):
        load_format(home / "formats" / f"{name}.json")
    with pytest.raises(DashboardError, match=message):
        build(home, tokenizer, [SHORT], name)


def test_missing_format_file(home, tokenizer):
    with pytest.raises(DashboardError, match="Format file not found"):
        build(home, tokenizer, [SHORT], "no-such-format")


@pytest.mark.parametrize("name, content, message", [
    ("broken.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c",\n{"x": 1}\n', r"broken.jsonl, line 3"),
    ("object.json", '{"instruction": "a", "output": "b"}', "must hold a JSON list of objects"),
    ("numbers.json", "[1, 2]", "row 0 is an int, not an object"),
    ("mixed.jsonl", '{"instruction": "a", "output": "b"}\n[1]\n', "row 1 is a list"),
    ("empty.json", "[]", "holds no rows"),
    ("bad.json", '[{"instruction": "a",\n "output": }]', r"not valid JSON.*line 2"),
])
def test_broken_datasets(home, tokenizer, name, content, message):
    (home / "datasets" / name).write_text(content, encoding="utf-8")
    with pytest.raises(DashboardError, match=message):
        load_rows(home / "datasets" / name)
    with pytest.raises(DashboardError, match=message):
        build_samples(TrainingParameters(dataset=name, format="alpaca-format"), tokenizer)


def test_deeply_nested_json_is_a_dashboard_error(home):
    path = home / "datasets" / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(DashboardError):
        load_rows(path)


def test_non_utf8_dataset_names_the_byte(home, tokenizer):
    (home / "datasets" / "latin1.json").write_bytes(b'[{"instruction": "caf\xe9", "output": "x"}]')
    with pytest.raises(DashboardError, match="byte offset 21"):
        build_samples(TrainingParameters(dataset="latin1", format="alpaca-format"), tokenizer)


def test_jsonl_rows(home, tokenizer):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    preview = build(home, tokenizer, rows, name="rows.jsonl")
    assert preview.stats["rows"] == 2 and len(preview.samples) == 2


# ---------------------------------------------------------------------------------------------
# Shipped files


SHIPPED = sorted((CODE_ROOT / "formats").glob("*.json"))


def test_the_required_format_files_ship():
    names = {p.name for p in SHIPPED}
    assert {"alpaca-format.json", "alpaca-chatbot-format.json"} <= names
    assert any("chatml" in n for n in names) and any("vicuna" in n for n in names)
    chatbot = json.loads((CODE_ROOT / "formats" / "alpaca-chatbot-format.json").read_text(encoding="utf-8"))
    assert chatbot["instruction,output"] == "User: %instruction%\nAssistant: %output%"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_format_files_load_and_render(home, tokenizer, path):
    fmt = load_format(path)
    assert fmt.entries
    rows = [{"instruction": "Do it", "output": "Done"}, {"instruction": "Do it", "input": "now", "output": "Done"}]
    assert all(fmt.match(r) is not None for r in rows)
    preview = build(home, tokenizer, rows, path.stem)
    for sample in preview.samples:
        assert "%" not in sample.text and "Done" in sample.text


def test_demo_instructions_render_with_exactly_the_odd_rows_reported(home, tokenizer):
    rows = json.loads((CODE_ROOT / "datasets" / "dashboard-instructions.json").read_text(encoding="utf-8"))
    assert len(rows) >= 40
    # The set's deliberately odd rows: one with other field names, one whose output is empty.
    odd = {i: sorted(k for k, v in r.items() if isinstance(v, str) and v.strip()) for i, r in enumerate(rows)
           if "question" in r or r.get("output") == ""}
    assert len(odd) == 2, odd
    preview = build_samples(TrainingParameters(dataset="dashboard-instructions", format="alpaca-format",
                                               cutoff_len=512), tokenizer)
    assert {p.index: p.fields for p in preview.problems} == odd
    assert all(p.reason.startswith("unmatched") for p in preview.problems)
    assert preview.stats["rows"] == len(rows)
    assert preview.stats["samples"] == len(rows) - len(odd)
    assert preview.stats["truncated_samples"] == 0
    error = unmatched_rows_error(preview)
    for index, fields in odd.items():
        assert f"{index} {{{', '.join(fields)}}}" in error.message
    # With "train only after", the answers (and only they) are trained.
    masked = build_samples(TrainingParameters(dataset="dashboard-instructions", format=CHATBOT, cutoff_len=512,
                                              train_only_after="Assistant:", add_eos_token=False), tokenizer)
    by_source = {s.source: s for s in masked.samples}
    for index, row in enumerate(rows):
        if index not in odd:
            assert tokenizer.decode(trained_ids(by_source[f"row {index}"])) == " " + row["output"]
