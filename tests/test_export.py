"""Export: an adapter merged into its base model gives the same logits as base+adapter, is saved as a plain
model folder under models/, and never replaces an existing folder."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer import jobs
from trainer.errors import DashboardError
from trainer.export import (
    RELATIVE_TOLERANCE, check_export_target, check_logits, default_export_name, export_merged, logit_limit,
)
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
    assert result["tolerance"] == pytest.approx(RELATIVE_TOLERANCE * result["logit_scale"])
    assert result["max_abs_diff_reloaded"] < result["tolerance"] < result["adapter_effect"]

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


def test_the_check_scales_with_the_logits():
    """A larger model rounds more in float32 but spreads its logits about as much: the limit follows the spread
    (0.1% of the logits' standard deviation), so rounding passes and a real mismatch does not."""
    torch.manual_seed(0)
    reference = 7 * torch.randn(1, 30, 4096)  # logits spread like the 135M model's (std about 7)
    limit = logit_limit(reference)
    assert limit == pytest.approx(RELATIVE_TOLERANCE * 7, rel=0.01)
    for rounding in (8.4e-5, 8.4e-4):  # the 135M model's rounding, and ten times it (over the old 1e-4 limit)
        merged = reference + rounding * torch.sign(torch.randn_like(reference))
        assert check_logits(merged, reference, limit, "The merged model's") == pytest.approx(rounding, rel=0.01)
    wrong = reference.clone()
    wrong[0, 3, :100] += 0.05  # one position's logits moved by 0.7% of the spread
    with pytest.raises(DashboardError, match="the merge is wrong; nothing was saved"):
        check_logits(wrong, reference, limit, "The merged model's")
    assert logit_limit(reference / 100) == pytest.approx(limit / 100)  # small logits, a small limit


@pytest.mark.parametrize("where", ["in memory", "after reloading"])
def test_a_corrupted_merged_weight_fails_the_check(home, trained, monkeypatch, where):
    """One module merged twice (its adapter delta added again): in the merged model, or in the saved folder."""
    from peft.tuners.tuners_utils import BaseTuner

    merge, load = BaseTuner.merge_and_unload, AutoModelForCausalLM.from_pretrained
    deltas = []

    def corrupt(model):
        model.model.layers[0].self_attn.q_proj.weight.data += deltas[0]
        return model

    def merge_twice(self, *args, **kwargs):
        deltas.append(self.model.model.layers[0].self_attn.q_proj.get_delta_weight("default").detach().clone())
        merged = merge(self, *args, **kwargs)
        return corrupt(merged) if where == "in memory" else merged

    def load_corrupted(*args, **kwargs):
        model = load(*args, **kwargs)
        return corrupt(model) if where == "after reloading" and deltas else model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", merge_twice)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load_corrupted)
    what = "The merged model's" if where == "in memory" else "The saved merged model's"
    with pytest.raises(DashboardError, match=f"{what} logits differ from base\\+adapter .* the merge is wrong"):
        export_merged(trained, "corrupted", progress=lambda message: None)
    assert deltas and not (home / "models" / "corrupted").exists()
    assert not [p for p in (home / "models").iterdir() if p.name.startswith(".corrupted")]
