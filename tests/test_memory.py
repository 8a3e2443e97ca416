"""The memory estimate (trainer/memory.py): its parts move the way a run's memory does."""

from __future__ import annotations

import pytest

from trainer.memory import estimate
from trainer.params import TrainingParameters


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
