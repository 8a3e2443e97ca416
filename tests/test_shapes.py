"""Every common dataset shape, recognised and said: ShareGPT, OpenAI messages (system turn, multi-turn),
prompt/completion, text rows, CSV, TSV, Parquet and .md files, each built from a small file written here,
checked for its samples, its masks and the recognised-shape sentence, and the same through
`python -m trainer preview --dataset FILE --json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.data import IGNORE_INDEX, build_samples, unmatched_rows_error
from trainer.datafiles import dataset_kind, dataset_names, load_rows
from trainer.errors import DashboardError
from trainer.params import FIELDS, TrainingParameters

SYSTEM = {"role": "system", "content": "You answer questions about the dashboard."}
TURNS = [{"role": "user", "content": "What does the overlap length do?"},
         {"role": "assistant", "content": "It makes consecutive chunks share tokens."},
         {"role": "user", "content": "And the hard cut string?"},
         {"role": "assistant", "content": "No chunk crosses it."}]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def params(**options) -> TrainingParameters:
    """Parameters with options that trainer/params.py may not define yet set as attributes (read with getattr)."""
    known = {k: v for k, v in options.items() if k in FIELDS}
    known.setdefault("cutoff_len", 256)
    known.setdefault("overlap_len", 0)
    built = TrainingParameters(**known)
    for name, value in options.items():
        if name not in FIELDS:
            setattr(built, name, value)
    return built


def write_jsonl(home: Path, name: str, rows: list) -> str:
    (home / "datasets" / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return name


def trained_text(tokenizer, sample) -> str:
    return tokenizer.decode([t for t, m in zip(sample.input_ids, sample.label_mask) if m])


def masked_text(tokenizer, sample) -> str:
    return tokenizer.decode([t for t, m in zip(sample.input_ids, sample.label_mask) if not m])


def sharegpt(messages: list[dict]) -> dict:
    return {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]}


# ---------------------------------------------------------------------------------------------
# Chat rows


def test_sharegpt_rows_are_mapped_rendered_and_said(home, tokenizer):
    rows = [sharegpt([SYSTEM, *TURNS[:2]]), sharegpt(TURNS)]
    name = write_jsonl(home, "sharegpt.jsonl", rows)
    preview = build_samples(params(dataset=name), tokenizer)
    assert preview.problems == [] and len(preview.samples) == 2
    first, second = preview.samples
    assert first.text == tokenizer.apply_chat_template([SYSTEM, *TURNS[:2]], tokenize=False)
    assert second.text == tokenizer.apply_chat_template(TURNS, tokenize=False)
    assert trained_text(tokenizer, first) == "It makes consecutive chunks share tokens.<|im_end|>\n"
    assert "You answer questions" in masked_text(tokenizer, first)
    assert preview.stats["matched_keys"] == {"conversations (chat template)": 2}
    assert preview.shape.startswith(
        "ShareGPT conversations (from/value): 2 rows; system/human/gpt mapped to system/user/assistant; rendered "
        "with the model's chat template, assistant turns trained.")


def test_sharegpt_role_names_that_are_not_mapped_are_reported_with_the_row(home, tokenizer):
    rows = [sharegpt(TURNS[:2]),
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "bing", "value": "hello"}]},
            {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}]
    preview = build_samples(params(dataset=write_jsonl(home, "odd.jsonl", rows)), tokenizer)
    assert [s.source for s in preview.samples] == ["row 0"]
    bing, missing = preview.problems
    assert (bing.index, bing.where, bing.fields) == (1, "row 1", ["conversations"])
    assert bing.reason.startswith("chat row not used: turn 1 has the role 'bing', which is not mapped")
    assert missing.index == 2 and "turn 0 needs a string 'from' and 'value'" in missing.reason
    assert preview.stats["chat_rows_skipped"] == 2 and preview.stats["unmatched_rows"] == 0
    assert "2 rows of chat not used" in preview.shape


def test_messages_with_a_system_turn_train_only_the_reply(home, tokenizer):
    row = {"messages": [SYSTEM, *TURNS[:2]]}
    preview = build_samples(params(dataset=write_jsonl(home, "system.jsonl", [row])), tokenizer)
    sample = preview.samples[0]
    assert sample.text == tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert sample.input_ids == tokenizer(sample.text, add_special_tokens=False)["input_ids"]
    assert trained_text(tokenizer, sample) == "It makes consecutive chunks share tokens.<|im_end|>\n"
    masked = masked_text(tokenizer, sample)
    assert "You answer questions about the dashboard." in masked and "What does the overlap" in masked
    assert "assistant\n" in masked  # the role header is context
    assert preview.shape.startswith("OpenAI messages (role/content): 1 row, 1 with a system turn; rendered with "
                                    "the model's chat template, assistant turns trained.")


def test_multi_turn_messages_train_every_reply_or_the_last_one(home, tokenizer):
    name = write_jsonl(home, "multi.jsonl", [{"messages": TURNS}])
    every = build_samples(params(dataset=name), tokenizer).samples[0]
    assert trained_text(tokenizer, every) == ("It makes consecutive chunks share tokens.<|im_end|>\n"
                                              "No chunk crosses it.<|im_end|>\n")
    last = build_samples(params(dataset=name, train_last_turn_only=True), tokenizer)
    assert last.samples[0].input_ids == every.input_ids
    assert trained_text(tokenizer, last.samples[0]) == "No chunk crosses it.<|im_end|>\n"
    assert "1 row, 1 multi-turn" in last.shape and "the last assistant turn trained" in last.shape
    labels = last.samples[0].labels()
    assert labels.count(IGNORE_INDEX) == len(labels) - last.samples[0].n_trained


# ---------------------------------------------------------------------------------------------
# Prompt/completion and text rows


def test_prompt_completion_rows_train_the_completion(home, tokenizer):
    rows = [{"prompt": "Question: what port does the app use?\nAnswer:", "completion": " 8501."},
            {"prompt": [{"role": "user", "content": "Name the pages."}],
             "completion": [{"role": "assistant", "content": "Data, Train and Evaluate."}]}]
    preview = build_samples(params(dataset=write_jsonl(home, "pc.jsonl", rows)), tokenizer)
    plain, chat = preview.samples
    assert plain.text == rows[0]["prompt"] + rows[0]["completion"]
    assert plain.input_ids[-1] == tokenizer.eos_token_id and plain.label_mask[-1] == 1
    assert trained_text(tokenizer, plain) == " 8501.<|im_end|>"
    assert masked_text(tokenizer, plain) == rows[0]["prompt"]
    messages = rows[1]["prompt"] + rows[1]["completion"]
    assert chat.text == tokenizer.apply_chat_template(messages, tokenize=False)
    assert trained_text(tokenizer, chat) == "Data, Train and Evaluate.<|im_end|>\n"
    assert preview.stats["matched_keys"] == {"prompt/completion": 1, "prompt/completion (chat template)": 1}
    assert preview.shape.startswith("Prompt/completion rows (TRL convention): 2 rows; the prompt is context, "
                                    "the completion is trained")


def test_text_rows_are_chunked_exactly_as_raw_text(home, tokenizer):
    guide = (home / "datasets" / "user-guide.txt").read_text(encoding="utf-8")
    first, second = sorted((part.strip() for part in guide.split("\n\n\n")), key=len, reverse=True)[:2]
    (home / "datasets" / "first.txt").write_text(first, encoding="utf-8")
    name = write_jsonl(home, "texts.jsonl", [{"text": first}, {"text": second}, {"text": "tiny"}])
    options = dict(cutoff_len=48, overlap_len=12, min_chars=10)
    preview = build_samples(params(dataset=name, **options), tokenizer)
    raw = build_samples(params(raw_text_file="first.txt", **options), tokenizer)
    from_first = [s for s in preview.samples if s.source.startswith("row 0 ")]
    assert len(from_first) > 2, "a long row is cut into several chunks"
    assert [s.input_ids for s in from_first] == [s.input_ids for s in raw.samples]
    assert [s.overlap for s in from_first] == [s.overlap for s in raw.samples]
    assert [s.source for s in from_first] == [f"row 0 chunk {i}" for i in range(len(from_first))]
    assert all(s.n_tokens <= 48 and s.n_trained == s.n_tokens for s in preview.samples)
    assert [(p.index, p.reason) for p in preview.problems] == [
        (2, "dropped: only 4 characters (minimum block size 10)")]
    assert preview.kind == "raw" and preview.stats["blocks"] == 3 and preview.stats["kept_blocks"] == 2
    assert preview.shape.startswith('Text rows ({"text": ...}): 3 rows, each a document chunked with the raw-text '
                                    'rules (cutoff 48, overlap 12, hard cut string, minimum block size 10).')


def test_a_text_row_is_cut_at_the_hard_cut_string(home, tokenizer):
    name = write_jsonl(home, "cut.jsonl", [{"text": "First part of the row.\n\n\nSecond part of the row."}])
    preview = build_samples(params(dataset=name), tokenizer)
    assert [s.text for s in preview.samples] == ["First part of the row.", "Second part of the row."]
    assert [s.source for s in preview.samples] == ["row 0 block 0 chunk 0", "row 0 block 1 chunk 0"]
    assert all(s.input_ids[-1] == tokenizer.eos_token_id for s in preview.samples)


# ---------------------------------------------------------------------------------------------
# Unrecognised rows


def test_a_row_of_no_recognised_shape_names_its_fields_and_a_hint(home, tokenizer):
    rows = [{"conversation": [{"speaker": "a", "line": "hi"}], "id": 3},
            {"question": "What port?", "answer": "8501"},
            {"prompt": "only a prompt"}]
    preview = build_samples(params(dataset=write_jsonl(home, "odd.jsonl", rows)), tokenizer)
    assert preview.samples == []
    lists, pair, prompt = preview.problems
    assert lists.fields == ["conversation", "id"]
    assert "{}" not in lists.reason
    assert "its fields are conversation (a list), id (a number)" in lists.reason
    assert "'messages' list of role/content turns" in lists.reason
    assert (pair.fields, pair.reason) == (["answer", "question"], "unmatched: no format file chosen")
    assert prompt.fields == ["prompt"] and prompt.reason == "unmatched: no format file chosen"
    assert "conversation (a list), id (a number)" in preview.shape
    assert "fields answer, question: choose a format file whose key lists them, or rename them prompt and " \
           "completion" in preview.shape
    error = unmatched_rows_error(preview)
    assert error is not None and "0 {conversation, id}" in error.message


def test_a_format_file_that_matches_no_row_lists_its_keys(home, tokenizer):
    name = write_jsonl(home, "qa.jsonl", [{"question": "What port?", "answer": "8501"}])
    preview = build_samples(params(dataset=name, format="alpaca-format"), tokenizer)
    reason = preview.problems[0].reason
    assert reason.startswith("unmatched: no key of the format file matches its fields {answer, question}")
    assert "its keys: instruction,output" in reason
    assert "1 row with fields answer, question match no key of the format alpaca-format." in preview.shape


# ---------------------------------------------------------------------------------------------
# Tables and .md files


ALPACA_ROWS = [{"instruction": "Name the pages", "input": "", "output": "Data, Train and Evaluate."},
               {"instruction": "Translate", "input": "Bonjour, le monde", "output": "Hello, world"}]


def test_a_csv_table_is_rows_for_a_format_file(home, tokenizer):
    import pandas as pd

    pd.DataFrame(ALPACA_ROWS).to_csv(home / "datasets" / "alpaca.csv", index=False)
    assert load_rows(home / "datasets" / "alpaca.csv") == ALPACA_ROWS
    table = build_samples(params(dataset="alpaca.csv", format="alpaca-format"), tokenizer)
    as_json = build_samples(params(dataset=write_jsonl(home, "alpaca.jsonl", ALPACA_ROWS), format="alpaca-format"),
                            tokenizer)
    assert [s.input_ids for s in table.samples] == [s.input_ids for s in as_json.samples]
    assert [s.label_mask for s in table.samples] == [s.label_mask for s in as_json.samples]
    assert table.stats["matched_keys"] == {"instruction,output": 1, "instruction,input,output": 1}
    assert table.shape.startswith("CSV table with columns instruction, input, output: Format-file records: 2 rows "
                                  "rendered with the format alpaca-format")


def test_csv_columns_named_as_a_shape_map_onto_it(home, tokenizer):
    import pandas as pd

    chat = json.dumps([TURNS[0], TURNS[1]])
    pd.DataFrame([{"prompt": "2 + 2 =", "completion": " 4"}]).to_csv(home / "datasets" / "pc.csv", index=False)
    pd.DataFrame([{"messages": chat, "id": "7"}]).to_csv(home / "datasets" / "chat.csv", index=False)
    pc = build_samples(params(dataset="pc.csv"), tokenizer)
    assert trained_text(tokenizer, pc.samples[0]) == " 4<|im_end|>"
    assert pc.shape.startswith("CSV table with columns prompt, completion: Prompt/completion rows")
    chat_preview = build_samples(params(dataset="chat.csv"), tokenizer)
    assert chat_preview.samples[0].text == tokenizer.apply_chat_template(TURNS[:2], tokenize=False)
    assert chat_preview.shape.startswith("CSV table with columns messages, id: OpenAI messages")


def test_a_tsv_table_of_text_rows(home, tokenizer):
    (home / "datasets" / "notes.tsv").write_text("text\tsource\nA line, with a comma. Another line.\tguide\n",
                                                 encoding="utf-8")
    preview = build_samples(params(dataset="notes.tsv"), tokenizer)
    assert [s.text for s in preview.samples] == ["A line, with a comma. Another line."]
    assert preview.kind == "raw"
    assert preview.shape.startswith('TSV table with columns text, source: Text rows ({"text": ...}): 1 row')


def test_a_parquet_table_of_messages_equals_the_same_jsonl(home, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [SYSTEM, *TURNS[:2]]}, {"messages": TURNS}]
    pq.write_table(pa.Table.from_pylist(rows), home / "datasets" / "chats.parquet")
    table = build_samples(params(dataset="chats.parquet"), tokenizer)
    as_json = build_samples(params(dataset=write_jsonl(home, "chats.jsonl", rows)), tokenizer)
    assert [s.input_ids for s in table.samples] == [s.input_ids for s in as_json.samples]
    assert [s.label_mask for s in table.samples] == [s.label_mask for s in as_json.samples]
    assert table.shape == "Parquet table with columns messages: " + as_json.shape


def test_a_markdown_file_is_raw_text(home, tokenizer):
    (home / "datasets" / "notes.md").write_text("# Notes\n\nThe overlap length shares tokens.\n", encoding="utf-8")
    assert dataset_kind(home / "datasets" / "notes.md") == "raw"
    preview = build_samples(params(dataset="notes.md"), tokenizer)
    assert preview.kind == "raw" and preview.samples[0].text == "# Notes\n\nThe overlap length shares tokens."
    assert preview.shape.startswith("Raw text: 1 file(s), 1 block(s)")
    same = build_samples(params(raw_text_file="notes.md"), tokenizer)
    assert [s.input_ids for s in same.samples] == [s.input_ids for s in preview.samples]


def test_md_and_tables_are_listed_as_datasets(home):
    for name in ("notes.md", "a.csv", "b.tsv", "c.parquet", "d.xlsx"):
        (home / "datasets" / name).write_text("x", encoding="utf-8")
    assert {"notes.md"} <= set(dataset_names("raw"))
    assert {"a.csv", "b.tsv", "c.parquet"} <= set(dataset_names("formatted"))
    assert "d.xlsx" not in dataset_names()


@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", "", "holds no rows"),
    ("header.csv", "instruction,output\n", "holds no rows"),
    ("ragged.csv", "a,b\n1,2\n3,4,5,6\n", "not a readable CSV table"),
    ("noname.csv", "a,\n1,2\n", r"1 column\(s\) have no name"),
    ("broken.parquet", "not parquet at all", "not a readable Parquet file"),
])
def test_broken_tables_are_named(home, tokenizer, name, content, message):
    (home / "datasets" / name).write_text(content, encoding="utf-8")
    with pytest.raises(DashboardError, match=message):
        build_samples(params(dataset=name, format="alpaca-format"), tokenizer)


# ---------------------------------------------------------------------------------------------
# The command line gives the same samples


def test_preview_on_the_command_line_gives_the_same_samples_and_sentence(home, tokenizer):
    import pandas as pd

    from tests.test_cli_preview import finish, start

    write_jsonl(home, "sharegpt.jsonl", [sharegpt([SYSTEM, *TURNS]), sharegpt(TURNS[:2])])
    pd.DataFrame([{"prompt": "2 + 2 =", "completion": " 4"}, {"prompt": "3 + 3 =", "completion": " 6"}]).to_csv(
        home / "datasets" / "sums.csv", index=False)
    processes = {name: start(home, "--dataset", name, "--cutoff-len", "128", "--json")
                 for name in ("sharegpt.jsonl", "sums.csv")}
    for name, process in processes.items():
        code, out, err = finish(process)
        assert code == 0, err
        printed = json.loads(out)
        expected = build_samples(TrainingParameters(dataset=name, cutoff_len=128), tokenizer)
        assert printed == json.loads(json.dumps(expected.to_json()))
        assert printed["shape"] == expected.shape and printed["samples"]
        assert all(0 in s["label_mask"] and 1 in s["label_mask"] for s in printed["samples"])


# ---------------------------------------------------------------------------------------------
# The command line and the Data page agree on every shape


def _guide_blocks(home: Path, count: int) -> list[str]:
    guide = (home / "datasets" / "user-guide.txt").read_text(encoding="utf-8")
    return sorted((part.strip() for part in guide.split("\n\n\n")), key=len, reverse=True)[:count]


def _write_shape(home: Path, shape: str) -> str:
    """A small file of this shape in datasets/; returns its name."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets = home / "datasets"
    if shape == "sharegpt":
        return write_jsonl(home, "sharegpt.jsonl", [sharegpt([SYSTEM, *TURNS]), sharegpt(TURNS[:2])])
    if shape == "system":
        return write_jsonl(home, "system.jsonl", [{"messages": [SYSTEM, *TURNS[:2]]}, {"messages": TURNS[:2]}])
    if shape == "multi-turn":
        return write_jsonl(home, "multi.jsonl", [{"messages": TURNS}, {"messages": TURNS[2:]}])
    if shape == "prompt-completion":
        return write_jsonl(home, "pc.jsonl", [
            {"prompt": "Question: what port does the app use?\nAnswer:", "completion": " 8501."},
            {"prompt": [TURNS[0]], "completion": [TURNS[1]]}])
    if shape == "text":
        return write_jsonl(home, "texts.jsonl", [{"text": block} for block in _guide_blocks(home, 2)])
    if shape == "csv":
        pd.DataFrame(ALPACA_ROWS).to_csv(datasets / "alpaca.csv", index=False)
        return "alpaca.csv"
    if shape == "tsv":
        pd.DataFrame([{"text": block, "source": "guide"} for block in _guide_blocks(home, 2)]).to_csv(
            datasets / "notes.tsv", sep="\t", index=False)
        return "notes.tsv"
    if shape == "parquet":
        pq.write_table(pa.Table.from_pylist([{"messages": [SYSTEM, *TURNS[:2]]}, {"messages": TURNS}]),
                       datasets / "chats.parquet")
        return "chats.parquet"
    (datasets / "notes.md").write_text("# Notes\n\n" + "\n\n".join(_guide_blocks(home, 1)), encoding="utf-8")
    return "notes.md"


# What the recognised-shape sentence must say for each (beyond the page and the command line agreeing).
SAID = {"sharegpt": "ShareGPT conversations (from/value): 2 rows; system/human/gpt mapped to system/user/assistant",
        "system": "OpenAI messages (role/content): 2 rows, 1 with a system turn",
        "multi-turn": "OpenAI messages (role/content): 2 rows, 1 multi-turn",
        "prompt-completion": "Prompt/completion rows (TRL convention): 2 rows",
        "text": 'Text rows ({"text": ...}): 2 rows, each a document chunked with the raw-text rules (cutoff 96, '
                'overlap 24',
        "csv": "CSV table with columns instruction, input, output: Format-file records: 2 rows rendered with the "
               "format alpaca-format",
        "tsv": 'TSV table with columns text, source: Text rows ({"text": ...}): 2 rows',
        "parquet": "Parquet table with columns messages: OpenAI messages (role/content): 2 rows",
        "md": "Raw text: 1 file(s)"}


def _cli_args(options: dict) -> list[str]:
    """The Data page's options (as it hands them to the Train page) as `python -m trainer preview` flags."""
    from tests.test_cli_preview import argv

    options = dict(options)
    return ["--model", options.pop("base_model"), *argv(options)]


@pytest.mark.parametrize("shape", list(SAID))
def test_the_command_line_and_the_data_page_agree(home, shape):
    from tests.test_cli_preview import finish, start
    from tests.test_data_page import metrics, number, open_page

    name = _write_shape(home, shape)
    at = open_page()
    raw = shape == "md"
    at.radio(key="dp_mode").set_value("Raw text" if raw else "Formatted JSON").run()
    at.selectbox(key="dp_dataset_raw" if raw else "dp_dataset_formatted").set_value(name)
    at.number_input(key="dp_cutoff_len").set_value(96).run()
    if raw or shape in ("text", "tsv"):  # the raw-text rules are offered, and given to both
        at.number_input(key="dp_overlap_len").set_value(24).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    options = at.session_state["data_options"]
    assert options["raw_text_file" if raw else "dataset"] == name
    process = start(home, *_cli_args(options), "--json")
    shown = metrics(at)
    [sentence] = [i.value for i in at.info if i.icon == "🔎"]
    code, out, err = finish(process)
    assert code == 0, err
    printed = json.loads(out)
    assert number(shown["Samples"]) == printed["stats"]["samples"] == len(printed["samples"]) > 0
    assert number(shown["Trained tokens"]) == printed["stats"]["trained_tokens"] > 0
    assert number(shown["Tokens"]) == printed["stats"]["tokens"]
    assert sentence == printed["shape"]
    assert sentence.startswith(SAID[shape]), sentence
    if shape in ("text", "tsv", "md"):
        assert len(printed["samples"]) > 2 and any(s["overlap"] for s in printed["samples"]), \
            "the long documents are chunked with the overlap asked for"
