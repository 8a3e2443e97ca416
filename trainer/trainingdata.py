"""The training data a run indexes: its samples, their rows, the eval samples and the step plan.

The step plan (trainer/batching.py's StepPlan) is computed once, here for the trainer and there for the
Train page's plan. The epoch schedule is a pure function of (seed, epoch), so a resumed run replays
exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import batching
from .batching import StepPlan
from .distributed import log
from .errors import DashboardError
from .models import load_tokenizer
from .samplecache import cached_build_samples


@dataclass
class TrainingData:
    """The samples `preview` shows, their training rows (units) and the eval samples, with the step plan."""

    params: object
    samples: list
    units: list[list[int]]  # rows of sample indices (trainer/batching.py)
    lengths: list[int]  # tokens per row
    eval_samples: list
    pad_id: int
    plan: StepPlan
    _schedule: tuple[int, list] = field(default=(-1, []), repr=False)  # (epoch, its steps)

    @classmethod
    def prepare(cls, params, world: int) -> TrainingData:
        """The same samples as `preview`, built once per content (trainer/samplecache.py), refused with a
        sentence when it cannot train (batching.start_problems: unmatched rows, no samples, less than one batch,
        a warm-up as long as the run)."""

        tokenizer = load_tokenizer(params.base_model, params.trust_remote_code, progress=log)
        started = time.perf_counter()
        preview, from_cache = cached_build_samples(params, tokenizer)
        log(f"Samples: {len(preview.samples)} {'read from the cache' if from_cache else 'prepared'} in "
            f"{time.perf_counter() - started:.1f} s.")
        samples = preview.samples
        units = batching.training_units([s.n_tokens for s in samples], params)
        plan = StepPlan.of(params, len(units), world)
        # The same refusals as the Train page's plan and the command line's check: one rule.
        if problems := batching.start_problems(params, preview, len(units), plan.total, world):
            raise DashboardError(" ".join(p.message for p in problems), field=problems[0].field)
        eval_samples = cached_build_samples(params, tokenizer, params.eval_dataset)[0].samples \
            if params.eval_dataset else []
        packed = f", packed into {len(units)} rows" if params.packing else ""
        log(f"{len(samples)} samples{packed}, {preview.stats['tokens']} tokens; {plan.describe()}.")
        return cls(params, samples, units, [sum(samples[i].n_tokens for i in unit) for unit in units],
                   eval_samples, tokenizer.pad_token_id, plan)

    def micro_batches(self, step: int, rank: int, device) -> tuple[list[dict], list[float]]:
        """This process's collated micro-batches of optimiser step `step` (0-based), and their weights."""

        epoch, position = divmod(step, self.plan.per_epoch)
        if self._schedule[0] != epoch:
            self._schedule = (epoch, batching.epoch_schedule(
                self.lengths, self.plan.micro_batch_size, self.plan.micro_batches_per_step, self.params.seed, epoch,
                self.params.group_by_length))
        mine, weights = self.plan.share(self._schedule[1][position], rank)
        rows = [[[self.samples[i] for i in self.units[u]] for u in unit_indices] for unit_indices in mine]
        return [batching.collate(r, self.pad_id, device) for r in rows], weights
