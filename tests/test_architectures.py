"""Nine architecture families (the issue's eight, Gemma 2 and 3 both), end to end: target modules resolved in
each family's own names, and for each a preview, a real training run (the trainer subprocess), the saved adapter
reloaded in peft, perplexity, and the merged export. The models are tiny and random (tests/archhelpers.py), with
the default model's tokenizer."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from trainer import footprint
from trainer.errors import DashboardError
from trainer.params import TrainingParameters
from trainer.targets import (
    FUSED_NOTE, adapted_layers, describe_targets, layers_of, target_module_names, target_modules_for,
)

from .archhelpers import FAMILIES, TEXT, family_dirs, family_home  # noqa: F401 (fixtures)
from .trainhelpers import metrics_of, run_trainer, status_of, write_run

# What each choice must adapt, one decoder block's module names, as the families name their layers.
SEPARATE = {"q-v": {"self_attn.q_proj", "self_attn.v_proj"},
            "q-k-v-o": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
            "all-linear": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}}
EXPECTED = {
    "phi3": {"q-v": {"self_attn.qkv_proj"}, "q-k-v-o": {"self_attn.qkv_proj", "self_attn.o_proj"},
             "all-linear": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}},
    "gpt2": {"q-v": {"attn.c_attn"}, "q-k-v-o": {"attn.c_attn", "attn.c_proj"},
             "all-linear": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}},
    "gpt_neox": {"q-v": {"attention.query_key_value"},
                 "q-k-v-o": {"attention.query_key_value", "attention.dense"},
                 "all-linear": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                "mlp.dense_4h_to_h"}},
}
FUSED = {"phi3", "gpt2", "gpt_neox"}
# The choice each family trains with: the default (all-linear) and the mapped choices, fused families included.
TRAINED_WITH = {"llama": None, "mistral": "q-v", "qwen2": "q-k-v-o", "qwen3": None, "gemma2": None,
                "gemma3_text": "q-v", "phi3": "q-v", "gpt2": "q-k-v-o", "gpt_neox": "q-v"}


def in_block(name: str) -> str:
    return re.sub(r"^.*?\.\d+\.", "", name)


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_target_module_names_are_the_models_own_and_what_peft_adapts(family_home, family_dirs, model_type):
    from peft import LoraConfig, get_peft_model

    name = f"arch-{model_type}"
    model = load(family_dirs[model_type])
    real = {n for n, _ in model.named_modules()}
    for choice in ("q-v", "q-k-v-o", "all-linear"):
        shown = target_module_names(name, choice)
        modules = {s.split(" (")[0] for s in shown}
        assert modules == EXPECTED.get(model_type, SEPARATE)[choice], (choice, shown)
        assert all(any(r.endswith("." + m) for r in real) for m in modules), shown
        # A fused layer standing in for q and v is said so in the names shown, and only then.
        assert any(FUSED_NOTE in s for s in shown) == (model_type in FUSED and choice == "q-v"), shown
        peft_model = get_peft_model(load(family_dirs[model_type]), LoraConfig(
            r=2, target_modules=target_modules_for(model, choice), task_type="CAUSAL_LM"))
        assert {in_block(n) for n in peft_model.targeted_module_names} == modules, choice
        layers = adapted_layers(layers_of(model), target_modules_for(model, choice))
        assert sorted(n for n, _, _ in layers) == sorted(peft_model.targeted_module_names)
        # The plan's disk estimate counts exactly the numbers peft trains.
        estimate = footprint.estimate(TrainingParameters(base_model=name, target_modules=choice, lora_rank=2), 10)
        assert estimate.adapter_parameters == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert describe_targets(name, "all-linear").startswith(
        f"LoRA adapts {2 * len(EXPECTED.get(model_type, SEPARATE)['all-linear'])} layers: ")
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    assert head_name not in {n for n, _, _ in adapted_layers(layers_of(model), "all-linear")}


def test_custom_targets_are_checked_against_the_models_names(family_home):
    assert target_module_names("arch-gpt2", "custom", "c_attn, mlp.c_proj") == ["attn.c_attn", "mlp.c_proj"]
    with pytest.raises(DashboardError) as raised:
        target_module_names("arch-gpt2", "custom", "q_proj, c_attn")
    assert raised.value.field == "custom_target_modules"
    assert "no module named q_proj" in raised.value.message and "c_attn" in raised.value.message


def test_the_trainer_refuses_a_custom_name_the_model_lacks(family_home):
    run_dir = write_run(family_home, "bad-target", base_model="arch-gpt2", raw_text_file=TEXT, max_steps=1,
                        cutoff_len=32, overlap_len=8, warmup_steps=0, target_modules="custom",
                        custom_target_modules="q_proj")
    result = run_trainer(run_dir)
    assert result.returncode == 1
    status = status_of(run_dir)
    assert status["state"] == "failed" and "no module named q_proj" in status["error"], status
    assert "c_attn" in status["error"] and not (run_dir / "adapter_model.safetensors").exists()


def merged_by_hand(base, adapter_dir):
    """The base model with each saved LoRA pair added to its layer's weight (scale alpha / rank): what the
    adapter means, computed without peft."""
    from transformers.pytorch_utils import Conv1D

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    state = load_file(adapter_dir / "adapter_model.safetensors")
    modules = dict(base.named_modules())
    pairs = 0
    with torch.no_grad():
        for key, a in state.items():
            if ".lora_A." not in key:
                continue
            b = state[key.replace(".lora_A.", ".lora_B.")]
            module = modules[key.removeprefix("base_model.model.").split(".lora_A.")[0]]
            delta = scale * (b @ a)
            module.weight += delta.t() if isinstance(module, Conv1D) else delta
            pairs += 1
    return base, pairs


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[0].double()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_each_family_previews_trains_reloads_evaluates_and_exports(family_home, family_dirs, model_type):
    from peft import PeftModel

    from trainer.data import build_samples
    from trainer.export import export_merged
    from trainer.models import load_tokenizer
    from trainer.params import TrainingParameters
    from trainer.perplexity import perplexity_of_file

    name, folder = f"arch-{model_type}", family_dirs[model_type]
    choice = TRAINED_WITH[model_type]
    run = dict(base_model=name, raw_text_file=TEXT, max_steps=3, cutoff_len=32, overlap_len=8,
               learning_rate=2e-2, warmup_steps=0, **({"target_modules": choice} if choice else {}))
    # Preview: the samples the trainer will train on, in the model's tokenizer.
    params = TrainingParameters.from_dict({"lora_name": "p", **run})
    samples = build_samples(params, load_tokenizer(name)).samples
    vocab = load(folder).config.get_text_config().vocab_size
    assert len(samples) >= 12 and all(0 < s.n_tokens <= 32 and max(s.input_ids) < vocab for s in samples)

    run_dir = write_run(family_home, f"arch-{model_type}", **run)
    result = run_trainer(run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert status_of(run_dir)["state"] == "completed" and status_of(run_dir)["step"] == 3
    losses = [m["loss"] for m in metrics_of(run_dir) if "loss" in m]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    saved = json.loads((run_dir / "adapter_config.json").read_text())["target_modules"]
    expected = adapted_layers(layers_of(load(folder)), target_modules_for(load(folder), params.target_modules))
    assert {in_block(n) for n, _, _ in expected} == EXPECTED.get(model_type, SEPARATE)[params.target_modules]
    if params.target_modules != "all-linear":
        assert sorted(saved) == sorted(target_modules_for(load(folder), params.target_modules))

    # Reload: peft's base+adapter gives the logits of the adapter applied by hand, and differs from the base.
    ids = load_tokenizer(name)((family_home / "datasets" / TEXT).read_text(), return_tensors="pt",
                               add_special_tokens=False)["input_ids"]
    assert 32 < ids.shape[1] < 512  # one perplexity window holds the whole text
    reloaded = PeftModel.from_pretrained(load(folder), run_dir).eval()
    by_hand, pairs = merged_by_hand(load(folder), run_dir)
    assert pairs == len(expected)
    with_adapter, base = logits_of(reloaded, ids), logits_of(load(folder), ids)
    spread = float(with_adapter.std())
    assert float((with_adapter - logits_of(by_hand, ids)).abs().max()) < 1e-4 * spread
    assert float((with_adapter - base).abs().max()) > 1e-2 * spread  # the trained adapter changes the logits

    # Perplexity: the adapter fits its training text better than the base; the number is the reloaded model's.
    base_ppl = perplexity_of_file(name, None, TEXT, 512, 512)["perplexity"]
    lora_ppl = perplexity_of_file(name, str(run_dir), TEXT, 512, 512)["perplexity"]
    assert lora_ppl < 0.98 * base_ppl, (lora_ppl, base_ppl)
    nll = torch.nn.functional.cross_entropy(with_adapter[:-1], ids[0, 1:])
    assert lora_ppl == pytest.approx(math.exp(float(nll)), rel=1e-4)

    # Merge and export: the merged folder is a plain model of the same family with the adapter's logits.
    exported = export_merged(run_dir, f"{model_type}-merged", progress=lambda message: None)
    assert exported["max_abs_diff_reloaded"] < exported["tolerance"]
    merged = load(family_home / "models" / f"{model_type}-merged")
    assert merged.config.model_type == model_type
    assert not (family_home / "models" / f"{model_type}-merged" / "adapter_config.json").exists()
    assert float((logits_of(merged, ids) - with_adapter).abs().max()) < 1e-3 * spread
