"""A real text-generation-webui `user_data` folder as the home: its datasets in training/datasets/, its format
files in training/formats/ and its chat templates in instruction-templates/ are listed, resolved by bare name
and build samples, alongside the home's own datasets/ and formats/ and the shipped files; its run folders in
loras/, written as the current webui writes them, are listed on the Evaluate page and copied on the Train page
with their keys mapped onto ours. The Data, Train and Evaluate pages are driven over it with AppTest."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from trainer.chattemplates import instruction_template_names
from trainer.data import build_samples
from trainer.datafiles import dataset_names, find_dataset, format_names
from trainer.errors import DashboardError
from trainer.home import CODE_ROOT, HOME_ENV, resolve_user_path
from trainer.params import FIELDS, TrainingParameters, read_and_check

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


# What the current webui (modules/training.py, 2026) writes into training_parameters.json: every key of its
# PARAMETERS list, with its form's defaults (gradio numbers are floats; "None" is a dropdown left unchosen).
WEBUI_DEFAULTS = {
    "lora_name": "", "always_override": False, "all_linear": True, "q_proj_en": True, "v_proj_en": True,
    "k_proj_en": False, "o_proj_en": False, "gate_proj_en": False, "down_proj_en": False, "up_proj_en": False,
    "save_steps": 0.0, "micro_batch_size": 4, "batch_size": 32, "epochs": 3.0, "learning_rate": "3e-4",
    "lr_scheduler_type": "cosine", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "cutoff_len": 512,
    "dataset": "None", "eval_dataset": "None", "format": "None", "eval_steps": 100.0, "text_dataset": "None",
    "warmup_steps": 100.0, "optimizer": "adamw_torch", "stride_length": 256, "stop_at_loss": 0.0,
    "add_eos_token": True, "excess_length": "drop", "report_to": "None", "gradient_checkpointing": True,
}
# The two runs in the fixture's loras/: a chat run on the YAML template with all linear layers, and a text-dataset
# run with q, k, v and o ticked (all linear off), a stride and truncation.
WEBUI_RUNS = {
    "webui-chat": {"dataset": "chat", "format": "Custom-ChatML", "save_steps": 16.0},
    "webui-text": {"text_dataset": "texts", "format": "Chat Template", "all_linear": False, "k_proj_en": True,
                   "o_proj_en": True, "cutoff_len": 128, "stride_length": 32, "excess_length": "truncate",
                   "lora_rank": 16, "lora_alpha": 32, "save_steps": 16.0},
}
FINAL_LOSS = {"webui-chat": 2.41, "webui-text": 3.07}


@pytest.fixture(scope="session")
def webui_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Real PEFT adapters of the tiny model saved as the webui saves them (`save_pretrained`), one per run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("webui-adapters")
    folders = {}
    for name, targets in (("webui-chat", "all-linear"), ("webui-text", ["q_proj", "k_proj", "v_proj", "o_proj"])):
        rank = int(WEBUI_RUNS[name].get("lora_rank", WEBUI_DEFAULTS["lora_rank"]))
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, bias="none",
                            task_type="CAUSAL_LM")
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(root / name)
        adapter_config = root / name / "adapter_config.json"
        stored = json.loads(adapter_config.read_text())
        stored["base_model_name_or_path"] = "user_data/models/tiny-llama"  # the webui loads models from there
        adapter_config.write_text(json.dumps(stored, indent=2))
        folders[name] = root / name
    return folders


def _write_adapter(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(source / name, target / name)


def write_webui_run(loras: Path, name: str, adapter: Path) -> Path:
    """A run folder as the current webui leaves it after a completed run with `save_steps`: the parameters, the
    training prompt, the last log entry, the adapter, and one HF Trainer checkpoint (adapter, trainer_state.json
    with its log history, and the webui's own two files; the optimizer, scheduler and RNG files it also holds
    are not read here and left out)."""
    parameters = {**WEBUI_DEFAULTS, **WEBUI_RUNS[name], "lora_name": name}
    accumulation = parameters["batch_size"] // parameters["micro_batch_size"]
    prompt = {"template_type": "text_dataset" if parameters["text_dataset"] != "None" else "chat_template"}
    projections = "all-linear" if parameters["all_linear"] else ", ".join(
        key[:-len("_proj_en")] for key, on in parameters.items() if key.endswith("_proj_en") and on)
    history = [{"loss": loss, "grad_norm": 1.5, "learning_rate": 2e-4 / step, "epoch": step / 2, "step": step}
               for step, loss in ((1, 3.6), (2, 3.1), (3, 2.8), (4, FINAL_LOSS[name]))]
    log = {"base_model_name": "tiny-llama", "base_model_class": "LlamaForCausalLM", "base_loaded_in_4bit": False,
           "base_loaded_in_8bit": False, "projections": projections, **history[-1],
           "current_steps": history[-1]["step"] * accumulation, "train_runtime": 4.2, "train_loss": 3.1}
    del log["step"]
    run = loras / name
    _write_adapter(adapter, run)
    saved_at = int(parameters["save_steps"]) // accumulation  # the webui's save_steps count micro-batches
    checkpoint = run / f"checkpoint-{saved_at}"
    _write_adapter(adapter, checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({
        "global_step": saved_at, "epoch": saved_at / 2, "max_steps": 4, "logging_steps": 1, "save_steps": saved_at,
        "log_history": history[:saved_at], "train_batch_size": parameters["micro_batch_size"]}, indent=2))
    for folder, entry in ((checkpoint, {**log, "current_steps": saved_at * accumulation}), (run, log)):
        (folder / "training_log.json").write_text(json.dumps(entry, indent=2))
        (folder / "training_prompt.json").write_text(json.dumps(prompt, indent=2))
    (run / "training_parameters.json").write_text(json.dumps(parameters, indent=2))
    return run


@pytest.fixture
def webui_home(home, tmp_path, monkeypatch, webui_adapters) -> Path:
    """A folder laid out as text-generation-webui's user_data: models/, loras/ with two run folders written in
    the current webui's format (`write_webui_run`), training/datasets/ (a messages file, a ShareGPT file, a
    text-rows file and records for a format file), training/formats/ and instruction-templates/ with a YAML
    template; no datasets/ or formats/ of its own."""
    root = tmp_path / "user_data"
    _link_models(home / "models", root / "models")
    (root / "loras").mkdir()
    for name, adapter in webui_adapters.items():
        write_webui_run(root / "loras", name, adapter)
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


# ---- the webui's run folders -------------------------------------------------------------------------------
def test_the_webui_runs_parameters_are_mapped_onto_ours(webui_home, tokenizer):
    from trainer.runtable import run_parameters

    chat = TrainingParameters.from_file(webui_home / "loras" / "webui-chat" / "training_parameters.json")
    assert (chat.dataset, chat.format, chat.chat_template) == ("chat.json", "", "Custom-ChatML")
    assert chat.target_modules == "all-linear" and chat.lora_target_modules() == "all-linear"
    assert chat.overlong_samples == "drop" and chat.learning_rate == 3e-4 and chat.lora_rank == 8
    # save, warm-up and eval steps count micro-batches there: 16, 100 and 100 over an accumulation of 32 / 4
    assert (chat.save_steps, chat.warmup_steps, chat.eval_steps) == (2, 13, 13)
    text = TrainingParameters.from_file(webui_home / "loras" / "webui-text" / "training_parameters.json")
    assert (text.dataset, text.format, text.chat_template) == ("texts.json", "", "")  # "Chat Template": the model's
    assert text.target_modules == "q-k-v-o" and text.overlong_samples == "truncate"
    assert (text.overlap_len, text.newline_favor_len, text.hard_cut_string) == (32, 0, "")
    for params in (chat, text):
        assert params.problems() == [], params.problems()
    assert run_parameters(webui_home / "loras" / "webui-chat")["chat_template"] == "Custom-ChatML"

    chats = build_samples(chat, tokenizer)
    assert "rendered with the instruction template Custom-ChatML" in chats.shape and len(chats.samples) == 2
    chunks = build_samples(text, tokenizer)
    assert chunks.kind == "raw" and len(chunks.samples) > 3 and max(s.n_tokens for s in chunks.samples) <= 128


def test_the_webui_runs_are_summarised_with_their_parameters(webui_home):
    from trainer.runtable import adapter_choices, runs_table

    table = runs_table().set_index("run")
    assert set(table.index) == set(WEBUI_RUNS)
    for name, data, rank in (("webui-chat", "chat.json", 8), ("webui-text", "texts.json", 16)):
        row = table.loc[name]
        assert (row["source"], row["state"], row["base model"]) == ("webui", "completed", "tiny-llama")
        assert (row["data"], row["rank"], row["alpha"], row["batch"]) == (data, rank, 2 * rank, 32)
        assert row["learning rate"] == pytest.approx(3e-4) and row["final loss"] == FINAL_LOSS[name]
        assert list(adapter_choices(webui_home / "loras" / name)) == ["final", "checkpoint-2"]


def test_webui_run_folders_with_less_in_them_are_listed_too(webui_home, webui_adapters):
    """A LoRA copied in with only its adapter, and a run the webui stopped before it saved anything (it writes the
    parameters first), with a training_log.json that is not JSON."""
    from trainer.runtable import runs_table

    _write_adapter(webui_adapters["webui-chat"], webui_home / "loras" / "adapter-only")
    started = webui_home / "loras" / "never-saved"
    started.mkdir()
    (started / "training_parameters.json").write_text(json.dumps({**WEBUI_DEFAULTS, "lora_name": "never-saved",
                                                                  "dataset": "chat", "format": "ChatML"}))
    (started / "training_log.json").write_text("{not json")
    table = runs_table().set_index("run")
    assert table.loc["adapter-only", "base model"] == "tiny-llama" and table.loc["adapter-only", "state"] == "completed"
    assert table.loc["never-saved", "state"] == "unknown" and table.loc["never-saved", "data"] == "chat.json"
    assert pd.isna(table.loc["never-saved", "final loss"]) and table.loc["never-saved", "base model"] == ""


def test_the_text_of_a_webui_run_is_found_in_training_datasets(webui_home):
    from trainer.results import TEXT_FROM_FILE, TEXT_FROM_TRAINING, run_data_text, text_file_names, text_to_evaluate

    rows = json.loads((webui_home / "training" / "datasets" / "texts.json").read_text())
    assert run_data_text(webui_home / "loras" / "webui-text") == "\n\n".join(row["text"] for row in rows)
    path, label = text_to_evaluate(TEXT_FROM_TRAINING, webui_home / "loras" / "webui-text")
    assert path.read_text() == "\n\n".join(row["text"] for row in rows) and label == "webui-text: training data"
    with pytest.raises(DashboardError, match="chat rows .*chat.json.*pasted held-out text"):
        run_data_text(webui_home / "loras" / "webui-chat")
    (webui_home / "training" / "datasets" / "held-out.txt").write_text("Text the LoRA never saw.\n")
    assert text_file_names() == ["held-out.txt"]
    assert text_to_evaluate(TEXT_FROM_FILE, webui_home / "loras" / "webui-chat", "held-out.txt") == \
        (webui_home / "training" / "datasets" / "held-out.txt", "held-out.txt")


# ---- the pages over the webui folder ---------------------------------------------------------------------
def _page(name: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(CODE_ROOT / "views" / f"{name}.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _rerun(changed):
    """Run the page again after a change (`changed`: the page, or a widget just set, whose run is the page's)."""
    at = changed.run()
    assert not at.exception, at.exception
    return at


def test_the_data_page_lists_and_previews_every_webui_dataset(webui_home, tokenizer):
    at = _page("data")
    _rerun(at.radio(key="dp_mode").set_value("Formatted JSON"))
    assert at.selectbox(key="dp_dataset_formatted").options == sorted(WEBUI_DATASETS)
    assert "qa-format" in at.selectbox(key="dp_format").options
    assert "Custom-ChatML" in at.selectbox(key="dp_chat_template").options
    for name, shape in sorted(WEBUI_DATASETS.items()):
        at.selectbox(key="dp_dataset_formatted").set_value(name)
        at.selectbox(key="dp_format").set_value("qa-format")
        template = "Custom-ChatML" if name == "chat.json" else ""
        at.selectbox(key="dp_chat_template").set_value(template)
        _rerun(at)
        want = build_samples(TrainingParameters.from_dict(
            {"dataset": name, "format": "qa-format", "chat_template": template}), tokenizer)
        assert [e.value for e in at.error] == [], (name, [e.value for e in at.error])
        assert want.shape in [i.value for i in at.info], (name, want.shape, [i.value for i in at.info])
        assert float({m.label: m.value for m in at.metric}["Samples"].replace(",", "")) == len(want.samples) > 0
        cards = next(h.value for h in at.html if 'class="sample"' in h.value)
        lengths = [int(n) for n in re.findall(r"<b>#\d+</b>[^<]*? (\d+) tokens", cards)]
        assert lengths == [sample.n_tokens for sample in want.samples[:len(lengths)]] and lengths, name
        if name == "chat.json":  # the YAML template renders it: no default system turn of the model's own
            assert "rendered with the instruction template Custom-ChatML" in want.shape
            assert "<|im_start|>" in html.unescape(cards) and "SmolLM" not in html.unescape(cards)


def test_the_train_page_copies_a_webui_runs_parameters(webui_home, tokenizer):
    at = _page("train")
    assert set(WEBUI_RUNS) <= set(at.selectbox(key="copy_from").options)
    expected = {
        "webui-chat": {"tp_base_model": "tiny-llama", "tp_dataset": "chat.json", "tp_chat_template": "Custom-ChatML", "tp_format": "",
                       "tp_target_modules": "all-linear", "tp_overlong_samples": "drop", "tp_lora_rank": 8,
                       "tp_lora_alpha": 16, "tp_cutoff_len": 512, "tp_lr_scheduler_type": "cosine",
                       "tp_save_steps": 2, "tp_warmup_steps": 13, "tp_gradient_checkpointing": True},
        "webui-text": {"tp_base_model": "tiny-llama", "tp_dataset": "texts.json", "tp_chat_template": "", "tp_format": "",
                       "tp_target_modules": "q-k-v-o", "tp_overlong_samples": "truncate", "tp_overlap_len": 32,
                       "tp_newline_favor_len": 0, "tp_hard_cut_string": "", "tp_lora_rank": 16, "tp_cutoff_len": 128},
    }
    for name, values in expected.items():
        _rerun(at.selectbox(key="copy_from").select(name))
        _rerun(next(b for b in at.button if b.label == "Copy parameters").click())
        shown = {key: at.session_state[key] for key in values}
        assert shown == values, name
        assert at.text_input(key="tp_lora_name").value == f"{name}-2"
        assert at.number_input(key="tp_learning_rate").value == pytest.approx(3e-4)
        form = {field: at.session_state["tp_" + field] for field in FIELDS}
        assert read_and_check(form)[1] == []  # no field has a problem
        # The plan built the samples of the copied dataset and template: the webui's batch of 32 is more than these
        # small files hold, which the plan says with the fix.
        samples = build_samples(TrainingParameters.from_dict(form), tokenizer).samples
        said = [e.value for e in at.error if e.value.startswith(f"Only {len(samples)} samples to train on")]
        assert said, name  # in the plan, and under the batch size field


def test_the_evaluate_page_lists_the_webui_runs_with_their_parameters(webui_home):
    at = _page("evaluate")
    table = at.dataframe(key="ev_table").value.set_index("run")
    assert set(table.index) == set(WEBUI_RUNS)
    assert table.loc["webui-chat", "data"] == "chat.json" and table.loc["webui-text", "data"] == "texts.json"
    assert set(table["source"]) == {"webui"} and set(table["base model"]) == {"tiny-llama"}
    assert table.loc["webui-text", "rank"] == 16 and table.loc["webui-chat", "final loss"] == FINAL_LOSS["webui-chat"]
    _rerun(at.multiselect(key="ev_selected").set_value(sorted(WEBUI_RUNS)))
    differences = next(d.value for d in at.dataframe if "parameter" in (d.value.index.name or ""))
    assert {"dataset", "target_modules", "chat_template", "overlap_len"} <= set(differences.index)
    assert differences.loc["target_modules"].tolist() == ["all-linear", "q-k-v-o"]
    for name in sorted(WEBUI_RUNS):
        _rerun(at.selectbox(key="ev_run").select(name))
        assert f"Base model: **tiny-llama** · adapters: final, checkpoint-2" in [c.value for c in at.caption]
        assert not [w.value for w in at.warning if "not under models/" in w.value]


def test_a_webui_runs_curve_comes_from_its_checkpoints_log_history(webui_home):
    from trainer.metrics import metrics_frame

    frame = metrics_frame(webui_home / "loras" / "webui-chat")
    train = frame[~frame["is_eval"]]
    # checkpoint-2's log history (steps 1 and 2), then training_log.json's last entry at epoch 2 = step 4:
    # optimiser steps throughout, not the webui's micro-batch count.
    assert train["step"].tolist() == [1, 2, 4]
    assert train["loss"].tolist() == [3.6, 3.1, FINAL_LOSS["webui-chat"]]
