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
from trainer.loss import PLAIN_HEAD_MODEL_TYPES, causal_lm_loss_sum, chunked_linear_cross_entropy, plain_output_head

from .archhelpers import FAMILIES, build_family_model


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


def family_batch():
    samples = make_samples(3)
    return collate([samples[:2], samples[2:]], pad_token_id=0, device="cpu")


def logits_loss(model, batch):
    """The loss written out from the model's own logits: what either path must give."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_trains_on_its_own_logits_by_either_path(tokenizer, model_type):
    """The chunked path for the plain-head families, the fallback for the others (Gemma's soft-capped logits):
    the loss and its gradients equal those of the model's own logits."""
    from trainer.targets import target_modules_for

    model = build_family_model(model_type, tokenizer)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules_for(model, "all-linear"),
                        task_type="CAUSAL_LM", init_lora_weights=False)
    lora = get_peft_model(model, config).eval()  # no dropout (GPT-2 has some): both passes see one model
    head = plain_output_head(lora)
    assert (head is not None) == (model_type in PLAIN_HEAD_MODEL_TYPES)
    if head is not None:
        assert head is lora.get_base_model().get_output_embeddings()
    batch = family_batch()
    loss, grads = loss_and_grads(lora, batch, "auto")
    lora.zero_grad()
    expected = logits_loss(lora, batch)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-4)
    assert grads
    for name, grad in grads.items():
        reference = dict(lora.named_parameters())[name].grad
        assert reference.abs().max() > 0, name
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6, msg=name)


def test_soft_capped_logits_need_the_fallback(tokenizer):
    """Gemma 2 caps its logits (cap x tanh(logits / cap)): the output layer alone gives another loss, so the
    fallback through the model's logits is what keeps its training right. A cap small enough to bend a random
    model's small logits (std 0.16) shows the difference."""
    model = build_family_model("gemma2", tokenizer, final_logit_softcapping=0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    batch = family_batch()
    with torch.no_grad():
        expected = logits_loss(model, batch)
        assert plain_output_head(model) is None
        torch.testing.assert_close(causal_lm_loss_sum(model, batch, "auto"), expected, rtol=1e-5, atol=1e-4)
        uncapped = causal_lm_loss_sum(model, batch, model.get_output_embeddings())
    assert abs(float(uncapped) - float(expected)) > 100 * 1e-4  # far outside the tolerance the fallback meets
