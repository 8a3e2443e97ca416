"""The subprocess trainer: run folder files, checkpoints, resume, stop, failures, quantised models."""

from __future__ import annotations

import json
import math
import os
import re
import signal

import pytest
import torch

from trainer.checkpoints import list_checkpoints, prune_checkpoints, remove_leftovers
from trainer.runfiles import effective_status, read_metrics, request_stop

from .trainhelpers import metrics_of, run_trainer, start_trainer, status_of, wait_for, write_run

# What a quiet train.log may hold besides one line per logged step: the data, the model, its trainable
# parameters, the bookkeeping and the end (7 lines), and room for a few more stages.
LOG_OVERHEAD_LINES = 12

TRAIN_FIELDS = {"step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens", "tokens_per_second",
                "elapsed_s", "eta_s", "time"}
EVAL_FIELDS = {"step", "total_steps", "epoch", "eval_loss", "eval_perplexity", "time"}


def _logits_of(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_tiny_run_writes_every_file_and_the_adapter_reloads_identically(home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.train import train_run

    run_dir = write_run(home, "tiny", max_steps=6, save_steps=3, eval_dataset="general-text.txt", eval_steps=3)
    trained = train_run(run_dir)

    status = status_of(run_dir)
    assert status["state"] == "completed"
    assert status["step"] == status["total_steps"] == 6
    assert status["finished_at"] and status["error"] is None

    lines = metrics_of(run_dir)
    train_lines = [r for r in lines if "loss" in r]
    eval_lines = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    for record in train_lines:
        assert set(record) == TRAIN_FIELDS
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert record["tokens_per_second"] > 0 and record["total_steps"] == 6
    assert train_lines[-1]["tokens"] > train_lines[0]["tokens"] > 0
    assert [r["step"] for r in eval_lines] == [3, 6]
    for record in eval_lines:
        assert set(record) == EVAL_FIELDS
        assert record["eval_perplexity"] == pytest.approx(math.exp(record["eval_loss"]))

    checkpoints = list_checkpoints(run_dir)
    assert [c.name for c in checkpoints] == ["checkpoint-3"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                 "rng_state.pt", "trainer_state.json"):
        assert (checkpoints[0] / name).is_file(), name
    assert json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"] == 3

    assert (run_dir / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(home / "models" / "tiny-llama")
    reloaded = PeftModel.from_pretrained(base, run_dir)
    input_ids = torch.tensor([[1, 50, 200, 3000, 42, 7, 9000]])
    expected = _logits_of(trained, input_ids)
    assert torch.equal(_logits_of(reloaded, input_ids), expected)
    # and the adapter really changed the model
    plain = AutoModelForCausalLM.from_pretrained(home / "models" / "tiny-llama")
    assert not torch.allclose(_logits_of(plain, input_ids), expected)


def test_cli_train_and_stop_at_loss(home):
    run_dir = write_run(home, "stopatloss", max_steps=50, stop_at_loss=50.0)
    result = run_trainer(run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    status = status_of(run_dir)
    assert status["state"] == "completed" and status["step"] == 1
    assert "stop-at-loss" in status["reason"]
    assert (run_dir / "adapter_config.json").is_file()


def test_sigkill_then_resume_continues_the_same_schedule(home):
    full = write_run(home, "uninterrupted", max_steps=40, save_steps=5)
    assert run_trainer(full).returncode == 0
    reference = {r["step"]: r for r in metrics_of(full) if "loss" in r}

    run_dir = write_run(home, "killed", max_steps=40, save_steps=5)
    process = start_trainer(run_dir)
    wait_for(lambda: list_checkpoints(run_dir), what="the first checkpoint")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    status = effective_status(run_dir)
    assert status["state"] == "failed" and status.get("process_gone")
    assert "Resume" in status["error"]
    killed_at = [r["step"] for r in read_metrics(run_dir)]  # readable despite the kill
    checkpoint = list_checkpoints(run_dir)[-1]
    checkpoint_step = int(checkpoint.name.split("-")[1])
    assert checkpoint_step >= 5 and killed_at and max(killed_at) >= checkpoint_step
    assert max(killed_at) < 40, "the run should have been killed before its end"

    result = run_trainer(run_dir, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert status_of(run_dir)["state"] == "completed"
    resumed = [r for r in metrics_of(run_dir) if "loss" in r]
    steps = [r["step"] for r in resumed]
    assert steps == list(range(1, 41)), "the metrics file continues without gaps or duplicates"
    for record in resumed:
        ref = reference[record["step"]]
        assert record["learning_rate"] == pytest.approx(ref["learning_rate"], rel=1e-9)
        assert record["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-5)
    assert resumed[-1]["tokens"] == reference[40]["tokens"]


def test_stop_request_saves_adapter_and_ends_stopped(home):
    run_dir = write_run(home, "stopme", max_steps=2000)
    process = start_trainer(run_dir)
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and read_metrics(run_dir), what="the first step")
    request_stop(run_dir)
    assert process.wait(timeout=60) == 0
    status = status_of(run_dir)
    assert status["state"] == "stopped" and 0 < status["step"] < 2000
    assert (run_dir / "adapter_model.safetensors").is_file()
    # a stopped run can be resumed from where it stopped
    assert list_checkpoints(run_dir)[-1].name == f"checkpoint-{status['step']}"
    assert not (run_dir / "stop_requested").exists()


def test_a_nan_loss_fails_the_run_with_a_sentence(home):
    from safetensors.torch import load_file, save_file

    broken = home / "models" / "nan-llama"
    broken.mkdir()
    for item in (home / "models" / "tiny-llama").iterdir():
        if item.name != "model.safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    weights = load_file(home / "models" / "tiny-llama" / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})

    run_dir = write_run(home, "nan", base_model="nan-llama", max_steps=5)
    result = run_trainer(run_dir)
    assert result.returncode == 1
    status = status_of(run_dir)
    assert status["state"] == "failed" and "first step" in status["error"]
    assert status["step"] == 1
    assert not (run_dir / "adapter_model.safetensors").exists(), "a broken run saves no adapter"


def test_an_exception_ends_failed_with_message_and_traceback(home):
    run_dir = write_run(home, "broken", base_model="no-such-model", max_steps=2)
    result = run_trainer(run_dir)
    assert result.returncode == 1
    status = status_of(run_dir)
    assert status["state"] == "failed" and "no-such-model" in status["error"]
    assert "Traceback" in result.stdout + result.stderr


def test_unmatched_rows_refuse_to_start_unless_skipped(home):
    run_dir = write_run(home, "unmatched", raw_text_file="", dataset="dashboard-instructions.json",
                        format="alpaca-format", max_steps=3)
    assert run_trainer(run_dir).returncode != 0
    status = status_of(run_dir)
    assert status["state"] == "failed" and "match no key" in status["error"]

    skipped = write_run(home, "skipped", raw_text_file="", dataset="dashboard-instructions.json",
                        format="alpaca-format", max_steps=3, skip_unmatched_rows=True)
    assert run_trainer(skipped).returncode == 0
    assert status_of(skipped)["state"] == "completed"


@pytest.mark.parametrize("precision", ["8bit", "4bit"])
def test_quantised_base_model_trains_on_cpu(home, precision):
    run_dir = write_run(home, f"q{precision}", max_steps=3, precision=precision, optimizer="adamw_bnb_8bit")
    result = run_trainer(run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [r["loss"] for r in metrics_of(run_dir) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config["r"] == 8


@pytest.mark.slow
def test_real_default_model_trains_three_steps(home):
    run_dir = write_run(home, "smol", base_model="SmolLM2-135M-Instruct", max_steps=3, cutoff_len=48,
                        overlap_len=8, micro_batch_size=2, batch_size=2, learning_rate="2e-4")
    result = run_trainer(run_dir, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [r["loss"] for r in metrics_of(run_dir) if "loss" in r]
    assert len(losses) == 3
    # A pretrained model already knows English: its loss on our guide is far below a random model's ln(49152)=10.8.
    assert 0.5 < losses[0] < 6.0
    assert (run_dir / "adapter_model.safetensors").stat().st_size > 0


def test_keep_the_last_n_checkpoints(home):
    run_dir = write_run(home, "keeptwo", max_steps=9, save_steps=2, save_total_limit=2)
    result = run_trainer(run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [c.name for c in list_checkpoints(run_dir)] == ["checkpoint-6", "checkpoint-8"]
    assert "deleted checkpoint-2 (keep the last 2)" in result.stdout
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")], "nothing half-deleted is left"
    assert status_of(run_dir)["state"] == "completed"


def _fake_checkpoint(run_dir, step):
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    (folder / "optimizer.pt").write_bytes(b"x" * 100)
    return folder


def test_pruning_waits_for_the_newer_checkpoint_and_spares_later_ones(tmp_path):
    run_dir = tmp_path / "run"
    for step in (2, 4, 6, 8):
        _fake_checkpoint(run_dir, step)
    names = lambda: [c.name for c in list_checkpoints(run_dir)]  # noqa: E731
    assert prune_checkpoints(run_dir, 0, run_dir / "checkpoint-8") == [] and len(names()) == 4  # 0: keep all
    # A run resumed from checkpoint-2 has just completed checkpoint-4: checkpoint-2 goes only now, and 6 and 8
    # (from before the resume) are left for the run to overwrite when it gets there.
    assert prune_checkpoints(run_dir, 1, run_dir / "checkpoint-4") == ["checkpoint-2"]
    assert names() == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert prune_checkpoints(run_dir, 2, run_dir / "checkpoint-8") == ["checkpoint-4"]
    assert names() == ["checkpoint-6", "checkpoint-8"]
    assert prune_checkpoints(run_dir, 5, run_dir / "checkpoint-8") == []


def test_leftovers_of_an_interrupted_save_are_removed(tmp_path):
    run_dir = tmp_path / "run"
    _fake_checkpoint(run_dir, 2)
    (run_dir / ".checkpoint-4.tmp").mkdir()
    (run_dir / ".checkpoint-4.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (run_dir / ".checkpoint-1.deleting").mkdir()
    assert remove_leftovers(run_dir) == [".checkpoint-1.deleting", ".checkpoint-4.tmp"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-2"]


def test_a_full_precision_run_writes_a_quiet_log(home):
    steps = 12
    run_dir = write_run(home, "quiet", max_steps=steps, save_steps=6)
    process = start_trainer(run_dir)  # stdout and stderr into train.log, as the Train page launches it
    assert process.wait(timeout=300) == 0
    log = (run_dir / "train.log").read_text()
    assert status_of(run_dir)["state"] == "completed", log
    for noise in ("kernels", "bitsandbytes", "Traceback", "FutureWarning", "Warning", "\r", "it/s]"):
        assert noise not in log, f"{noise!r} in train.log:\n{log}"
    lines = log.splitlines()
    step_lines = [line for line in lines if re.search(r"\] step \d+/12 loss", line)]
    assert len(step_lines) == steps
    assert len(lines) < steps + 1 + LOG_OVERHEAD_LINES, log  # + the checkpoint saved at step 6
    assert any("Loading the model tiny-llama" in line for line in lines)
    # Every line is the trainer's own: a timestamped line, or a warning of the start check (`warning: ...`).
    assert all(re.match(r"\[\d\d:\d\d:\d\d\] |warning: ", line) for line in lines), log
