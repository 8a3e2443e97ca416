"""Bad input (issue 5, item 3): each gives a clear message on the page and a non-zero exit with one `error:`
line on the command line, and changes nothing on disk.

Already covered elsewhere, not repeated here: non-UTF-8 bytes on the Data page and the command line
(test_data_page.py::test_non_utf8_text_file_names_the_byte_offset, test_cli_preview.py::test_bad_input_...),
malformed JSON on the page (test_data_page.py::test_malformed_json_is_an_error), `--cutoff-len many` and
overlap >= cutoff on the command line (test_cli_preview.py), the loaders' own messages for broken datasets and
format files (test_formats.py::test_broken_datasets / test_broken_format_files), empty text and text of only
hard cuts in build_raw_samples (test_chunking.py::test_nothing_to_train_on_is_an_error), lora_rank 0 on the
Train page (test_train_page.py), random parameter dicts (test_params.py, hypothesis), an adapter of another
base model at export (test_export.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from streamlit.testing.v1 import AppTest

from trainer.data import build_samples
from trainer.datafiles import load_format, load_rows
from trainer.errors import DashboardError
from trainer.home import CODE_ROOT, HOME_ENV
from trainer.params import DEFAULT_MODEL, TrainingParameters

from .conftest import TINY_MODEL, _link_tree
from .evalhelpers import copy_run, trained_run_source
from .homefiles import snapshot

DATA_PAGE = str(CODE_ROOT / "views" / "data.py")
TRAIN_PAGE = str(CODE_ROOT / "views" / "train.py")
FIVE_MB = 5 * 1024 * 1024


# ---- the bad files -------------------------------------------------------------------------------
def five_mb_line() -> str:
    words = ("the of and to in is was for on with as by at from that this model train data loss step chunk "
             "token adapter rank cutoff overlap").split()
    rng = random.Random(5)
    text = " ".join(rng.choice(words) for _ in range(FIVE_MB // 4))
    assert len(text) > FIVE_MB
    return text[:FIVE_MB]


def write_gguf(path: Path, architecture: str) -> None:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_bad_files(home: Path) -> None:
    data, formats, models = home / "datasets", home / "formats", home / "models"
    formats.mkdir(exist_ok=True)
    (data / "empty.txt").write_bytes(b"")
    (data / "only-cuts.txt").write_text("\n\n\n" * 6 + "  \n\n\n\n", encoding="utf-8")
    (data / "one-line.txt").write_text(five_mb_line(), encoding="utf-8")
    (data / "object.json").write_text('{"instruction": "a", "output": "b"}', encoding="utf-8")
    (data / "scalars.json").write_text("[1, 2, 3]", encoding="utf-8")
    (data / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n'
                                       '{"instruction": "e", "output": "f"}\n', encoding="utf-8")
    (formats / "list-format.json").write_text('["instruction,output"]', encoding="utf-8")
    (formats / "unlisted-format.json").write_text(
        json.dumps({"instruction,output": "%instruction%\n%input%\n%output%"}), encoding="utf-8")
    # A model folder with config.json only (weights not downloaded yet)
    (models / "no-weights").mkdir()
    shutil.copy(models / TINY_MODEL / "config.json", models / "no-weights" / "config.json")
    write_gguf(models / "mamba9.gguf", "mamba9")
    (models / "garbage.gguf").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)


# ---- the command line: every case at once ----------------------------------------------------------
PREVIEW_CASES = {
    "empty text file": (["--raw-text-file", "empty.txt"], ["No text left to train on", "empty"]),
    "only hard cuts": (["--raw-text-file", "only-cuts.txt"], ["No text left to train on"]),
    "JSON object, not a list": (["--dataset", "object.json", "--format", "alpaca-format"],
                                ["object.json must hold a JSON list of objects", "dict"]),
    "JSON list of numbers": (["--dataset", "scalars.json", "--format", "alpaca-format"],
                             ["scalars.json: row 0", "not an object"]),
    "JSONL with one broken line": (["--dataset", "broken.jsonl", "--format", "alpaca-format"],
                                   ["broken.jsonl, line 2: not valid JSON"]),
    "format file not an object": (["--dataset", "dashboard-instructions.json", "--format", "list-format"],
                                  ["list-format.json must be a JSON object"]),
    "template names an unlisted field": (["--dataset", "dashboard-instructions.json", "--format", "unlisted-format"],
                                         ["unlisted-format.json", "%input%", "does not list"]),
    "cutoff abc": (["--raw-text-file", "user-guide.txt", "--cutoff-len", "abc"],
                   ["Cutoff length (tokens) must be a whole number", "'abc'"]),
    "cutoff -5": (["--raw-text-file", "user-guide.txt", "--cutoff-len", "-5"],
                  ["Cutoff length (tokens) must be at least 8; got -5"]),
    "cutoff 0": (["--raw-text-file", "user-guide.txt", "--cutoff-len", "0"],
                 ["Cutoff length (tokens) must be at least 8; got 0"]),
    "overlap -1": (["--raw-text-file", "user-guide.txt", "--overlap-len", "-1"],
                   ["Overlap length (tokens) must be at least 0"]),
    "min chars 2.5": (["--raw-text-file", "user-guide.txt", "--min-chars", "2.5"],
                      ["Minimum block size (characters) must be a whole number"]),
    "cutoff 1e9": (["--raw-text-file", "user-guide.txt", "--cutoff-len", "1e9"],
                   ["Cutoff length (tokens) must be at most 32768"]),
    "model folder without weights": (["--model", "no-weights", "--raw-text-file", "user-guide.txt"],
                                     ["no-weights has no weights"]),
    "GGUF of an unknown architecture": (["--model", "mamba9.gguf", "--raw-text-file", "user-guide.txt"],
                                        ["cannot load the GGUF file mamba9.gguf", "mamba9", "not supported"]),
    "garbage with a .gguf ending": (["--model", "garbage.gguf", "--raw-text-file", "user-guide.txt"],
                                    ["cannot load the GGUF file garbage.gguf"]),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, default_model_dir, tiny_model_dir):
    """One home with every bad file; every command runs as `python -m trainer ...`, three at a time."""
    home = tmp_path_factory.mktemp("cli") / "home"
    _link_tree(default_model_dir, home / "models" / DEFAULT_MODEL)
    _link_tree(tiny_model_dir, home / "models" / TINY_MODEL)
    shutil.copytree(CODE_ROOT / "datasets", home / "datasets")
    (home / "loras").mkdir()
    write_bad_files(home)
    copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home, "tiny-adapter")
    run_dir = home / "loras" / "no-weights-run"
    run_dir.mkdir()
    (run_dir / "training_parameters.json").write_text(json.dumps(
        {"lora_name": "no-weights-run", "base_model": "no-weights", "raw_text_file": "user-guide.txt"}))

    commands = {name: ["preview", *args] for name, (args, _) in PREVIEW_CASES.items()}
    commands["a 5 MB line without a newline"] = ["preview", "--raw-text-file", "one-line.txt", "--show", "1"]
    commands["an adapter of another base model"] = [
        "perplexity", "--model", DEFAULT_MODEL, "--lora", "tiny-adapter", "--text-file", "general-text.txt",
        "--stride", "64", "--max-length", "64", "--json"]
    commands["train on a model folder without weights"] = ["train", "--run-dir", str(run_dir)]

    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT")}
    env.update({HOME_ENV: str(home), "PYTHONPATH": str(CODE_ROOT)})

    def run(argv):
        done = subprocess.run([sys.executable, "-m", "trainer", *argv], cwd=CODE_ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout, done.stderr

    before = snapshot(home)
    # The slow ones first, so the quick ones fill the gaps.
    order = sorted(commands, key=lambda n: n not in ("a 5 MB line without a newline",
                                                     "an adapter of another base model"))
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(order, pool.map(run, [commands[n] for n in order])))
    after = snapshot(home)
    return {"results": results, "before": before, "after": after, "home": home}


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("case", sorted(PREVIEW_CASES))
def test_preview_refuses_bad_input_with_one_error_line(cli_results, case):
    code, out, err = cli_results["results"][case]
    assert code == 2, (code, err[-3000:])
    assert out == ""
    line = error_line(err)
    for part in PREVIEW_CASES[case][1]:
        assert part.lower() in line.lower(), (part, line)


def test_a_5mb_line_without_newline_chunks_fine_on_the_command_line(cli_results):
    code, out, err = cli_results["results"]["a 5 MB line without a newline"]
    assert code == 0, err[-3000:]
    stats = dict(line.strip().split(": ", 1) for line in out.splitlines() if line.startswith("  "))
    assert int(stats["samples"]) > 5000 and int(stats["max_tokens"]) <= 256
    assert int(stats["blocks"]) == 1 and int(stats["dropped_blocks"]) == 0


def test_an_adapter_of_another_base_model_is_refused_by_perplexity(cli_results):
    code, out, err = cli_results["results"]["an adapter of another base model"]
    assert code == 2, (code, err[-3000:])
    assert out == ""
    line = error_line(err)
    assert "does not fit this base model" in line and "shape mismatch" in line, line


def test_train_on_a_model_without_weights_fails_with_a_sentence(cli_results):
    code, out, err = cli_results["results"]["train on a model folder without weights"]
    assert code == 1, (code, err[-3000:])
    status = json.loads((cli_results["home"] / "loras" / "no-weights-run" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == \
        "no-weights has no weights (no .safetensors or pytorch_model.bin file)."
    assert not (cli_results["home"] / "loras" / "no-weights-run" / "adapter_model.safetensors").exists()


def test_the_command_line_changed_nothing_on_disk(cli_results):
    """Bad input writes nothing; only the train command recorded its failure in its own run folder (and took
    the run's lock)."""
    before, after = cli_results["before"], cli_results["after"]
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert "loras/no-weights-run/status.json" in changed
    assert all(k.startswith(("loras/no-weights-run/", "loras/.locks")) for k in changed), changed


# ---- the pages ---------------------------------------------------------------------------------------
def data_page(**state) -> AppTest:
    at = AppTest.from_file(DATA_PAGE, default_timeout=120)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


@pytest.fixture
def bad_home(home):
    write_bad_files(home)
    return home


PAGE_CASES = [
    # (id, data mode, dataset, format, model, expected message parts)
    ("empty text file", "Raw text", "empty.txt", None, None, ["No text left to train on"]),
    ("only hard cuts", "Raw text", "only-cuts.txt", None, None, ["No text left to train on"]),
    ("JSON object, not a list", "Formatted JSON", "object.json", "alpaca-format", None,
     ["object.json must hold a JSON list of objects"]),
    ("JSON list of numbers", "Formatted JSON", "scalars.json", "alpaca-format", None, ["row 0", "not an object"]),
    ("JSONL with one broken line", "Formatted JSON", "broken.jsonl", "alpaca-format", None,
     ["broken.jsonl, line 2: not valid JSON"]),
    ("format file not an object", "Formatted JSON", "dashboard-instructions.json", "list-format", None,
     ["list-format.json must be a JSON object"]),
    ("template names an unlisted field", "Formatted JSON", "dashboard-instructions.json", "unlisted-format", None,
     ["%input%", "does not list"]),
    ("model folder without weights", "Raw text", "user-guide.txt", None, "no-weights", ["no-weights has no weights"]),
    ("GGUF of an unknown architecture", "Raw text", "user-guide.txt", None, "mamba9.gguf",
     ["cannot load the GGUF file mamba9.gguf", "not supported"]),
    ("garbage with a .gguf ending", "Raw text", "user-guide.txt", None, "garbage.gguf",
     ["cannot load the GGUF file garbage.gguf"]),
]


@pytest.mark.parametrize("case, mode, dataset, fmt, model, expected", PAGE_CASES, ids=[c[0] for c in PAGE_CASES])
def test_data_page_shows_a_clear_message_and_writes_nothing(bad_home, case, mode, dataset, fmt, model, expected):
    before = snapshot(bad_home)
    at = data_page()
    if model:
        at.selectbox(key="dp_model").set_value(model).run()
    at.radio(key="dp_mode").set_value(mode).run()
    if mode == "Raw text":
        at.selectbox(key="dp_dataset_raw").set_value(dataset)
    else:
        at.selectbox(key="dp_dataset_formatted").set_value(dataset)
        at.selectbox(key="dp_format").set_value(fmt)
    at.run()
    assert not at.exception, at.exception
    shown = errors(at)
    assert any(all(part.lower() in e.lower() for part in expected) for e in shown), shown
    assert not at.metric, "no preview is shown for bad input"
    assert not any(b.label == "Use these settings on the Train page" for b in at.button)
    assert snapshot(bad_home) == before


def test_data_page_previews_a_5mb_line_without_newline(bad_home):
    at = data_page()
    at.selectbox(key="dp_dataset_raw").set_value("one-line.txt").run()
    assert not at.exception and not errors(at), errors(at)
    shown = {m.label: m.value for m in at.metric}
    assert int(shown["Samples"].replace(",", "")) > 5000
    assert int(shown["Max length"].replace(",", "")) <= 256
    assert shown["Dropped blocks"] == "0"


@pytest.mark.parametrize("field, value, message", [
    ("cutoff_len", -5, "Cutoff length (tokens) must be at least 8; got -5."),
    ("cutoff_len", 0, "Cutoff length (tokens) must be at least 8; got 0."),
    ("micro_batch_size", 0, "Micro batch size must be at least 1; got 0."),
    ("learning_rate", -0.001, "Learning rate must be above 0; got -0.001."),
    ("learning_rate", 0.0, "Learning rate must be above 0; got 0."),
    ("epochs", -1.0, "Epochs must be above 0; got -1."),
])
def test_train_page_refuses_negative_and_zero_numbers(home, field, value, message):
    before = snapshot(home)
    at = AppTest.from_file(TRAIN_PAGE, default_timeout=120)
    at.run()
    at.text_input(key="tp_lora_name").input("numbers")
    at.selectbox(key="tp_base_model").select(TINY_MODEL)
    at.selectbox(key="tp_raw_text_file").select("user-guide.txt")
    at.number_input(key="tp_overlap_len").set_value(0)
    at.number_input(key="tp_" + field).set_value(value)
    at.run()
    assert not at.exception, at.exception
    assert message in errors(at), errors(at)
    assert next(b for b in at.button if b.label == "Start training").disabled
    assert snapshot(home) == before


# ---- hypothesis: random JSON into the data layer -------------------------------------------------
json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                | st.text(max_size=20) | st.sampled_from(["%instruction%", "%output%", "### Response:", "", " ",
                                                         "user", "assistant", "system", "<|im_end|>"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
keys = st.sampled_from(["instruction", "input", "output", "messages", "text", "role", "content"]) | st.text(max_size=6)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | json_scalars,
                                           "content": st.text(max_size=30) | json_scalars}), max_size=4)
rows = st.dictionaries(keys, json_values | messages, max_size=5)
datasets = st.lists(rows, max_size=5) | json_values
format_files = (st.dictionaries(st.sampled_from(["instruction,output", "instruction,input,output", "text", ",", "a,b"])
                                | st.text(max_size=10), st.text(max_size=30) | json_scalars, max_size=4)
                | json_values)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=datasets, fmt=format_files, jsonl=st.booleans(), after=st.sampled_from(["", "### Response:", "x"]),
       cutoff=st.sampled_from([8, 16, 256]), overlong=st.sampled_from(["truncate", "drop"]))
def test_random_json_rows_give_a_preview_or_a_dashboard_error(home, tokenizer, data, fmt, jsonl, after, cutoff,
                                                              overlong):
    name = "random.jsonl" if jsonl else "random.json"
    path = home / "datasets" / name
    if jsonl and isinstance(data, list):
        path.write_text("\n".join(json.dumps(row) for row in data), encoding="utf-8")
    else:
        path.write_text(json.dumps(data), encoding="utf-8")
    (home / "formats").mkdir(exist_ok=True)
    (home / "formats" / "random-format.json").write_text(json.dumps(fmt), encoding="utf-8")
    params = TrainingParameters(dataset=name, format="random-format", train_only_after=after, cutoff_len=cutoff,
                                overlong_samples=overlong)
    try:
        preview = build_samples(params, tokenizer)
    except DashboardError as exc:
        assert exc.message
        return
    for sample in preview.samples:
        assert len(sample.input_ids) == len(sample.label_mask) <= cutoff
        assert any(sample.label_mask)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), suffix=st.sampled_from([".json", ".jsonl"]))
def test_random_bytes_load_as_rows_or_raise_dashboard_error(tmp_path, raw, suffix):
    path = tmp_path / f"bytes{suffix}"
    path.write_bytes(raw)
    try:
        loaded = load_rows(path)
    except DashboardError as exc:
        assert exc.message
        return
    assert loaded and all(isinstance(row, dict) for row in loaded)
    fmt = tmp_path / "bytes-format.json"
    fmt.write_bytes(raw)
    try:
        load_format(fmt)
    except DashboardError:
        pass
