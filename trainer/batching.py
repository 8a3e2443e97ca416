"""Which samples go into which micro-batch and optimiser step, and how a micro-batch is padded.

The order is a pure function of (seed, epoch), so a resumed run replays exactly the steps an
uninterrupted run would have taken.
"""

from __future__ import annotations

import math

import torch

from .data import IGNORE_INDEX, Sample

MEGABATCH_MULT = 50  # as transformers' LengthGroupedSampler: sort by length inside groups of 50 micro-batches


def steps_per_epoch(n_samples: int, micro_batch_size: int, accumulation: int) -> int:
    return max(1, math.ceil(math.ceil(n_samples / micro_batch_size) / accumulation)) if n_samples else 0


def total_steps(n_samples: int, params) -> int:
    if params.max_steps:
        return params.max_steps
    per_epoch = steps_per_epoch(n_samples, params.micro_batch_size, params.gradient_accumulation_steps)
    return max(1, math.ceil(params.epochs * per_epoch))


def epoch_schedule(lengths: list[int], micro_batch_size: int, accumulation: int, seed: int, epoch: int,
                   group_by_length: bool) -> list[list[list[int]]]:
    """For one epoch: a list of optimiser steps, each a list of micro-batches of sample indices."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        # Samples of similar length share a micro-batch, so padding costs little; megabatches keep it random.
        size = micro_batch_size * MEGABATCH_MULT
        grouped = []
        for i in range(0, len(order), size):
            grouped.extend(sorted(order[i:i + size], key=lambda j: -lengths[j]))
        order = grouped
    micro = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    if group_by_length:
        # The longest micro-batch goes first so an out-of-memory error shows up at step 1, not hours in.
        longest = max(range(len(micro)), key=lambda i: max(lengths[j] for j in micro[i]))
        micro[0], micro[longest] = micro[longest], micro[0]
    return [micro[i:i + accumulation] for i in range(0, len(micro), accumulation)]


def collate(samples: list[Sample], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Pad to the longest sample of the micro-batch (dynamic padding); padding is never trained."""
    width = max(s.n_tokens for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = sample.n_tokens
        input_ids[row, :n] = torch.tensor(sample.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(sample.labels())
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "labels": labels.to(device)}


def trained_targets(labels: torch.Tensor) -> int:
    """Tokens that count in the loss: labels shifted by one, as a causal LM predicts the next token."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
