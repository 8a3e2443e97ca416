"""Export: an adapter merged into its base model gives the same logits as base+adapter, is saved as a plain
model folder under models/, and never replaces an existing folder."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer import jobs
from trainer.errors import DashboardError
from trainer.export import check_export_target, default_export_name, export_merged
from trainer.models import list_models

from .evalhelpers import copy_run, trained_run_source, wait_for

PROBE = "Checkpoints are saved every few steps, so a stopped run can be resumed where it ended."


@pytest.fixture
def trained(home, tiny_model_dir, tmp_path_factory):
    return copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)


def probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_model_logits_equal_base_plus_adapter(home, trained, tiny_model_dir):
    result = export_merged(trained, "trained-merged", progress=lambda message: None)
    folder = home / "models" / "trained-merged"
    assert result["path"] == str(folder) and result["base_model"] == "tiny-llama"
    assert result["max_abs_diff"] < 1e-4 and result["max_abs_diff_reloaded"] < 1e-4

    # Independently: base + adapter through PEFT, against the saved folder loaded by plain transformers.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_logits = probe_logits(base, tokenizer)
    with_adapter = PeftModel.from_pretrained(base, trained).eval()
    expected = probe_logits(with_adapter, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    actual = probe_logits(merged, tokenizer)
    assert float((actual - expected).abs().max()) < 1e-4
    assert float((expected - base_logits).abs().max()) > 1e-3  # the adapter really changes the model

    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not (folder / "adapter_config.json").exists()  # a plain model, no PEFT needed
    assert "trained-merged" in list_models()
    assert not [p for p in (home / "models").iterdir() if p.name.endswith(".tmp")]


def test_export_never_overwrites_and_checks_names(home, trained):
    (home / "models" / "taken").mkdir()
    for name, message in (("taken", "already exists"), ("tiny-llama", "already exists"),
                          ("../outside", "path separator"), (".hidden", "starts with a dot"), ("", "empty")):
        with pytest.raises(DashboardError, match=message):
            check_export_target(name)
        with pytest.raises(DashboardError, match=message):
            jobs.start_export(trained, name)
    assert default_export_name(trained) == "trained-merged"
    assert default_export_name(trained / "checkpoint-2") == "trained-checkpoint-2-merged"


def test_export_of_an_adapter_that_does_not_fit_saves_nothing(home, trained):
    with pytest.raises(DashboardError, match="does not fit this base model"):
        export_merged(trained, "wrong-base", base_model="SmolLM2-135M-Instruct", progress=lambda message: None)
    assert not (home / "models" / "wrong-base").exists()
    assert not [p for p in (home / "models").iterdir() if p.name.startswith(".wrong-base")]


def test_export_job_from_a_checkpoint(home, trained):
    job_id = jobs.start_export(trained / "checkpoint-2", "ckpt2-merged")
    state = wait_for(lambda: (s := jobs.job_state(jobs.job_dir_for(job_id)))["state"] not in ("queued", "running")
                     and s, timeout=180, what="the export job")
    assert state["state"] == "completed", state
    assert state["result"]["max_abs_diff_reloaded"] < 1e-4
    assert (home / "models" / "ckpt2-merged" / "config.json").is_file()
    with pytest.raises(DashboardError, match="already exists"):
        jobs.start_export(trained, "ckpt2-merged")
