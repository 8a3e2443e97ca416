"""A real text-generation-webui `user_data` folder as the home: its datasets in training/datasets/, its format
files in training/formats/ and its chat templates in instruction-templates/ are listed, resolved by bare name
and build samples, alongside the home's own datasets/ and formats/ and the shipped files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from trainer.chattemplates import instruction_template_names
from trainer.data import build_samples
from trainer.datafiles import dataset_names, find_dataset, format_names
from trainer.home import HOME_ENV, resolve_user_path
from trainer.params import TrainingParameters

from tests.test_shapes import SYSTEM, TURNS, params, trained_text

CUSTOM_TEMPLATE = """instruction_template: |-
  {%- for message in messages -%}
      {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
  {%- endfor -%}
  {%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""
WEBUI_DATASETS = {"chat.json": "messages", "sharegpt.jsonl": "sharegpt", "texts.json": "text", "qa.json": "format"}


def _link_models(source: Path, target: Path) -> None:
    """The home fixture's model folders, by hard links (as tests/conftest.py lays out a home)."""
    for model in source.iterdir():
        if not model.is_dir():
            continue
        (target / model.name).mkdir(parents=True)
        for item in model.iterdir():
            if item.is_file():
                try:
                    os.link(item, target / model.name / item.name)
                except OSError:
                    shutil.copy2(item, target / model.name / item.name)


@pytest.fixture
def webui_home(home, tmp_path, monkeypatch) -> Path:
    """A folder laid out as text-generation-webui's user_data: models/, loras/, training/datasets/ (a messages
    file, a ShareGPT file, a text-rows file and records for a format file), training/formats/ and
    instruction-templates/ with a YAML template; no datasets/ or formats/ of its own."""
    root = tmp_path / "user_data"
    _link_models(home / "models", root / "models")
    (root / "loras").mkdir()
    datasets = root / "training" / "datasets"
    datasets.mkdir(parents=True)
    (datasets / "chat.json").write_text(json.dumps([{"messages": [SYSTEM, *TURNS[:2]]}, {"messages": TURNS}]),
                                        encoding="utf-8")
    (datasets / "sharegpt.jsonl").write_text("".join(json.dumps({"conversations": [
        {"from": "human", "value": q["content"]}, {"from": "gpt", "value": a["content"]}]}) + "\n"
        for q, a in (TURNS[:2], TURNS[2:])), encoding="utf-8")
    guide = (home / "datasets" / "user-guide.txt").read_text(encoding="utf-8")
    (datasets / "texts.json").write_text(json.dumps([{"text": part} for part in guide.split("\n\n\n")[:3]]),
                                         encoding="utf-8")
    (datasets / "qa.json").write_text(json.dumps([{"question": "What port?", "answer": "8501"}]), encoding="utf-8")
    formats = root / "training" / "formats"
    formats.mkdir()
    (formats / "qa-format.json").write_text(json.dumps({"question,answer": "Q: %question%\nA: %answer%"}),
                                            encoding="utf-8")
    (root / "instruction-templates").mkdir()
    (root / "instruction-templates" / "Custom-ChatML.yaml").write_text(CUSTOM_TEMPLATE, encoding="utf-8")
    monkeypatch.setenv(HOME_ENV, str(root))
    return root


def test_the_webui_folders_are_listed(webui_home):
    assert dataset_names() == sorted(WEBUI_DATASETS)
    assert dataset_names("formatted") == sorted(WEBUI_DATASETS) and dataset_names("raw") == []
    assert format_names()[0] == "qa-format" and "alpaca-format" in format_names()  # the shipped ones too
    names = instruction_template_names()
    assert names[0] == "Custom-ChatML" and "ChatML" in names


def test_bare_names_resolve_into_the_webui_folders(webui_home):
    training = webui_home / "training"
    assert resolve_user_path("sharegpt", "dataset") == training / "datasets" / "sharegpt.jsonl"
    assert resolve_user_path("chat.json", "dataset") == training / "datasets" / "chat.json"
    assert resolve_user_path("qa-format", "format") == training / "formats" / "qa-format.json"
    assert resolve_user_path("Custom-ChatML", "instruction template") == \
        webui_home / "instruction-templates" / "Custom-ChatML.yaml"
    for name in WEBUI_DATASETS:
        assert find_dataset(name) == training / "datasets" / name


@pytest.mark.parametrize("name", sorted(WEBUI_DATASETS))
def test_every_webui_dataset_builds_samples(webui_home, tokenizer, name):
    shape = WEBUI_DATASETS[name]
    options = TrainingParameters(dataset=name, format="qa-format" if shape == "format" else "", cutoff_len=96,
                                 overlap_len=16)
    preview = build_samples(options, tokenizer)
    assert preview.samples and preview.problems == [], preview.problems
    assert all(0 < s.n_trained <= s.n_tokens <= 96 for s in preview.samples)
    starts = {"messages": "OpenAI messages (role/content): 2 rows",
              "sharegpt": "ShareGPT conversations (from/value): 2 rows; human/gpt mapped to user/assistant",
              "text": 'Text rows ({"text": ...}): 3 rows', "format": "Format-file records: 1 row rendered with the "
                                                                   "format qa-format"}
    assert preview.shape.startswith(starts[shape]), preview.shape
    if shape == "text":
        assert preview.kind == "raw" and len(preview.samples) > 3


def test_the_webui_instruction_template_renders_chat_rows(webui_home, tokenizer):
    preview = build_samples(params(dataset="chat.json", chat_template="Custom-ChatML"), tokenizer)
    first = preview.samples[0]
    assert first.text == ("<|im_start|>system\nYou answer questions about the dashboard.<|im_end|>\n"
                          "<|im_start|>user\nWhat does the overlap length do?<|im_end|>\n"
                          "<|im_start|>assistant\nIt makes consecutive chunks share tokens.<|im_end|>\n")
    assert trained_text(tokenizer, first) == "It makes consecutive chunks share tokens.<|im_end|>\n"
    assert "rendered with the instruction template Custom-ChatML" in preview.shape


def test_the_homes_own_datasets_come_first(webui_home, tokenizer):
    own = webui_home / "datasets"
    own.mkdir()
    (own / "chat.json").write_text(json.dumps([{"prompt": "Mine:", "completion": " yes"}]), encoding="utf-8")
    assert dataset_names().count("chat.json") == 1
    assert resolve_user_path("chat", "dataset") == own / "chat.json" == find_dataset("chat.json")
    preview = build_samples(TrainingParameters(dataset="chat"), tokenizer)
    assert [s.text for s in preview.samples] == ["Mine: yes"]


def test_the_sample_cache_lives_in_the_webui_home(webui_home, tokenizer):
    from trainer.samplecache import cached_build_samples

    options = TrainingParameters(dataset="sharegpt.jsonl")
    first, cached = cached_build_samples(options, tokenizer)
    again, cached_again = cached_build_samples(options, tokenizer)
    assert (cached, cached_again) == (False, True) and again.shape == first.shape
    assert list((webui_home / "cache" / "samples").glob("*.npz"))
