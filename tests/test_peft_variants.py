"""The PEFT variants (issue 14): DoRA, rsLoRA, PiSSA and OLoRA initialisation, LoRA+ and NEFTune. Each trains a
few steps on the tiny model, takes effect, saves an adapter that peft reloads onto the original base model with
the trained model's logits, and resumes from a checkpoint to the same final adapter as the uninterrupted run."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from trainer.errors import DashboardError
from trainer.params import TrainingParameters, read_and_check

from .trainhelpers import metrics_of, status_of, write_run

VARIANTS = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "pissa": {"lora_init": "pissa"},
    "olora": {"lora_init": "olora"},
    "loraplus": {"loraplus_lr_ratio": 16.0},
    "loraplus-8bit-adamw": {"loraplus_lr_ratio": 16.0, "optimizer": "adamw_bnb_8bit"},  # bitsandbytes' class
    "neftune": {"neftune_noise_alpha": 5.0, "eval_dataset": "general-text.txt", "eval_steps": 4},
}
BASE_CHANGING = {"pissa", "olora"}
INPUT_IDS = torch.tensor([[1, 50, 200, 3000, 42, 7, 9000]])
RANK, ALPHA = 8, 16  # tests/trainhelpers.py TINY_PARAMS


def _logits(model, input_ids=INPUT_IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _base(home):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(home / "models" / "tiny-llama")


def _adapter(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _config(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_of(run_dir) if "loss" in r}


def _resumed_copy(run_dir, name):
    """The run folder as it was once checkpoint-2 was written: its final adapter removed, resumed from there."""
    copy = run_dir.parent / name
    shutil.copytree(run_dir, copy)
    for item in ("adapter_model.safetensors", "adapter_config.json"):
        (copy / item).unlink()
    return copy


def _check_effect(variant, home, run_dir, trained):
    """The option really reached peft / the optimiser / the forward pass."""
    config = _config(run_dir)
    if variant == "dora":
        assert config["use_dora"] is True
        assert any("lora_magnitude_vector" in key for key in _adapter(run_dir))
    if variant == "rslora":
        assert config["use_rslora"] is True
        layer = trained.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(ALPHA / math.sqrt(RANK))
    if variant in BASE_CHANGING:
        # The saved adapter is peft's conversion: a plain LoRA of twice the rank on the original base...
        assert config["init_lora_weights"] is True and config["r"] == 2 * RANK
        assert (run_dir / "initial_adapter" / "adapter_model.safetensors").is_file()
        # ...and the checkpoint keeps the adapter as trained, with its initialisation, for a resume.
        trained_form = run_dir / "checkpoint-2" / "training_adapter"
        assert _config(trained_form)["init_lora_weights"] == variant and _config(trained_form)["r"] == RANK
        from peft import PeftModel

        # Both forms of checkpoint-2 give the same model: a reader of the checkpoint gets the step-2 model.
        converted = _logits(PeftModel.from_pretrained(_base(home), run_dir / "checkpoint-2"))
        as_trained = _logits(PeftModel.from_pretrained(_base(home), trained_form))
        assert torch.allclose(converted, as_trained, atol=1e-5)
    if variant.startswith("loraplus"):
        groups = torch.load(run_dir / "checkpoint-2" / "optimizer.pt", weights_only=True)["param_groups"]
        a_group, b_groups = groups[0], [g for g in groups if g["params"] and g is not groups[0]]
        assert a_group["params"] and b_groups
        for group in b_groups:
            assert group["initial_lr"] == pytest.approx(16.0 * a_group["initial_lr"])
        assert a_group["initial_lr"] == pytest.approx(3e-3)
    if variant == "neftune":
        from trainer.lora import evaluate
        from trainer.trainingdata import TrainingData
        from trainer.variants import start_neftune, stop_neftune

        # The eval loss the trainer logged (its hook attached) is the noiseless one of the trained weights.
        params = TrainingParameters.from_file(run_dir / "training_parameters.json")
        data = TrainingData.prepare(params, 1)
        logged = [r["eval_loss"] for r in metrics_of(run_dir) if "eval_loss" in r]
        assert logged == [evaluate(trained, data.eval_samples, params.micro_batch_size, data.pad_id, "cpu")]

        # transformers' hook: noise while training, none when evaluating.
        hook = start_neftune(trained, 5.0)
        try:
            clean = _logits(trained)
            assert torch.equal(_logits(trained), clean)
            trained.train()
            with torch.no_grad():
                assert not torch.allclose(trained(input_ids=INPUT_IDS).logits, clean)
        finally:
            stop_neftune(trained, hook)
        plain = write_run(home, "neftune-off", max_steps=4)
        from trainer.train import train_run

        train_run(plain)
        assert _losses(plain)[1] != _losses(run_dir)[1], "the noise changes the training loss from step 1"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_variant_trains_saves_reloads_and_resumes_exactly(home, variant):
    from peft import PeftModel

    from trainer.train import train_run

    run_dir = write_run(home, variant, max_steps=4, save_steps=2, **VARIANTS[variant])
    trained = train_run(run_dir)
    assert status_of(run_dir)["state"] == "completed"
    assert all(math.isfinite(loss) for loss in _losses(run_dir).values())
    stored = json.loads((run_dir / "training_parameters.json").read_text())
    assert TrainingParameters.from_dict(stored).to_dict().items() >= VARIANTS[variant].items()

    expected = _logits(trained)
    reloaded = _logits(PeftModel.from_pretrained(_base(home), run_dir))
    if variant in BASE_CHANGING:  # W + (BA - B0A0) against (W - B0A0) + BA: equal up to rounding
        assert torch.allclose(reloaded, expected, atol=1e-5)
    else:
        assert torch.equal(reloaded, expected)
    assert not torch.allclose(_logits(_base(home)), expected, atol=1e-3), "the adapter changed the model"
    _check_effect(variant, home, run_dir, trained)

    resumed = _resumed_copy(run_dir, f"{variant}-resumed")
    train_run(resumed, resume="checkpoint-2")
    assert status_of(resumed)["state"] == "completed" and status_of(resumed)["resumed_from"] == "checkpoint-2"
    final, again = _adapter(run_dir), _adapter(resumed)
    assert final.keys() == again.keys()
    assert all(torch.equal(final[key], again[key]) for key in final), "the resumed run ends on the same adapter"
    assert _losses(resumed) == _losses(run_dir)


def test_a_pissa_resume_without_its_initial_adapter_is_refused(home):
    from trainer.train import train_run

    run_dir = write_run(home, "pissa-lost", max_steps=3, save_steps=2, lora_init="pissa")
    train_run(run_dir)
    before = _losses(run_dir)
    shutil.rmtree(run_dir / "initial_adapter")
    with pytest.raises(DashboardError, match="initial_adapter/ is missing"):
        train_run(run_dir, resume="checkpoint-2")
    assert _losses(run_dir) == before, "refused before any step"


@pytest.mark.parametrize("overrides, sentence", [
    ({"lora_init": "pissa", "use_dora": True}, "cannot be combined with DoRA"),
    ({"lora_init": "olora", "precision": "4bit"}, "needs a full-precision base model"),
    ({"lora_init": "pissa", "num_processes": 2, "distributed_strategy": "fsdp", "micro_batch_size": 2},
     "cannot be used with fsdp"),
])
def test_impossible_combinations_are_refused_before_the_start(overrides, sentence):
    values = {"lora_name": "x", "raw_text_file": "user-guide.txt", **overrides}
    _, problems = read_and_check(values)
    assert [p.field for p in problems if sentence in p.message] == ["lora_init"], [p.message for p in problems]
    # Each variant alone, and DoRA on a quantised base (peft supports it), is fine.
    for alone in ({"lora_init": overrides["lora_init"]}, {"use_dora": True, "precision": "4bit"},
                  {"use_rslora": True, "loraplus_lr_ratio": 16, "neftune_noise_alpha": 5}):
        _, problems = read_and_check({"lora_name": "x", "raw_text_file": "user-guide.txt", **alone})
        assert [p for p in problems if p.field != "precision"] == [], [p.message for p in problems]


def test_the_variants_are_parameters_with_help_in_the_lora_and_advanced_tabs():
    from trainer.params import FIELDS

    for name, group in (("use_dora", "lora"), ("use_rslora", "lora"), ("lora_init", "lora"),
                        ("loraplus_lr_ratio", "lora"), ("neftune_noise_alpha", "advanced")):
        assert FIELDS[name].metadata["group"] == group and len(FIELDS[name].metadata["help"]) > 40
    defaults = TrainingParameters()
    assert (defaults.use_dora, defaults.use_rslora, defaults.lora_init) == (False, False, "default")
    assert defaults.loraplus_lr_ratio == 0.0 and defaults.neftune_noise_alpha == 0.0
    assert TrainingParameters.from_dict({"use_dora": "true", "loraplus_lr_ratio": "16"}).loraplus_lr_ratio == 16.0
    _, problems = read_and_check({"lora_name": "x", "raw_text_file": "a.txt", "lora_init": "loftq",
                                  "neftune_noise_alpha": -1})
    assert {p.field for p in problems} >= {"lora_init", "neftune_noise_alpha"}


def test_the_train_page_draws_the_variants_in_their_tabs_and_refuses_a_bad_combination(home):
    from .test_train_page import TAB_TITLES, errors, fill_basic, open_page, start_button

    at = open_page()
    lora_tab, advanced_tab = at.tabs[TAB_TITLES.index("LoRA")], at.tabs[TAB_TITLES.index("Advanced")]
    assert lora_tab.checkbox(key="tp_use_dora").label == "DoRA"
    assert lora_tab.checkbox(key="tp_use_rslora").label == "rsLoRA"
    assert list(lora_tab.selectbox(key="tp_lora_init").options) == ["default", "pissa", "olora"]
    assert lora_tab.number_input(key="tp_loraplus_lr_ratio").value == 0.0
    assert advanced_tab.number_input(key="tp_neftune_noise_alpha").value == 0.0
    fill_basic(at, "variants")
    assert start_button(at).disabled is False
    at.checkbox(key="tp_use_dora").check()
    at.selectbox(key="tp_lora_init").select("pissa")
    at.run()
    assert any("cannot be combined with DoRA" in e for e in errors(at)), errors(at)
    assert start_button(at).disabled is True
