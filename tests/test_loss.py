"""The chunked loss (trainer/loss.py) equals the plain cross-entropy over the model's logits, value and gradients."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from trainer.batching import collate
from trainer.data import Sample
from trainer.loss import causal_lm_loss_sum, chunked_linear_cross_entropy, plain_output_head


def make_samples(seed: int) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for n in (5, 17, 9, 30):
        ids = [rng.randrange(10, 2000) for _ in range(n)]
        cut = rng.randrange(1, n)  # a prompt of `cut` masked tokens, then the trained answer
        samples.append(Sample(text="", input_ids=ids, label_mask=[0] * cut + [1] * (n - cut), source="t"))
    return samples


@pytest.fixture
def lora_model(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM", init_lora_weights=False)  # non-zero B: every gradient is non-trivial
    return get_peft_model(model, config)


def loss_and_grads(model, batch, head):
    model.zero_grad()
    loss = causal_lm_loss_sum(model, batch, head)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [False, True])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(lora_model, packed):
    samples = make_samples(1)
    rows = [samples[:2], samples[2:]] if packed else [[s] for s in samples]
    batch = collate(rows, pad_token_id=0, device="cpu")
    head = plain_output_head(lora_model)
    assert head is lora_model.get_base_model().lm_head  # a Llama: the chunked path applies

    plain_loss, plain_grads = loss_and_grads(lora_model, batch, None)
    chunked_loss, chunked_grads = loss_and_grads(lora_model, batch, head)

    # The plain path, written out independently: cross-entropy of the shifted logits at trained positions.
    logits = lora_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")
    torch.testing.assert_close(plain_loss, expected.detach())
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-5, atol=1e-4)
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads
    for name in plain_grads:
        assert plain_grads[name].abs().max() > 0, name
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunks_smaller_than_the_positions_give_the_same_sum_and_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (23,))
    expected = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    for chunk in (1, 5, 23, 64):
        loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk)
        (grad,) = torch.autograd.grad(loss * 3.0, hidden)  # the upstream gradient is applied
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, 3.0 * expected_grad, rtol=1e-6, atol=1e-8)


def test_no_trained_position_gives_zero_loss_and_zero_gradients(lora_model):
    sample = Sample(text="", input_ids=[11, 12, 13], label_mask=[0, 0, 0], source="t")
    batch = collate([[sample]], pad_token_id=0, device="cpu")
    loss, grads = loss_and_grads(lora_model, batch, plain_output_head(lora_model))
    assert float(loss) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_evaluation_without_gradients_matches(lora_model):
    batch = collate([[s] for s in make_samples(2)], pad_token_id=0, device="cpu")
    with torch.no_grad():
        chunked = causal_lm_loss_sum(lora_model, batch, plain_output_head(lora_model))
        plain = causal_lm_loss_sum(lora_model, batch, None)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)


def test_models_with_scaled_logits_or_a_trained_head_take_the_plain_path(lora_model):
    base = lora_model.get_base_model()
    base.config.model_type = "gemma2"  # soft-capped logits: lm_head(hidden) is not the model's logits
    assert plain_output_head(lora_model) is None
    base.config.model_type = "llama"
    base.lm_head.weight.requires_grad_(True)  # a trained head would need its own gradient
    assert plain_output_head(lora_model) is None
