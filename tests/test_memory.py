"""The memory estimate (trainer/memory.py): its parts move the way a run's memory does."""

from __future__ import annotations

import pytest

from trainer.memory import estimate
from trainer.params import TrainingParameters

from .archhelpers import FAMILIES, family_dirs, family_home  # noqa: F401 (fixtures)


def params(**changes) -> TrainingParameters:
    return TrainingParameters.from_dict({"lora_name": "m", "base_model": "SmolLM2-135M-Instruct",
                                         "raw_text_file": "user-guide.txt", **changes})


def test_parts_follow_the_parameters(home):
    base = estimate(params(micro_batch_size=1, cutoff_len=128))
    # SmolLM2-135M in float32: 134.5M numbers x 4 bytes
    assert base.weights == pytest.approx(538e6, rel=0.01)
    double = estimate(params(micro_batch_size=2, cutoff_len=128))
    assert double.activations == pytest.approx(2 * base.activations)
    assert double.weights == base.weights
    four_bit = estimate(params(micro_batch_size=1, cutoff_len=128, precision="4bit"))
    assert four_bit.weights < 0.5 * base.weights
    checkpointed = estimate(params(micro_batch_size=4, cutoff_len=256, gradient_checkpointing=True))
    assert checkpointed.activations < 0.2 * estimate(params(micro_batch_size=4, cutoff_len=256)).activations
    bigger_rank = estimate(params(lora_rank=64))
    assert bigger_rank.adapter_and_optimizer == pytest.approx(2 * estimate(params(lora_rank=32)).adapter_and_optimizer)
    gpu = estimate(params(), device="gpu")
    assert gpu.weights == pytest.approx(base.weights / 2, rel=0.01) and gpu.runtime == 0
    ddp = estimate(params(num_processes=2, batch_size=8, micro_batch_size=4))
    fsdp = estimate(params(num_processes=2, batch_size=8, micro_batch_size=4, distributed_strategy="fsdp"))
    assert ddp.total == pytest.approx(2 * ddp.per_process) and fsdp.weights == pytest.approx(ddp.weights / 2)
    assert "RAM about" in base.describe() and "VRAM about" in gpu.describe()


def test_the_plan_shows_the_memory_estimate_and_warns_when_it_will_not_fit(home, monkeypatch):
    from trainer import memory

    from .test_refusals import form, start_button, warnings

    at = form(home, max_steps=6, warmup_steps=1)
    caption = next(c.value for c in at.caption if c.value.startswith("Memory on the CPU"))
    assert "RAM about" in caption and "free here" in caption and "VRAM about" in caption, caption
    assert not any("needs about" in w for w in warnings(at))
    monkeypatch.setattr(memory, "available_memory", lambda: {"cpu": 1e6})
    at = form(home, max_steps=6, warmup_steps=1)
    shown = [w for w in warnings(at) if w.startswith("This run needs about")]
    assert shown and "only 1 MB is free" in shown[0], warnings(at)
    assert not start_button(at).disabled  # a warning, not a refusal


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_is_estimated_from_its_own_layers(family_home, family_dirs, model_type):
    """GPT-2's sizes are n_embd and n_layer and its layers Conv1D, the fused families' targets are named their
    way: the estimate still counts each model's weights and exactly the numbers peft's adapter trains."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.memory import _config
    from trainer.targets import target_modules_for

    model = AutoModelForCausalLM.from_pretrained(family_dirs[model_type])
    sizes = _config(f"arch-{model_type}")
    assert (sizes["hidden_size"], sizes["num_hidden_layers"]) == (64, 2)
    found = estimate(params(base_model=f"arch-{model_type}", micro_batch_size=1, cutoff_len=64))
    assert found.weights == pytest.approx(4 * model.num_parameters(), rel=0.03)
    assert found.activations > 0
    for choice in ("q-v", "all-linear"):
        estimated = estimate(params(base_model=f"arch-{model_type}", target_modules=choice, lora_rank=4))
        adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(family_dirs[model_type]), LoraConfig(
            r=4, target_modules=target_modules_for(model, choice), task_type="CAUSAL_LM"))
        trained = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
        # AdamW: 4 bytes weight + 4 gradient + 8 state per trained number.
        assert estimated.adapter_and_optimizer == 16 * trained, choice
