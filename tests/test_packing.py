"""Packing: several samples in one row must train exactly as if each ran alone."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.batching import collate, epoch_schedule, pack
from trainer.data import Sample


def per_position_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch["labels"][:, 1:], ignore_index=-100,
                             reduction="none")
    return losses  # [rows, width - 1]; 0 where ignored


def make_samples(n: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        length = rng.randint(2, 40)
        ids = [rng.randint(5, 49000) for _ in range(length)]
        prompt = rng.randint(0, length - 1)  # the first tokens masked, as with "train only after"
        samples.append(Sample(text="", input_ids=ids, label_mask=[0] * prompt + [1] * (length - prompt),
                              source=f"row {i}"))
    return samples


def test_packed_rows_give_the_same_per_sample_loss_as_samples_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    samples = make_samples(12, seed=3)
    rows = pack([s.n_tokens for s in samples], capacity=64)
    assert len(rows) < len(samples), "the samples should share rows"
    with torch.no_grad():
        packed = collate([[samples[i] for i in row] for row in rows], pad_token_id=2, device="cpu")
        packed_losses = per_position_loss(model, packed)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                alone = collate([[samples[i]]], pad_token_id=2, device="cpu")
                expected = per_position_loss(model, alone)[0]
                n = samples[i].n_tokens
                got = packed_losses[r, at:at + n - 1]
                assert torch.allclose(got, expected, atol=1e-5), (i, (got - expected).abs().max())
                # the token that starts the next sample is never trained from this one's last token
                if at + n < packed["labels"].shape[1]:
                    assert packed["labels"][r, at + n] == -100
                at += n


def test_padding_is_never_trained_and_padded_rows_match_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    samples = make_samples(4, seed=5)
    with torch.no_grad():
        batch = collate([[s] for s in samples], pad_token_id=2, device="cpu")
        losses = per_position_loss(model, batch)
        for r, sample in enumerate(samples):
            alone = per_position_loss(model, collate([[sample]], pad_token_id=2, device="cpu"))[0]
            assert torch.allclose(losses[r, :sample.n_tokens - 1], alone, atol=1e-5)
            assert (batch["labels"][r, sample.n_tokens:] == -100).all()
    assert batch["real_tokens"] == sum(s.n_tokens for s in samples)
    # One sample per row: positions never restart, so transformers runs plain causal attention, no mask.
    width = batch["input_ids"].shape[1]
    assert (batch["position_ids"] == torch.arange(width)).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=200), st.integers(100, 300))
def test_pack_fits_every_sample_exactly_once(lengths, capacity):
    rows = pack(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    # best fit decreasing never needs more rows than twice the lower bound
    assert len(rows) <= 2 * (-(-sum(lengths) // capacity)) + 1


@given(st.lists(st.integers(1, 300), min_size=1, max_size=100), st.integers(1, 8), st.integers(1, 4),
       st.integers(0, 100), st.integers(0, 5), st.booleans())
def test_epoch_schedule_uses_every_unit_once_and_is_reproducible(lengths, micro, accumulation, seed, epoch, grouped):
    steps = epoch_schedule(lengths, micro, accumulation, seed, epoch, grouped)
    flat = [i for step in steps for batch in step for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(len(step) <= accumulation for step in steps)
    assert all(1 <= len(batch) <= micro for step in steps for batch in step)
    assert steps == epoch_schedule(lengths, micro, accumulation, seed, epoch, grouped)
