"""Uploads and deletes (trainer/datafiles.py): an upload is read by the preview's own readers before it is
written, so an empty or broken file is refused with the preview's sentence and nothing is written; format
files go into formats/; nothing is replaced without consent and a shipped format file never; a delete stays
inside the home's datasets/, formats/ and a webui's training/ folders, and removes a link, never its target."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from trainer import datafiles, home as home_module
from trainer.data import build_samples
from trainer.datafiles import (SHIPPED_FORMATS, check_upload, dataset_names, deletable_files, delete_dataset,
                               delete_file, delete_format, format_names, save_dataset, save_format, save_upload,
                               upload_folder_for)
from trainer.errors import DashboardError
from trainer.params import TrainingParameters
from trainer.shapes import dataset_shapes

QA_FORMAT = json.dumps({"question,answer": "Q: %question%\nA: %answer%"}).encode()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ---- a refused upload says what the preview says, and writes nothing ------------------------------------
BROKEN_DATASETS = [
    ("empty.txt", b""),
    ("blank.md", b"  \n\n\n\n \n"),
    ("latin1.txt", b"caf\xe9 au lait"),
    ("empty.jsonl", b""),
    ("broken.jsonl", b'{"text": "a"}\n{"text": \n'),
    ("broken.json", b'[{"instruction": "a", "output": "b"},'),
    ("empty-list.json", b"[]"),
    ("format-as-data.json", QA_FORMAT),
    ("numbers.jsonl", b"1\n2\n"),
    ("empty.csv", b""),
    ("header-only.csv", b"instruction,output\n"),
    ("ragged.tsv", b"a\tb\n1\t2\n3\t4\t5\t6\n"),
    ("broken.parquet", b"not parquet at all"),
]


@pytest.mark.parametrize("name, data", BROKEN_DATASETS, ids=[name for name, _ in BROKEN_DATASETS])
def test_a_broken_dataset_is_refused_with_the_previews_sentence(home, tokenizer, name, data):
    before = listing(home / "datasets")
    with pytest.raises(DashboardError) as refused:
        save_dataset(name, data)
    assert listing(home / "datasets") == before, "nothing is written"
    # The same bytes in datasets/: the preview (what the Data page and the trainer read) says the same sentence.
    (home / "datasets" / name).write_bytes(data)
    field = "raw_text_file" if datafiles.kind_by_ending(name) == "raw" else "dataset"
    with pytest.raises(DashboardError) as previewed:
        build_samples(TrainingParameters.from_dict({field: name}), tokenizer)
    assert refused.value.message == previewed.value.message


def test_a_good_dataset_is_saved_as_it_is_and_never_replaced_silently(home):
    rows = b'{"text": "One document."}\n{"text": "Another."}\n'
    target = save_dataset("texts.jsonl", rows)
    assert target == home / "datasets" / "texts.jsonl" and target.read_bytes() == rows
    assert "texts.jsonl" in dataset_names("formatted")
    with pytest.raises(DashboardError, match=r"datasets/texts.jsonl already exists; tick 'Replace the existing file'"):
        save_dataset("texts.jsonl", b'{"text": "New."}\n')
    assert target.read_bytes() == rows
    # An existing name is refused before the bytes are read: a broken replacement says "exists" first.
    with pytest.raises(DashboardError, match="already exists"):
        save_dataset("texts.jsonl", b"")
    # Replacing with consent still checks the new bytes: a broken file never replaces a good one.
    with pytest.raises(DashboardError, match="holds no rows"):
        save_dataset("texts.jsonl", b"", replace=True)
    assert target.read_bytes() == rows
    save_dataset("texts.jsonl", b'{"text": "New."}\n', replace=True)
    assert target.read_bytes() == b'{"text": "New."}\n'


def test_the_upload_check_reads_a_temporary_copy_only(home, monkeypatch, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    check_upload("rows.jsonl", b'{"text": "fine"}\n')
    check_upload("qa-format.json", QA_FORMAT, "formats")
    with pytest.raises(DashboardError):
        check_upload("rows.jsonl", b"")
    assert listing(scratch) == [], "the temporary copy is removed, also after a refusal"
    assert not (home / "datasets" / "rows.jsonl").exists() and not (home / "formats").exists()


# ---- format files -------------------------------------------------------------------------------------
def test_a_format_file_goes_into_formats_after_load_format_accepts_it(home):
    assert not (home / "formats").exists()
    target = save_format("qa-format.json", QA_FORMAT)
    assert target == home / "formats" / "qa-format.json" and target.read_bytes() == QA_FORMAT
    assert "qa-format" in format_names()
    with pytest.raises(DashboardError, match="formats/qa-format.json already exists"):
        save_format("qa-format.json", QA_FORMAT)
    for name, data, message in [
        ("list-format.json", b'[{"a": "b"}]', "must be a JSON object mapping field lists"),
        ("bad-format.json", b'{"question": "%answer%"}', "uses %answer%, which its key does not list"),
        ("empty-format.json", b"", "Format file empty-format.json is not valid JSON"),
        ("rows.jsonl", QA_FORMAT, "A format file must end in .json; rows.jsonl does not."),
    ]:
        with pytest.raises(DashboardError, match=message):
            save_format(name, data)
        assert not (home / "formats" / name).exists()
    assert listing(home / "formats") == ["qa-format.json"]


def test_the_folder_suggested_for_an_upload():
    assert upload_folder_for("qa-format.json", b'  \n{"a,b": "%a%%b%"}') == "formats"
    assert upload_folder_for("rows.json", b'[{"a": "b"}]') == "datasets"
    assert upload_folder_for("rows.jsonl", b'{"text": "a"}\n') == "datasets"
    assert upload_folder_for("notes.txt", b"{ not json") == "datasets"


@pytest.mark.parametrize("name", ["../escape.json", ".hidden.json", "sub/dir.json", "nul\x00.json", "CON.json"])
def test_unsafe_upload_names_are_refused(home, name):
    for folder in ("datasets", "formats"):
        with pytest.raises(DashboardError):
            save_upload(name, QA_FORMAT, folder)
    assert not (home / "escape.json").exists() and not (home / "formats").exists()


@pytest.fixture
def checkout_home(tmp_path, monkeypatch):
    """A home that is the checkout itself (the default): its formats/ holds the shipped format files."""
    checkout = tmp_path / "checkout"
    (checkout / "formats").mkdir(parents=True)
    (checkout / "datasets").mkdir()
    for name in SHIPPED_FORMATS:
        (checkout / "formats" / f"{name}.json").write_bytes((home_module.CODE_ROOT / "formats" / f"{name}.json")
                                                             .read_bytes())
    monkeypatch.setattr(home_module, "CODE_ROOT", checkout)
    monkeypatch.setattr(datafiles, "CODE_ROOT", checkout)
    monkeypatch.setenv(home_module.HOME_ENV, str(checkout))
    return checkout


def test_the_shipped_format_files_are_the_checkouts():
    assert {p.stem for p in (home_module.CODE_ROOT / "formats").glob("*.json")} >= SHIPPED_FORMATS


def test_a_shipped_format_file_is_never_replaced_nor_deleted(checkout_home):
    shipped = checkout_home / "formats" / "alpaca-format.json"
    original = shipped.read_bytes()
    with pytest.raises(DashboardError, match="formats/alpaca-format.json is a format file shipped with the dashboard"):
        save_format("alpaca-format.json", QA_FORMAT, replace=True)
    with pytest.raises(DashboardError, match="shipped with the dashboard; it is not deleted"):
        delete_format("alpaca-format")
    assert shipped.read_bytes() == original
    # The user's own format file in the same folder is theirs to delete.
    save_format("qa-format.json", QA_FORMAT)
    assert [place for place, (kind, _) in deletable_files().items() if kind == "format"] == ["formats/qa-format.json"]
    assert delete_file("formats/qa-format.json") == "formats/qa-format.json"
    assert sorted(format_names()) == sorted(SHIPPED_FORMATS)


def test_the_shipped_format_files_are_outside_another_home(home):
    assert "alpaca-format" in format_names()
    assert not any(kind == "format" for kind, _ in deletable_files().values())
    with pytest.raises(DashboardError, match="shipped with the dashboard; it is not deleted"):
        delete_format("alpaca-format")
    assert (home_module.CODE_ROOT / "formats" / "alpaca-format.json").exists()


# ---- deletes ------------------------------------------------------------------------------------------
def test_a_dataset_file_or_folder_is_deleted_from_datasets(home):
    datasets = home / "datasets"
    (datasets / "parts").mkdir()
    (datasets / "parts" / "one.txt").write_text("text", encoding="utf-8")
    (datasets / "parts" / "two.md").write_text("more", encoding="utf-8")
    listed = deletable_files()
    assert listed["datasets/parts"] == ("dataset", "parts")
    assert listed["datasets/user-guide.txt"] == ("dataset", "user-guide.txt")
    assert delete_dataset("parts") == "datasets/parts"
    assert not (datasets / "parts").exists() and not (datasets / ".parts.deleting").exists()
    assert delete_dataset("user-guide.txt") == "datasets/user-guide.txt"
    assert "user-guide.txt" not in dataset_names() and "parts" not in dataset_names()
    with pytest.raises(DashboardError, match="There is no dataset 'user-guide.txt'"):
        delete_dataset("user-guide.txt")
    for name in ("../datasets/general-text.txt", "/etc/passwd", ".hidden.txt"):
        with pytest.raises(DashboardError, match="There is no dataset"):
            delete_dataset(name)
    assert (datasets / "general-text.txt").exists()


def test_a_link_is_deleted_never_what_it_points_to(home, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not the dashboard's", encoding="utf-8")
    os.symlink(outside, home / "datasets" / "linked.txt")
    os.symlink(home / "datasets" / "general-text.txt", home / "datasets" / "alias.txt")
    assert "linked.txt" in dataset_names("raw")
    assert delete_dataset("linked.txt") == "datasets/linked.txt"
    assert delete_dataset("alias.txt") == "datasets/alias.txt"
    assert outside.read_text(encoding="utf-8") == "not the dashboard's"
    assert (home / "datasets" / "general-text.txt").exists()
    assert not os.path.lexists(home / "datasets" / "linked.txt")


def test_a_webui_training_folder_is_deleted_from_only_inside_the_home(home, tmp_path):
    training = home / "training"
    (training / "datasets").mkdir(parents=True)
    (training / "formats").mkdir()
    (training / "datasets" / "chats.jsonl").write_text('{"messages": []}\n', encoding="utf-8")
    (training / "formats" / "webui-format.json").write_bytes(QA_FORMAT)
    listed = deletable_files()
    assert listed["training/datasets/chats.jsonl"] == ("dataset", "chats.jsonl")
    assert listed["training/formats/webui-format.json"] == ("format", "webui-format")
    assert delete_file("training/datasets/chats.jsonl") == "training/datasets/chats.jsonl"
    assert delete_format("webui-format") == "training/formats/webui-format.json"
    assert listing(training / "datasets") == [] and listing(training / "formats") == []
    # A training/ folder that is a link to elsewhere lies outside the home: listed for reading, never deleted.
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "datasets").mkdir(parents=True)
    (elsewhere / "datasets" / "far.jsonl").write_text('{"text": "far"}\n', encoding="utf-8")
    training.rename(tmp_path / "old-training")
    os.symlink(elsewhere, training)
    assert "far.jsonl" in dataset_names() and "training/datasets/far.jsonl" not in deletable_files()
    with pytest.raises(DashboardError, match="lies outside the home folder"):
        delete_dataset("far.jsonl")
    with pytest.raises(DashboardError, match="not something the Data page can delete"):
        delete_file("training/datasets/far.jsonl")
    assert (elsewhere / "datasets" / "far.jsonl").exists()


# ---- the shapes the Data page draws its options for -----------------------------------------------------
def test_dataset_shapes_are_read_before_any_format_is_chosen(home):
    datasets = home / "datasets"
    (datasets / "texts.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    (datasets / "mixed.jsonl").write_text('{"text": "a"}\n{"messages": [{"role": "user", "content": "hi"}]}\n'
                                          '{"instruction": "x", "output": "y"}\n', encoding="utf-8")
    (datasets / "broken.jsonl").write_text('{"text": ', encoding="utf-8")
    assert dataset_shapes(datasets / "texts.jsonl") == {"text"}
    assert dataset_shapes(datasets / "mixed.jsonl") == {"text", "messages", "other"}
    assert dataset_shapes(datasets / "broken.jsonl") == frozenset()
    assert dataset_shapes(datasets / "missing.jsonl") == frozenset()
    # Read again when the file changes (its size or modification time).
    (datasets / "texts.jsonl").write_text('{"prompt": "2 + 2 =", "completion": " 4"}\n', encoding="utf-8")
    assert dataset_shapes(datasets / "texts.jsonl") == {"prompt-completion"}
