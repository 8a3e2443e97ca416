"""`python -m trainer preview` as a subprocess: its JSON is exactly what build_samples gives in-process,
its --help names every option, and bad input ends with a clear "error:" line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from trainer.cli import PREVIEW_FIELDS
from trainer.data import build_samples
from trainer.home import CODE_ROOT
from trainer.params import TrainingParameters

RAW_OPTIONS = dict(raw_text_file="user-guide.txt", cutoff_len=96, overlap_len=24, newline_favor_len=64,
                   min_chars=40, add_bos_token=True, add_eos_token=True)
FORMATTED_OPTIONS = dict(dataset="dashboard-instructions.json", format="alpaca-chatbot-format", cutoff_len=64, overlap_len=16,
                         train_only_after="Assistant:", add_eos_token=True, overlong_samples="drop")


def argv(options: dict) -> list[str]:
    args = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def start(home, *args: str) -> subprocess.Popen:
    env = {**os.environ, "LORA_DASHBOARD_HOME": str(home), "PYTHONPATH": str(CODE_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "trainer", "preview", *args], cwd=CODE_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=240)
    return process.returncode, out, err


def test_preview_json_equals_build_samples(home, tokenizer):
    # Both previews run at once (each subprocess spends most of its time importing transformers).
    raw = start(home, *argv(RAW_OPTIONS), "--json")
    formatted = start(home, *argv(FORMATTED_OPTIONS), "--json")
    for process, options, kind in ((raw, RAW_OPTIONS, "raw"), (formatted, FORMATTED_OPTIONS, "formatted")):
        code, out, err = finish(process)
        assert code == 0, err
        printed = json.loads(out)
        expected = build_samples(TrainingParameters(**options), tokenizer)
        assert printed["kind"] == kind == expected.kind
        assert [s["input_ids"] for s in printed["samples"]] == [s.input_ids for s in expected.samples]
        assert [s["label_mask"] for s in printed["samples"]] == [s.label_mask for s in expected.samples]
        assert printed == json.loads(json.dumps(expected.to_json()))
        assert printed["stats"]["samples"] == len(printed["samples"]) > 0
        for sample in printed["samples"]:
            assert sample["n_tokens"] == len(sample["input_ids"]) <= options["cutoff_len"]
            assert sample["n_trained"] == sum(sample["label_mask"])
            assert isinstance(sample["text"], str)
    # The options really reached the preview: the formatted one masks the prompt, the raw one adds BOS.
    assert any(0 in s["label_mask"][1:] for s in printed["samples"])
    assert printed["stats"]["dropped_overlong"] > 0


def test_preview_help_names_every_option(home):
    code, out, err = finish(start(home, "--help"))
    assert code == 0, err
    for name in PREVIEW_FIELDS + ["model", "json"]:
        assert "--" + name.replace("_", "-") in out, name
        if "_" in name:
            assert "--" + name not in out  # kebab case, not snake case
    for name in ("add_eos_token", "add_bos_token", "skip_unmatched_rows"):
        assert "--no-" + name.replace("_", "-") in out


def test_bad_input_exits_with_a_clear_error(home):
    (home / "datasets" / "latin1.txt").write_bytes(b"plain text, then caf\xe9 and more")
    cases = [
        (["--raw-text-file", "user-guide.txt", "--cutoff-len", "64", "--overlap-len", "64"],
         ["Overlap length (64)", "cutoff length (64)"]),
        (["--raw-text-file", "no-such-file.txt"], ["not found", "no-such-file.txt"]),
        (["--raw-text-file", "latin1.txt"], ["latin1.txt is not UTF-8", "byte offset 20"]),
        (["--dataset", "no-such-set.json", "--format", "alpaca-format"], ["Dataset not found"]),
        (["--raw-text-file", "user-guide.txt", "--cutoff-len", "many"], ["Cutoff length (tokens) must be a whole number", "'many'"]),
        (["--dataset", "dashboard-instructions.json", "--format", "no-such-format"], ["Format file not found"]),
    ]
    processes = [(start(home, *args, "--json"), expected) for args, expected in cases]
    for process, expected in processes:
        code, out, err = finish(process)
        assert code != 0
        assert out == ""
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, err
        for part in expected:
            assert part in lines[0], (part, err)
        assert "Traceback" not in err
