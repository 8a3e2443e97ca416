"""Which samples go into which micro-batch and optimiser step, and how a micro-batch is laid out.

A *unit* is one row of a micro-batch: a single sample, or (with packing) several short samples packed
into one row of at most cutoff_len tokens. Every row carries position ids that restart at 0 for each
sample, and no attention mask: transformers then builds a block-diagonal causal mask from the position
ids, so a token attends only to its own sample, and the padding at the end of a row forms a block of its
own. Padding is never trained.

The order is a pure function of (seed, epoch), so a resumed run replays exactly the steps an
uninterrupted run would have taken.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX, Sample

MEGABATCH_MULT = 50  # as transformers' LengthGroupedSampler: sort by length inside groups of 50 micro-batches


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of sample indices into rows of at most `capacity` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), kept sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(i)
            room -= lengths[i]
        else:
            rows.append([i])
            row, room = len(rows) - 1, capacity - lengths[i]
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def training_units(lengths: list[int], params) -> list[list[int]]:
    """Rows of sample indices: packed to cutoff length when params.packing, else one sample per row."""
    if params.packing:
        return pack(lengths, params.cutoff_len)
    return [[i] for i in range(len(lengths))]


def steps_per_epoch(n_units: int, micro_batch_size: int, accumulation: int) -> int:
    return max(1, math.ceil(math.ceil(n_units / micro_batch_size) / accumulation)) if n_units else 0


@dataclass(frozen=True)
class StepPlan:
    """The global batch of `batch_size` samples: `accumulation` micro-batches of `micro_batch_size` rows on
    each of `world` processes (params.batch_problem is the rule that it divides)."""

    micro_batch_size: int
    world: int  # processes
    accumulation: int  # micro-batches each process runs per optimiser step
    per_epoch: int  # optimiser steps per epoch
    total: int  # optimiser steps of the run

    @classmethod
    def of(cls, params, n_units: int, world: int) -> StepPlan:
        """The plan for `n_units` training rows (samples, or packed rows) on `world` processes."""
        accumulation = max(1, params.batch_size // (params.micro_batch_size * world))
        per_epoch = steps_per_epoch(n_units, params.micro_batch_size, accumulation * world)
        total = params.max_steps or max(1, math.ceil(params.epochs * per_epoch))
        return cls(params.micro_batch_size, world, accumulation, per_epoch, total)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches of one optimiser step over all processes together."""
        return self.accumulation * self.world

    def share(self, step_batches: list, rank: int) -> tuple[list, list[float]]:
        """This process's micro-batches of a step and their weights. A process left without one (the epoch's
        last, short step) runs a batch with zero weight, so that every process takes part in the gradient
        averaging."""
        mine = step_batches[rank::self.world]
        return (mine or step_batches[:1]), ([1.0] * len(mine) or [0.0])

    def describe(self) -> str:
        return (f"{self.per_epoch} steps per epoch, {self.total} steps (micro batch {self.micro_batch_size} x "
                f"accumulation {self.accumulation} x processes {self.world})")


def plan(lengths: list[int], params) -> dict:
    """Rows, steps per epoch and total steps for samples of these lengths: the Train page's plan, by the
    trainer's own step plan for the processes the parameters ask for."""
    units = training_units(lengths, params)
    steps = StepPlan.of(params, len(units), params.num_processes)
    return {"samples": len(lengths), "rows": len(units), "steps_per_epoch": steps.per_epoch,
            "total_steps": steps.total, "accumulation": steps.accumulation}


def epoch_schedule(lengths: list[int], micro_batch_size: int, accumulation: int, seed: int, epoch: int,
                   group_by_length: bool) -> list[list[list[int]]]:
    """For one epoch: a list of optimiser steps, each a list of micro-batches of unit indices."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        # Units of similar length share a micro-batch, so padding costs little; megabatches keep it random.
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


def collate(rows: list[list[Sample]], pad_token_id: int, device) -> dict:
    """Lay rows of samples out as a micro-batch padded to its longest row (dynamic padding).

    Each sample's first label is ignored: in a packed row it would be predicted from the previous
    sample's last token, and in a row of its own it is never a target anyway.

    Position ids restart at each sample, which makes transformers keep attention inside each sample. The
    padding continues its row's last sample: under causal attention no real token sees the padding after
    it, and its outputs are never trained, so it needs no mask. A batch of one sample per row therefore
    has no restart at all and runs the plain causal attention, without building any mask.
    """
    width = max(sum(s.n_tokens for s in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    real_tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for sample in row:
            n = sample.n_tokens
            input_ids[r, at:at + n] = torch.tensor(sample.input_ids)
            sample_labels = torch.tensor(sample.labels())
            sample_labels[0] = IGNORE_INDEX
            labels[r, at:at + n] = sample_labels
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
        last = row[-1].n_tokens
        position_ids[r, at:] = torch.arange(last, last + width - at)  # the padding continues the last sample
        real_tokens += at
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "position_ids": position_ids.to(device),
            "real_tokens": real_tokens}


def trained_targets(labels: torch.Tensor) -> int:
    """Tokens that count in the loss: labels shifted by one, as a causal LM predicts the next token."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
