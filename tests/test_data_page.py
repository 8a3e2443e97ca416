"""The Data page driven through streamlit.testing.v1.AppTest: raw and formatted previews, the errors it
shows (overlap >= cutoff, non-UTF-8 file, malformed JSON, a format file matching nothing), masked
tokens, paging and uploads. Every run uses a temporary home folder (the `home` fixture)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from trainer.data import build_samples
from trainer.params import TrainingParameters

PAGE = Path(__file__).resolve().parent.parent / "views" / "data.py"


def open_page(**state) -> AppTest:
    at = AppTest.from_file(str(PAGE), default_timeout=60)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def number(text: str) -> float:
    return float(text.replace(",", ""))


def samples_html(at: AppTest) -> str:
    blocks = [h.value for h in at.html if 'class="sample"' in h.value]
    assert len(blocks) == 1, "the page renders one block of sample cards"
    return blocks[0]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def formatted(at: AppTest, dataset: str, fmt: str = "alpaca-format") -> AppTest:
    at.radio(key="dp_mode").set_value("Formatted JSON").run()
    at.selectbox(key="dp_dataset_formatted").set_value(dataset)
    at.selectbox(key="dp_format").set_value(fmt).run()
    assert not at.exception, at.exception
    return at


def expected(home: Path, tokenizer, **options):
    return build_samples(TrainingParameters.from_dict(options), tokenizer)


# ---- raw text ------------------------------------------------------------------------------------
def test_raw_preview_shows_the_samples_build_samples_makes(home, tokenizer):
    at = open_page()
    at.selectbox(key="dp_dataset_raw").set_value("user-guide.txt").run()
    want = expected(home, tokenizer, raw_text_file=str(home / "datasets" / "user-guide.txt"))
    shown = metrics(at)
    assert number(shown["Samples"]) == want.stats["samples"] > 1
    assert number(shown["Tokens"]) == want.stats["tokens"]
    assert number(shown["Max length"]) == want.stats["max_tokens"] <= 256
    assert number(shown["Dropped blocks"]) == want.stats["dropped_blocks"]
    cards = samples_html(at)
    assert cards.count('class="sample"') == min(10, want.stats["samples"])  # default page size
    assert html.escape(want.samples[0].text.split("\n")[0]) in cards
    assert f"{want.samples[0].n_tokens} tokens" in cards
    # The choices are kept for the Train page.
    options = at.session_state["data_options"]
    assert options["raw_text_file"] == "user-guide.txt" and options["dataset"] == ""
    assert options["cutoff_len"] == 256 and options["base_model"] == "SmolLM2-135M-Instruct"
    assert len(at.get("vega_lite_chart")) == 1  # the length histogram


def test_cutoff_and_overlap_change_the_chunks_and_overlap_is_highlighted(home, tokenizer):
    at = open_page()
    at.selectbox(key="dp_dataset_raw").set_value("user-guide.txt").run()
    before = number(metrics(at)["Samples"])
    at.number_input(key="dp_cutoff_len").set_value(64)
    at.number_input(key="dp_overlap_len").set_value(16).run()
    assert not errors(at)
    want = expected(home, tokenizer, raw_text_file=str(home / "datasets" / "user-guide.txt"), cutoff_len=64,
                    overlap_len=16)
    after = number(metrics(at)["Samples"])
    assert after == want.stats["samples"] > before
    assert number(metrics(at)["Max length"]) <= 64
    assert at.session_state["data_options"]["cutoff_len"] == 64

    # A chunk that continues a block shows the tokens it shares with the previous chunk highlighted,
    # and those tokens are the end of the previous chunk's text.
    at.selectbox(key="dp_page_size").set_value(25).run()
    cards = samples_html(at)
    overlaps = re.findall(r'<span class="tok-overlap"[^>]*>(.*?)</span>', cards, flags=re.S)
    assert overlaps, "no overlapping chunk on the first page"
    first = next(i for i, s in enumerate(want.samples) if s.overlap)
    assert f"overlap {want.samples[first].overlap} with the previous chunk" in cards
    shared = html.unescape(overlaps[0]).strip()
    assert shared and shared in want.samples[first - 1].text


def test_overlap_not_below_cutoff_is_an_error_naming_overlap(home):
    at = open_page()
    at.number_input(key="dp_cutoff_len").set_value(128)
    at.number_input(key="dp_overlap_len").set_value(128).run()
    assert any("Overlap length (128)" in e for e in errors(at)), errors(at)
    assert not at.metric, "no preview while the options are invalid"
    kept = at.session_state["data_options"]  # the last options that previewed, not the invalid ones
    assert (kept["cutoff_len"], kept["overlap_len"]) == (256, 128)

    # Below the cutoff but not below cutoff minus the EOS token: the trainer's own check reaches the page.
    at.number_input(key="dp_overlap_len").set_value(127).run()
    assert any("Overlap length (127)" in e and "BOS/EOS" in e for e in errors(at)), errors(at)
    assert at.session_state["data_options"]["cutoff_len"] == 256
    at.checkbox(key="dp_add_eos_token").uncheck().run()
    assert not errors(at) and metrics(at)["Samples"]


def test_non_utf8_text_file_names_the_byte_offset(home):
    (home / "datasets" / "latin1.txt").write_bytes(b"ok\xff\xfe")
    at = open_page()
    at.selectbox(key="dp_dataset_raw").set_value("latin1.txt").run()
    assert any("byte offset 2" in e and "latin1.txt" in e for e in errors(at)), errors(at)
    assert not at.metric


def test_paging_shows_one_page_of_samples(home):
    at = open_page()
    at.selectbox(key="dp_dataset_raw").set_value("user-guide.txt").run()
    total = int(number(metrics(at)["Samples"]))
    at.selectbox(key="dp_page_size").set_value(5).run()
    assert samples_html(at).count('class="sample"') == 5
    at.number_input(key="dp_page").set_value(2).run()
    cards = samples_html(at)
    assert cards.count('class="sample"') == min(5, total - 5)
    assert "<b>#6</b>" in cards and "<b>#5</b>" not in cards


# ---- formatted data ------------------------------------------------------------------------------
def test_formatted_preview_reports_the_two_odd_rows(home, tokenizer):
    at = formatted(open_page(), "dashboard-instructions.json")
    want = build_samples(TrainingParameters.from_dict({
        "dataset": str(home / "datasets" / "dashboard-instructions.json"), "format": "alpaca-format"}), tokenizer)
    shown = metrics(at)
    assert number(shown["Samples"]) == want.stats["samples"] == number(shown["Rows"]) - 2
    assert number(shown["Unmatched rows"]) == 2
    table = at.dataframe[0].value
    assert len(table) == 2 and list(table["where"]) == [p.where for p in want.problems]
    assert all(reason.startswith("unmatched") for reason in table["reason"])
    assert "Problems: 2" in " ".join(m.value for m in at.markdown)
    assert "### Instruction:" in samples_html(at)
    options = at.session_state["data_options"]
    assert options["dataset"] == "dashboard-instructions.json" and options["format"] == "alpaca-format"
    assert options["raw_text_file"] == ""


def test_train_only_after_masks_the_prompt(home):
    at = formatted(open_page(), "dashboard-instructions.json")
    assert "tok-masked" not in samples_html(at)
    at.text_input(key="dp_train_only_after").input("### Response:").run()
    shown = metrics(at)
    assert number(shown["Trained tokens"]) < number(shown["Tokens"])
    cards = samples_html(at)
    masked = " ".join(re.findall(r'<span class="tok-masked"[^>]*>(.*?)</span>', cards, flags=re.S))
    trained = " ".join(re.findall(r'<span class="tok-trained"[^>]*>(.*?)</span>', cards, flags=re.S))
    assert "### Instruction:" in masked and "### Response:" in masked
    assert "### Instruction:" not in trained and trained.strip()


def test_malformed_json_is_an_error(home):
    (home / "datasets" / "broken.json").write_text('[{"instruction": "a", "output": "b"},', encoding="utf-8")
    at = formatted(open_page(), "broken.json")
    assert any("broken.json is not valid JSON" in e for e in errors(at)), errors(at)
    assert not at.metric


def test_format_file_matching_few_rows_lists_the_others_as_problems(home):
    formats = home / "formats"
    formats.mkdir()
    (formats / "qa-format.json").write_text(json.dumps({"question,answer": "Q: %question%\nA: %answer%"}))
    (formats / "nothing-format.json").write_text(json.dumps({"prompt,completion": "%prompt%%completion%"}))
    at = formatted(open_page(), "dashboard-instructions.json", "qa-format")
    shown = metrics(at)
    assert number(shown["Samples"]) == 1
    assert number(shown["Unmatched rows"]) == number(shown["Rows"]) - 1
    table = at.dataframe[0].value
    assert len(table) == number(shown["Rows"]) - 1
    assert table.iloc[0]["where"] == "row 0" and table.iloc[0]["fields"] == "instruction, output"
    # No row matches at all: every row is listed as a problem, not a crash.
    at.selectbox(key="dp_format").set_value("nothing-format").run()
    assert not at.exception
    shown = metrics(at)
    assert number(shown["Samples"]) == 0
    assert number(shown["Unmatched rows"]) == number(shown["Rows"])
    assert len(at.dataframe[0].value) == number(shown["Rows"])


# ---- uploads -------------------------------------------------------------------------------------
def test_upload_writes_into_datasets_and_never_overwrites_silently(home):
    at = open_page()
    at.file_uploader[0].set_value(("notes.txt", b"First line.\nSecond line.\n", "text/plain")).run()
    at.button(key="dp_up_save").click().run()
    assert (home / "datasets" / "notes.txt").read_bytes() == b"First line.\nSecond line.\n"
    assert at.selectbox(key="dp_dataset_raw").value == "notes.txt"
    assert number(metrics(at)["Samples"]) == 1
    assert any("Saved datasets/notes.txt" in s.value for s in at.success)
    assert not [t for t in at.text_input if t.label == "Save as"], "the uploader is emptied after saving"

    guide = home / "datasets" / "user-guide.txt"
    original = guide.read_bytes()
    at.file_uploader[0].set_value(("user-guide.txt", b"replacement text", "text/plain")).run()
    assert any("already exists" in w.value for w in at.warning)
    assert at.button(key="dp_up_save").disabled
    assert guide.read_bytes() == original
    replace = [c for c in at.checkbox if c.label == "Replace the existing file"][0]
    replace.check().run()
    at.button(key="dp_up_save").click().run()
    assert guide.read_bytes() == b"replacement text"


@pytest.mark.parametrize("name", ["../escape.txt", ".hidden.txt", "data.xlsx", "nul\x00.txt"])
def test_upload_refuses_unsafe_names(home, name):
    before = sorted(p.name for p in (home / "datasets").iterdir())
    at = open_page()
    at.file_uploader[0].set_value(("fine.txt", b"text", "text/plain")).run()
    [box] = [t for t in at.text_input if t.label == "Save as"]
    box.input(name).run()
    at.button(key="dp_up_save").click().run()
    assert errors(at), "an unsafe name must be refused with a message"
    assert not (home / "escape.txt").exists() and not (home / "datasets" / name).exists()
    assert sorted(p.name for p in (home / "datasets").iterdir()) == before


# ---- with the other pages ------------------------------------------------------------------------
def test_settings_go_to_the_train_page_and_survive_a_page_switch(home):
    at = AppTest.from_file(str(PAGE.parent.parent / "app.py"), default_timeout=60).run()
    assert [t.value for t in at.title] == ["Data"]  # the default page
    at.radio(key="dp_mode").set_value("Formatted JSON").run()
    at.text_input(key="dp_train_only_after").input("### Response:").run()
    [use] = [b for b in at.button if b.label == "Use these settings on the Train page"]
    use.click().run()
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == ["Train"]
    assert at.session_state["tp_dataset"] == "dashboard-instructions.json"
    assert at.session_state["tp_raw_text_file"] == ""
    assert at.session_state["tp_format"] == "alpaca-format"
    assert at.session_state["tp_train_only_after"] == "### Response:"
    # Back on the Data page, its choices are still there although Streamlit drops unrendered widgets.
    at.switch_page("views/data.py").run()
    assert at.radio(key="dp_mode").value == "Formatted JSON"
    assert at.text_input(key="dp_train_only_after").value == "### Response:"
    assert "tok-masked" in samples_html(at)


# ---- one description of each field, one rule for datasets ---------------------------------------------
def test_both_pages_draw_a_field_with_its_one_label(home):
    from trainer.params import label

    data = open_page()
    train = AppTest.from_file(str(PAGE.parent / "train.py"), default_timeout=120).run()
    assert not train.exception, train.exception
    for name in ("cutoff_len", "overlap_len", "min_chars", "newline_favor_len"):
        assert data.number_input(key="dp_" + name).label == label(name) == train.number_input(key="tp_" + name).label
    for name in ("add_eos_token", "add_bos_token"):
        assert data.checkbox(key="dp_" + name).label == label(name) == train.checkbox(key="tp_" + name).label
    assert data.selectbox(key="dp_dataset_raw").label == label("raw_text_file")
    assert train.selectbox(key="tp_raw_text_file").label == label("raw_text_file")
    assert label("cutoff_len") == "Cutoff length (tokens)" and label("lora_name") == "LoRA name"


def test_the_options_of_each_kind_of_data_come_from_the_parameter_metadata():
    from trainer.preview import option_rows

    assert option_rows("raw") == [["cutoff_len", "overlap_len", "newline_favor_len", "hard_cut_string", "min_chars"],
                                  ["add_eos_token", "add_bos_token"]]
    assert option_rows("formatted") == [
        ["format", "cutoff_len", "train_only_after", "overlong_samples", "chat_template"],
        ["add_eos_token", "add_bos_token", "train_last_turn_only"]]
    # By the rows' recognised shapes: text rows get the raw-text rules in a row of their own; an option that
    # would change nothing is not offered (train only after masks format-file records only).
    raw_rules = ["overlap_len", "newline_favor_len", "hard_cut_string", "min_chars"]
    assert option_rows("formatted", frozenset({"text"})) == [["format", "cutoff_len"], raw_rules,
                                                            ["add_eos_token", "add_bos_token"]]
    assert option_rows("formatted", frozenset({"text", "messages", "other"})) == [
        ["format", "cutoff_len", "train_only_after", "overlong_samples", "chat_template"], raw_rules,
        ["add_eos_token", "add_bos_token", "train_last_turn_only"]]
    assert option_rows("formatted", frozenset({"sharegpt"})) == [
        ["format", "cutoff_len", "overlong_samples", "chat_template"],
        ["add_eos_token", "add_bos_token", "train_last_turn_only"]]
    assert option_rows("formatted", frozenset()) == option_rows("formatted")  # unreadable: every option
    assert option_rows("raw", frozenset({"text"})) == option_rows("raw")


def test_one_rule_says_which_files_are_datasets(home):
    from trainer.datafiles import dataset_names, kind_by_ending, raw_text_files

    datasets = home / "datasets"
    (datasets / "parts").mkdir()
    for name in ("part10.txt", "Part2.TXT", "notes.md", "picture.png"):
        (datasets / "parts" / name).write_text("text", encoding="utf-8")
    (datasets / "no-text").mkdir()
    (datasets / "no-text" / "a.json").write_text("[]", encoding="utf-8")
    (datasets / "rows.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    (datasets / "table.csv").write_text("a,b\n", encoding="utf-8")
    (datasets / "sheet.xlsx").write_text("not a dataset", encoding="utf-8")
    (datasets / ".hidden.txt").write_text("text", encoding="utf-8")
    assert dataset_names("raw") == ["general-text.txt", "parts", "user-guide.txt"]
    assert dataset_names("formatted") == ["dashboard-instructions.json", "rows.jsonl", "table.csv"]
    assert dataset_names() == ["dashboard-instructions.json", "general-text.txt", "parts", "rows.jsonl",
                               "table.csv", "user-guide.txt"]
    assert dataset_names("raw", folders=False) == ["general-text.txt", "user-guide.txt"]
    # natural order, case aside; Markdown is text, a picture is not
    assert [p.name for p in raw_text_files(datasets / "parts")] == ["notes.md", "Part2.TXT", "part10.txt"]
    assert [kind_by_ending(n) for n in ("a.txt", "a.md", "a.JSON", "a.jsonl", "a.csv", "a.parquet", "a.xlsx", "a")] \
        == ["raw", "raw", "formatted", "formatted", "formatted", "formatted", None, None]


# ---- a reload, and messages ----------------------------------------------------------------------
def test_a_reload_keeps_the_data_pages_choices(home):
    at = formatted(open_page(), "dashboard-instructions.json")
    at.number_input(key="dp_cutoff_len").set_value(128)
    at.text_input(key="dp_train_only_after").input("### Response:").run()
    assert not at.exception and not errors(at), errors(at)

    reloaded = open_page()  # a browser reload: a new session, its session state empty
    assert reloaded.radio(key="dp_mode").value == "Formatted JSON"
    assert reloaded.selectbox(key="dp_dataset_formatted").value == "dashboard-instructions.json"
    assert reloaded.selectbox(key="dp_format").value == "alpaca-format"
    assert reloaded.number_input(key="dp_cutoff_len").value == 128
    assert reloaded.text_input(key="dp_train_only_after").value == "### Response:"
    assert "tok-masked" in samples_html(reloaded)
    # The Train form of the new session starts from the same saved values where it had them.
    train = AppTest.from_file(str(PAGE.parent / "train.py"), default_timeout=120).run()
    assert not train.exception, train.exception


def test_an_upload_success_does_not_stay_under_a_later_error(home):
    at = open_page()
    at.file_uploader[0].set_value(("first.txt", b"Some text.\n", "text/plain")).run()
    at.button(key="dp_up_save").click().run()
    assert any("Saved datasets/first.txt" in s.value for s in at.success)
    at.file_uploader[0].set_value(("second.txt", b"More text.\n", "text/plain")).run()
    [box] = [t for t in at.text_input if t.label == "Save as"]
    box.input("../second.txt").run()
    assert errors(at), "the bad name is refused"
    assert not at.success, [s.value for s in at.success]
    at.button(key="dp_up_save").click().run()
    assert errors(at) and not at.success, [s.value for s in at.success]


def test_the_page_says_what_shape_it_recognised(home, tokenizer):
    rows = [{"conversations": [{"from": "human", "value": "What is LoRA?"},
                               {"from": "gpt", "value": "A small adapter trained on top of a model."}]}] * 3
    (home / "datasets" / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    at = formatted(open_page(), "chats.jsonl")  # a format file chosen too: chat rows are read as chats anyway
    want = build_samples(TrainingParameters.from_dict({"dataset": "chats.jsonl", "format": "alpaca-format"}),
                         tokenizer)
    assert want.shape and "ShareGPT" in want.shape
    assert want.shape in [i.value for i in at.info], [i.value for i in at.info]
    assert number(metrics(at)["Samples"]) == len(want.samples) == 3


# ---- uploads checked, format files, deletes ---------------------------------------------------------
QA_FORMAT = json.dumps({"question,answer": "Q: %question%\nA: %answer%"}).encode()


def test_a_broken_upload_is_refused_with_the_previews_sentence_and_nothing_is_written(home):
    before = sorted(p.name for p in (home / "datasets").iterdir())
    at = open_page()
    at.file_uploader[0].set_value(("rows.jsonl", b'{"text": "fine"}\n{"text": \n', "application/json")).run()
    at.button(key="dp_up_save").click().run()
    assert any(e == "rows.jsonl, line 2: not valid JSON (Expecting value)." for e in errors(at)), errors(at)
    assert not at.success
    assert sorted(p.name for p in (home / "datasets").iterdir()) == before
    # A format file saved into datasets/ is refused as the preview would refuse it as a dataset.
    at.file_uploader[0].set_value(("qa-format.json", QA_FORMAT, "application/json")).run()
    [into] = [r for r in at.radio if r.label == "Save into"]
    assert into.value == "formats/ (a format file)", "a .json object is offered for formats/"
    into.set_value("datasets/ (a dataset)").run()
    at.button(key="dp_up_save").click().run()
    assert any("qa-format.json must hold a JSON list of objects; it holds a dict" in e for e in errors(at)), errors(at)
    assert not (home / "datasets" / "qa-format.json").exists() and not (home / "formats").exists()


def test_a_format_file_upload_goes_into_formats_and_is_chosen(home):
    rows = [{"question": "What port does the app use?", "answer": "8501."}] * 2
    (home / "datasets" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    at = open_page()
    at.file_uploader[0].set_value(("qa-format.json", QA_FORMAT, "application/json")).run()
    assert at.button(key="dp_up_save").label == "Save into formats/"
    at.button(key="dp_up_save").click().run()
    assert (home / "formats" / "qa-format.json").read_bytes() == QA_FORMAT
    assert any("Saved formats/qa-format.json" in s.value for s in at.success)
    # Chosen in the same session, without a reload: the Data page is on formatted rows with the new format.
    assert at.radio(key="dp_mode").value == "Formatted JSON"
    picker = at.selectbox(key="dp_format")
    assert picker.value == "qa-format" and "qa-format" in picker.options
    at.selectbox(key="dp_dataset_formatted").set_value("qa.jsonl").run()
    assert number(metrics(at)["Samples"]) == 2 and "Q: What port" in samples_html(at)
    # The same name again is not replaced without consent.
    at.file_uploader[0].set_value(("qa-format.json", b'{"question": "%question%"}', "application/json")).run()
    assert any("formats/qa-format.json already exists" in w.value for w in at.warning)
    assert at.button(key="dp_up_save").disabled
    assert (home / "formats" / "qa-format.json").read_bytes() == QA_FORMAT


def test_an_upload_is_listed_at_once_and_a_delete_asks_first(home):
    at = open_page()
    at.file_uploader[0].set_value(("notes.txt", b"Some notes on LoRA.\n", "text/plain")).run()
    at.button(key="dp_up_save").click().run()
    picker = at.selectbox(key="dp_dataset_raw")
    assert picker.value == "notes.txt" and "notes.txt" in picker.options
    assert "datasets/notes.txt" in at.selectbox(key="dp_delete_choice").options
    assert number(metrics(at)["Samples"]) == 1

    at.selectbox(key="dp_delete_choice").set_value("datasets/notes.txt").run()
    at.button(key="dp_delete").click().run()
    assert [w.value for w in at.warning] == ["Really delete datasets/notes.txt? It cannot be undone."]
    assert (home / "datasets" / "notes.txt").exists(), "nothing is deleted before the confirmation"
    at.button(key="dp_delete_cancel").click().run()
    assert not at.warning and (home / "datasets" / "notes.txt").exists()
    # Asked for one file, then another chosen: the question is not carried over to it.
    at.button(key="dp_delete").click().run()
    at.selectbox(key="dp_delete_choice").set_value("datasets/general-text.txt").run()
    assert not at.warning and [b.label for b in at.button if b.key == "dp_delete"] == ["Delete"]

    at.selectbox(key="dp_delete_choice").set_value("datasets/notes.txt").run()
    at.button(key="dp_delete").click().run()
    at.button(key="dp_delete_confirm").click().run()
    assert not at.exception, at.exception
    assert not (home / "datasets" / "notes.txt").exists()
    assert any(s.value == "Deleted datasets/notes.txt." for s in at.success)
    picker = at.selectbox(key="dp_dataset_raw")
    assert "notes.txt" not in picker.options and picker.value == "user-guide.txt"
    assert "datasets/notes.txt" not in at.selectbox(key="dp_delete_choice").options
    assert number(metrics(at)["Samples"]) > 1, "the preview moved on to a dataset that exists"
    assert (home / "datasets" / "general-text.txt").exists()


def test_shipped_format_files_are_not_offered_for_deletion(home):
    at = open_page()
    offered = at.selectbox(key="dp_delete_choice").options
    assert offered and all(place.startswith("datasets/") for place in offered)


# ---- text rows get the raw-text options --------------------------------------------------------------
def test_text_rows_get_the_raw_text_options_and_they_take_effect(home, tokenizer):
    from trainer.samplecache import samples_key

    guide = (home / "datasets" / "user-guide.txt").read_text(encoding="utf-8")
    blocks = sorted((part.strip() for part in guide.split("\n\n\n")), key=len, reverse=True)[:2] + ["tiny"]
    (home / "datasets" / "texts.jsonl").write_text("".join(json.dumps({"text": b}) + "\n" for b in blocks),
                                                   encoding="utf-8")
    at = formatted(open_page(), "texts.jsonl")
    numbers = {n.key for n in at.number_input}
    assert {"dp_cutoff_len", "dp_overlap_len", "dp_newline_favor_len", "dp_min_chars"} <= numbers
    assert "dp_hard_cut_string" in {t.key for t in at.text_input}
    # Options that only rendered rows use are not offered for text rows.
    assert "dp_train_only_after" not in {t.key for t in at.text_input}
    assert "dp_chat_template" not in {s.key for s in at.selectbox}

    at.number_input(key="dp_cutoff_len").set_value(64)
    at.number_input(key="dp_overlap_len").set_value(16)
    at.number_input(key="dp_min_chars").set_value(10).run()
    assert not errors(at), errors(at)
    options = dict(dataset="texts.jsonl", format="alpaca-format", cutoff_len=64, overlap_len=16, min_chars=10)
    want = build_samples(TrainingParameters.from_dict(options), tokenizer)
    default_overlap = build_samples(TrainingParameters.from_dict({**options, "overlap_len": 32}), tokenizer)
    assert number(metrics(at)["Samples"]) == want.stats["samples"] != default_overlap.stats["samples"]
    assert number(metrics(at)["Dropped blocks"]) == 1  # "tiny", under the minimum block size
    assert "overlap 16" in " ".join(i.value for i in at.info)
    assert "overlap " in samples_html(at) and "with the previous chunk" in samples_html(at)
    kept = at.session_state["data_options"]
    assert (kept["overlap_len"], kept["min_chars"], kept["newline_favor_len"]) == (16, 10, 128)
    # Each raw-text rule is part of the sample cache's key.
    params = TrainingParameters.from_dict(options)
    keys = {samples_key(TrainingParameters.from_dict({**options, **change}), tokenizer)
            for change in ({}, {"overlap_len": 8}, {"newline_favor_len": 0}, {"hard_cut_string": "\\n\\n"},
                           {"min_chars": 11})}
    assert len(keys) == 5 and samples_key(params, tokenizer) in keys

    # The overlap rule is checked under its field, as for raw text.
    at.number_input(key="dp_overlap_len").set_value(64).run()
    assert any("Overlap length (64)" in e for e in errors(at)), errors(at)
    # A chat dataset has no raw-text options.
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    (home / "datasets" / "chat.jsonl").write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    at.run()  # the picker lists the new file
    at.selectbox(key="dp_dataset_formatted").set_value("chat.jsonl").run()
    assert "dp_overlap_len" not in {n.key for n in at.number_input}
    assert "dp_train_only_after" not in {t.key for t in at.text_input}
    assert "dp_chat_template" in {s.key for s in at.selectbox} and not errors(at)
