"""Refuse what cannot work, before it starts (issue 12): no samples, fewer samples than one optimiser step,
a warm-up as long as the run; a learning rate far above LoRA's range is a warning; the plan shows the disk
space the run's checkpoints take beside the free space. Each on the Train page (AppTest) and on the command
line (`python -m trainer train`), with its sentence, and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from trainer import footprint
from trainer.targets import model_layers
from trainer.batching import warmup_steps_for
from trainer.home import CODE_ROOT, HOME_ENV
from trainer.params import TrainingParameters

from .evalhelpers import TRAINED_PARAMS, trained_run_source
from .homefiles import snapshot
from .trainhelpers import TINY_PARAMS

PAGE = str(CODE_ROOT / "views" / "train.py")
# Rows no format key matches and no shape reads (they are skipped when skip unmatched rows is ticked).
QA_ROWS = [{"question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(4)]
THREE_ROWS = [{"instruction": f"Say {word}.", "output": word} for word in ("one", "two", "three")]

NO_SAMPLES = "No sample to train on: every row was unmatched or dropped"
CHOOSE = "Choose a format file with a key naming the rows' fields, or give the rows a shape read without one"
FEW_SAMPLES = ("Only 3 samples to train on, fewer than one optimiser step: the batch size is 8 (micro batch 4 x "
               "accumulation 2 x 1 process). To train on full batches, set the micro batch size to 3 and the batch "
               "size to 3, or add data.")
WARMUP = ("The warm-up (10 steps) is at least as long as the run (6 steps): the learning rate would never reach its "
          "peak 3e-4, and the first step trains at 0. Set warmup steps below 6 (0: no warm-up), or warmup ratio to "
          "0.1 to warm up over the first 10% of the run (1 of 6 steps).")
HIGH_RATE = ("Learning rate 1 is far above what LoRA tolerates: LoRA usually trains at 1e-5 to 5e-4; 1 will likely "
             "make the loss blow up.")


def write_datasets(home: Path) -> None:
    (home / "datasets" / "question-answer.json").write_text(json.dumps(QA_ROWS), encoding="utf-8")
    (home / "datasets" / "three-rows.json").write_text(json.dumps(THREE_ROWS), encoding="utf-8")


# ---- the Train page -----------------------------------------------------------------------------------
def form(home: Path, **values) -> AppTest:
    """The Train page with the tiny model and these values in its fields (data: user-guide.txt, cutoff 64)."""
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.run()
    at.text_input(key="tp_lora_name").input("refused")
    at.selectbox(key="tp_base_model").select("tiny-llama")
    values = {"raw_text_file": "user-guide.txt", "cutoff_len": 64, "overlap_len": 16, **values}
    for name, value in values.items():
        key = "tp_" + name
        if isinstance(value, bool):
            at.checkbox(key=key).check() if value else at.checkbox(key=key).uncheck()
        elif isinstance(value, str):
            at.selectbox(key=key).select(value)
        else:
            at.number_input(key=key).set_value(value)
    at.run()
    assert not at.exception, at.exception
    return at


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def warnings(at: AppTest) -> list[str]:
    return [w.value for w in at.warning]


def start_button(at: AppTest):
    return next(b for b in at.button if b.label == "Start training")


def user_files(home: Path) -> dict:
    """The home's files but the page's own state (.dashboard/: the form kept across reloads)."""
    return {k: v for k, v in snapshot(home).items() if not k.startswith(".dashboard")}


def refused(home: Path, expected: list[str], **values) -> AppTest:
    """The page shows a sentence with every expected part, twice (in the plan and under its field), Start stays
    disabled, and nothing is written."""
    before = user_files(home)
    at = form(home, **values)
    matching = [e for e in errors(at) if all(part in e for part in expected)]
    assert len(matching) == 2, errors(at)
    assert start_button(at).disabled
    at.run()
    assert user_files(home) == before
    return at


def test_rows_all_skipped_as_unmatched_are_refused_under_the_format_field(home):
    write_datasets(home)
    at = refused(home, [NO_SAMPLES, CHOOSE], raw_text_file="", dataset="question-answer.json",
                 format="alpaca-format", skip_unmatched_rows=True)
    assert {m.label: m.value for m in at.metric}["Samples"] == "0"


def test_fewer_samples_than_one_optimiser_step_are_refused_with_the_batch_that_fits(home):
    write_datasets(home)
    refused(home, [FEW_SAMPLES], raw_text_file="", dataset="three-rows.json", format="alpaca-format")
    at = form(home, raw_text_file="", dataset="three-rows.json", format="alpaca-format", micro_batch_size=3,
              batch_size=3, warmup_steps=0)
    assert not errors(at) and not start_button(at).disabled


def test_the_default_warm_up_of_a_six_step_run_is_refused_and_a_ratio_fixes_it(home):
    refused(home, [WARMUP], max_steps=6)
    at = form(home, max_steps=6, warmup_ratio=0.1)
    assert not errors(at) and not start_button(at).disabled
    assert any("Warm-up 1 of 6 steps." in c.value for c in at.caption)


def test_a_learning_rate_far_above_lora_range_is_a_warning_and_start_stays_enabled(home):
    at = form(home, max_steps=6, warmup_steps=1, learning_rate=1.0)
    assert warnings(at).count(HIGH_RATE) == 2, warnings(at)  # in the plan and under the field
    assert not errors(at) and not start_button(at).disabled
    at = form(home, max_steps=6, warmup_steps=1, learning_rate=5e-3)
    assert not any("far above" in w for w in warnings(at))


def test_the_plan_shows_the_disk_space_and_warns_when_it_will_not_fit(home, monkeypatch):
    at = form(home, max_steps=50, warmup_steps=1, save_steps=10, lora_rank=8)
    estimate = footprint.estimate(TrainingParameters(base_model="tiny-llama", lora_rank=8, save_steps=10), 50)
    caption = next(c.value for c in at.caption if "Disk:" in c.value)
    assert f"4 checkpoints kept x {footprint.size_text(estimate.checkpoint_bytes)}" in caption, caption
    assert "free where loras/ is" in caption and not warnings(at)

    monkeypatch.setattr(footprint, "free_space", lambda folder: 100_000)
    at = form(home, max_steps=50, warmup_steps=1, save_steps=10, lora_rank=8)
    shown = [w for w in warnings(at) if w.startswith("The run needs up to")]
    assert len(shown) == 2 and "but only 100 kB is free" in shown[0] and "keep the last n checkpoints" in shown[0]
    assert not start_button(at).disabled  # a warning, not a refusal


# ---- the disk estimate against a real run -----------------------------------------------------------------
def folder_bytes(folder: Path, names=None) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and (names is None or p.name in names))


def test_the_estimate_is_within_ten_percent_of_a_real_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    run_dir = trained_run_source(tiny_model_dir, tmp_path)
    monkeypatch.setenv(HOME_ENV, str(run_dir.parent.parent))
    params = TrainingParameters.from_dict(TRAINED_PARAMS)
    estimate = footprint.estimate(params, TRAINED_PARAMS["max_steps"])
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    assert estimate.saves == estimate.kept == len(checkpoints) == 2
    for checkpoint in checkpoints:
        assert abs(estimate.checkpoint_bytes / folder_bytes(checkpoint) - 1) < 0.10, (estimate, checkpoint)
    adapter = folder_bytes(run_dir, {"adapter_model.safetensors", "adapter_config.json", "README.md"})
    assert abs(estimate.adapter_bytes / adapter - 1) < 0.10
    # The adapter's numbers are peft's own count: rank x (inputs + outputs) of each targeted layer.
    from safetensors import safe_open

    with safe_open(run_dir / "adapter_model.safetensors", "pt") as weights:
        shapes = [weights.get_slice(key).get_shape() for key in weights.keys()]
    assert estimate.adapter_parameters == sum(rows * cols for rows, cols in shapes)
    limited = footprint.estimate(TrainingParameters.from_dict({**TRAINED_PARAMS, "save_total_limit": 1}), 6)
    assert (limited.saves, limited.kept) == (2, 1)
    assert limited.peak_bytes == 2 * limited.checkpoint_bytes + limited.adapter_bytes


def test_the_config_sizes_give_the_same_shapes_as_the_model_on_the_meta_device(home):
    config = json.loads((home / "models" / "tiny-llama" / "config.json").read_text())
    layers = model_layers("tiny-llama")
    built = [s for s in layers.layers if s[0] != layers.output_layer]
    assert footprint.config_shapes(config) == built


# ---- the command line ----------------------------------------------------------------------------------
CLI_CASES = {
    "no samples": ({"raw_text_file": "", "dataset": "question-answer.json", "format": "alpaca-format",
                    "skip_unmatched_rows": True, "warmup_steps": 0}, [NO_SAMPLES, CHOOSE]),
    "fewer samples than a batch": ({"raw_text_file": "", "dataset": "three-rows.json", "format": "alpaca-format",
                                    "micro_batch_size": 4, "batch_size": 8, "warmup_steps": 0}, [FEW_SAMPLES]),
    "warm-up as long as the run": ({"micro_batch_size": 4, "batch_size": 8, "learning_rate": 3e-4,
                                    "warmup_steps": 10, "max_steps": 6}, [WARMUP]),
}


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory, default_model_dir, tiny_model_dir):
    """One home, every refused run folder and one with a high learning rate, run at once."""
    from .conftest import _link_tree

    home = tmp_path_factory.mktemp("refusals") / "home"
    _link_tree(tiny_model_dir, home / "models" / "tiny-llama")
    (home / "datasets").mkdir(parents=True)
    for name in ("user-guide.txt",):
        (home / "datasets" / name).write_bytes((CODE_ROOT / "datasets" / name).read_bytes())
    write_datasets(home)
    runs = {name: {**TINY_PARAMS, **values} for name, (values, _) in CLI_CASES.items()}
    runs["high learning rate"] = {**TINY_PARAMS, "learning_rate": 1.0, "max_steps": 1, "warmup_steps": 0}
    folders = {}
    for number, (case, values) in enumerate(runs.items()):
        folders[case] = home / "loras" / f"run-{number}"
        folders[case].mkdir(parents=True)
        (folders[case] / "training_parameters.json").write_text(json.dumps({**values, "lora_name": f"run-{number}"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT")}
    env.update({HOME_ENV: str(home), "PYTHONPATH": str(CODE_ROOT)})

    def run(case):
        done = subprocess.run([sys.executable, "-m", "trainer", "train", "--run-dir", str(folders[case])],
                              cwd=CODE_ROOT, env=env, capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout, done.stderr

    before = snapshot(home)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(runs, pool.map(run, runs)))
    return {"home": home, "folders": folders, "results": results, "before": before, "after": snapshot(home)}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_the_command_line_refuses_with_the_sentence_and_writes_only_the_failure(cli_home, case):
    code, out, err = cli_home["results"][case]
    assert code == 2, (code, err[-3000:])
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for part in CLI_CASES[case][1]:
        assert part in lines[0], (part, lines[0])
    run_dir = cli_home["folders"][case]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == lines[0].removeprefix("error: ")
    assert "Loading the model" not in out + err


def test_a_refused_run_writes_nothing_but_its_failed_status(cli_home):
    """As any refused run today (test_bad_input.py): its status.json says why; no model loaded, no metrics, no
    adapter, no checkpoint. Only the run with the high learning rate trained."""
    before, after = cli_home["before"], cli_home["after"]
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    trained = f"loras/{cli_home['folders']['high learning rate'].name}/"
    refused = {f"loras/{cli_home['folders'][case].name}/status.json" for case in CLI_CASES}
    assert refused <= changed
    assert all(k in refused or k.startswith((trained, "loras/.locks")) for k in changed), changed


def test_the_command_line_warns_of_a_high_learning_rate_and_trains(cli_home):
    code, out, err = cli_home["results"]["high learning rate"]
    assert f"warning: {HIGH_RATE}" in err.splitlines(), err[-3000:]
    assert not [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Loading the model" in out + err  # it went on to train


def test_warmup_steps_for_a_ratio_rounds_up_as_the_hf_trainer():
    assert warmup_steps_for(TrainingParameters(warmup_steps=10), 6) == 10
    assert warmup_steps_for(TrainingParameters(warmup_steps=10, warmup_ratio=0.1), 6) == 1
    assert warmup_steps_for(TrainingParameters(warmup_ratio=0.25), 100) == 25
    assert warmup_steps_for(TrainingParameters(warmup_ratio=0.5), 3) == 2


def sigterm_caught(pid: int) -> bool:
    """Whether the process has its own SIGTERM handler installed (/proc/PID/status SigCgt, bit 15)."""
    try:
        fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
    except FileNotFoundError:
        return False
    return bool(int(fields["SigCgt"].strip(), 16) & (1 << (15 - 1)))


def test_a_stop_while_the_run_is_checked_ends_it_stopped_not_queued(home):
    """The check before the start loads the tokenizer and the samples; a Stop meanwhile must not leave the run
    `queued` with a dead process (the page's Stop sends SIGTERM to the process group)."""
    import signal

    from .trainhelpers import start_trainer, status_of, wait_for, write_run

    run_dir = write_run(home, "stopped-early", max_steps=5000, warmup_steps=0)
    (run_dir / "status.json").write_text(json.dumps({"state": "queued", "started_at": "2026-01-02T10:00:00+00:00"}))
    process = start_trainer(run_dir)
    try:
        wait_for(lambda: sigterm_caught(process.pid), timeout=120, interval=0.005, what="the SIGTERM handler")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=240) == 0, (run_dir / "train.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    status = status_of(run_dir)
    assert status["state"] == "stopped" and status["started_at"] == "2026-01-02T10:00:00+00:00", status
