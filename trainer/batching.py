"""Which samples go into which micro-batch and optimiser step, and how a micro-batch is laid out.

A *unit* is one row of a micro-batch: a single sample, or (with packing) several short samples packed
into one row of at most cutoff_len tokens. Every row carries position ids that restart at 0 for each
sample, and no attention mask: transformers then builds a block-diagonal causal mask from the position
ids, so a token attends only to its own sample, and the padding at the end of a row forms a block of its
own. Padding is never trained.

The order is a pure function of (seed, epoch), so a resumed run replays exactly the steps an
uninterrupted run would have taken.

Before the start, `start_problems` says why a run of these samples cannot train (rows that match nothing, no
sample left, fewer rows than one optimiser step, a warm-up as long as the run), each with the field to change;
the Train page's plan, `python -m trainer train` and the trainer check that one list. `start_warnings` lists
what may work but likely will not (a learning rate far above LoRA's range): said, never refused.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX, Preview, Sample, no_samples_error, unmatched_rows_error
from .errors import DashboardError
from .shapes import RECOGNISED

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
            "total_steps": steps.total, "accumulation": steps.accumulation,
            "warmup_steps": warmup_steps_for(params, steps.total)}


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


# ---- before the start: what cannot train is refused with its fix, what likely will not is said -----------
LORA_LEARNING_RATES = (1e-5, 5e-4)  # the range LoRA usually trains at
LEARNING_RATE_WARN_ABOVE = 1e-2  # above this a LoRA run's loss usually blows up


def warmup_steps_for(params, total_steps: int) -> int:
    """The warm-up steps of a run of `total_steps` steps: warmup_ratio of them, rounded up as the HF Trainer
    rounds, when the ratio is above 0; else warmup_steps."""
    if params.warmup_ratio > 0:
        return math.ceil(params.warmup_ratio * total_steps)
    return params.warmup_steps


def start_problems(params, preview: Preview, n_units: int, total_steps: int, world: int) -> list[DashboardError]:
    """Why a run of these samples (`n_units` training rows, `total_steps` steps on `world` processes) cannot
    train, each naming the field to change; empty when it can start."""
    found = []
    if not params.skip_unmatched_rows and (unmatched := unmatched_rows_error(preview)):
        found.append(unmatched)
    if (empty := no_samples_problem(preview)) is not None:
        return found + [empty]
    for problem in (batch_fit_problem(params, n_units, world), warmup_problem(params, total_steps)):
        if problem is not None:
            found.append(problem)
    return found


def start_warnings(params) -> list[DashboardError]:
    """What may start but will likely not train well, each naming its field: said, never refused."""
    rate = params.learning_rate
    if rate <= LEARNING_RATE_WARN_ABOVE:
        return []
    low, high = LORA_LEARNING_RATES
    return [DashboardError(f"Learning rate {rate_text(rate)} is far above what LoRA tolerates: LoRA usually trains "
                           f"at {rate_text(low)} to {rate_text(high)}; {rate_text(rate)} will likely make the loss "
                           f"blow up.", field="learning_rate")]


def rate_text(value: float) -> str:
    """A learning rate as people write it: 3e-4, 1e-5, 0.05, 1."""
    if value >= 0.01:
        return f"{value:g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


# What to change when no sample is left, by the reason most left-out rows give: (field, advice).
_NO_SAMPLE_ADVICE = {
    "unmatched: no format file": ("format", f"Choose a format file, or give the rows a shape read without one: "
                                            f"{RECOGNISED}."),
    "unmatched": ("format", f"Choose a format file with a key naming the rows' fields, or give the rows a shape read "
                            f"without one: {RECOGNISED}."),
    "chat row": ("dataset", "Fix the rows' chat turns: `messages` of role/content, or `conversations` of from/value, "
                            "with roles system, user and assistant."),
    "dropped: does not contain": ("train_only_after", "Set train only after to a string the rendered rows "
                                                      "contain, or leave it empty."),
    "dropped: no trained tokens": ("cutoff_len", "Raise the cutoff length so the trained part fits."),
    "dropped": ("overlong_samples", "Raise the cutoff length, or truncate the samples over the cutoff instead "
                                    "of dropping them."),
}


def no_samples_problem(preview: Preview) -> DashboardError | None:
    """The trainer's no-sample refusal (data.no_samples_error) with what to change for the reason most rows
    give, under the field to change."""
    error = no_samples_error(preview)
    if error is None:
        return None
    causes = Counter(next((k for k in _NO_SAMPLE_ADVICE if p.reason.startswith(k)), None) for p in preview.problems)
    cause = max(causes, key=lambda k: (k is not None, causes[k]), default=None)
    field, advice = _NO_SAMPLE_ADVICE.get(cause, ("dataset", "Choose another dataset."))
    return DashboardError(f"{error.message} {advice}", field=field)


def batch_fit_problem(params, n_units: int, world: int) -> DashboardError | None:
    """Fewer training rows than one optimiser step's batch, with the batch that fits."""
    if n_units >= params.batch_size:
        return None
    rows = f"{n_units} {'packed row' if params.packing else 'sample'}{'s' * (n_units != 1)}"
    micro, batch, processes = fitting_batch(n_units, params.micro_batch_size, world)
    if processes != world:
        fix = f"train on {processes} process{'es' * (processes != 1)} with micro batch size 1 and batch size {batch}"
    elif micro != params.micro_batch_size:
        fix = f"set the micro batch size to {micro} and the batch size to {batch}"
    else:
        fix = f"set the batch size to {batch}"
    accumulation = max(1, params.batch_size // (params.micro_batch_size * world))
    return DashboardError(
        f"Only {rows} to train on, fewer than one optimiser step: the batch size is {params.batch_size} (micro "
        f"batch {params.micro_batch_size} x accumulation {accumulation} x {world} process{'es' * (world != 1)}). "
        f"To train on full batches, {fix}, or add data.", field="batch_size")


def fitting_batch(n_units: int, micro_batch_size: int, world: int) -> tuple[int, int, int]:
    """(micro batch size, batch size, processes) of the largest global batch `n_units` rows fill: the micro
    batch kept where it fits, then smaller, then fewer processes."""
    if n_units >= micro_batch_size * world:
        return micro_batch_size, n_units // (micro_batch_size * world) * micro_batch_size * world, world
    if n_units >= world:
        return n_units // world, n_units // world * world, world
    return 1, n_units, n_units


def warmup_problem(params, total_steps: int) -> DashboardError | None:
    """A warm-up at least as long as the run: the learning rate would never reach its peak."""
    warmup = warmup_steps_for(params, total_steps)
    if params.lr_scheduler_type == "constant" or warmup < total_steps:
        return None  # the constant schedule has no warm-up
    steps = f"{total_steps} step{'s' * (total_steps != 1)}"
    if params.warmup_ratio > 0:  # only a 1-step run: the ratio is at most 0.5
        given, fix, field = f"warmup ratio {params.warmup_ratio:g}: {warmup} step", "Set warmup ratio to 0", \
            "warmup_ratio"
    else:
        given, fix, field = f"{warmup} step{'s' * (warmup != 1)}", \
            f"Set warmup steps below {total_steps} (0: no warm-up)", "warmup_steps"
        if (ratio_steps := math.ceil(0.1 * total_steps)) < total_steps:
            fix += f", or warmup ratio to 0.1 to warm up over the first 10% of the run ({ratio_steps} of {steps})"
    return DashboardError(
        f"The warm-up ({given}) is at least as long as the run ({steps}): the learning rate would never reach its "
        f"peak {rate_text(params.learning_rate)}, and the first step trains at 0. {fix}.", field=field)
