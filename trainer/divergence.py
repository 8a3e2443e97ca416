"""When a run has blown up: the one rule the trainer applies to each step's loss and gradient norm.

The rule (FORMATS.md, "Divergence", says the same):

- **The start** is the mean loss of the first `BASELINE_STEPS` steps that were not themselves far above it
  (the first step's loss is measured before any update, so a run that blows up at once is still judged
  against where it started).
- **Far above** the start means above both `LOSS_FACTOR` x start and start + `LOSS_MARGIN` nats.
- **Diverged**: the loss was far above the start for `PATIENCE` steps in a row, or the gradient norm
  (before clipping) was not finite, or above both `GRAD_FACTOR` x the median of the earlier steps' (the last
  `GRAD_WINDOW`) and `GRAD_FLOOR`.

A wobble (one or two high steps, then back), or a rise that stays within the bounds, is not a failure: a
LoRA whose loss climbs from 2.0 to 2.8 is learning badly, not exploding. NaN, infinite and exactly-0.0
losses are caught before this rule (`loss_problem`). A resumed run starts its watch anew: its start is the
loss at the checkpoint it resumed from.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from .batching import LEARNING_RATE_WARN_ABOVE, LORA_LEARNING_RATES, rate_text  # LoRA's usual learning rates
from .errors import DashboardError

BASELINE_STEPS = 3
LOSS_FACTOR = 1.5
LOSS_MARGIN = 1.0
PATIENCE = 3
GRAD_FACTOR = 1000.0
GRAD_FLOOR = 100.0
GRAD_WINDOW = 100  # the earlier steps whose median the gradient norm is compared with


def loss_problem(loss: float, step: int) -> str | None:
    """A sentence explaining a loss that means the run broke (NaN, infinite or exactly 0.0), else None."""
    if loss == 0.0:
        return (f"The loss is exactly 0.0 at step {step}: something is broken (labels all masked, a data problem, "
                f"or a numerical failure), not a perfect model. Check 'train only after' and the data preview.")
    if math.isfinite(loss):
        return None
    if step == 1:
        return (f"The loss is {loss} at the first step: the base model or the data produce invalid numbers (a broken "
                f"model file, or half precision overflowing). Try the model in full precision, or another model.")
    return (f"The loss became {loss} at step {step}: training diverged. Lower the learning rate, keep gradient "
            f"clipping on (max grad norm 1.0), or use full precision instead of 8/4-bit.")


class Diverged(DashboardError):
    """A run that blew up: the trainer ends it failed, with `diverged: true` in status.json."""


@dataclass
class Verdict:
    """Why the run diverged, and `since`: the first step of the blow-up (checkpoints before it are good)."""

    what: str  # "The loss rose from 4.39 to 19.2 in 3 steps"
    step: int
    since: int

    def sentence(self, learning_rate: float, last_good_checkpoint: str | None) -> str:
        low, high = (rate_text(r) for r in LORA_LEARNING_RATES)
        rate = rate_text(learning_rate)
        if learning_rate > LEARNING_RATE_WARN_ABOVE:
            advice = f"the learning rate {rate} is far too high for LoRA; try {low} to {high}."
        elif learning_rate > LORA_LEARNING_RATES[1]:
            advice = f"the learning rate {rate} is above LoRA's usual {low} to {high}; lower it."
        else:
            advice = (f"lower the learning rate (now {rate}), keep gradient clipping on (max grad norm 1.0), or use "
                      f"full precision instead of 8/4-bit.")
        checkpoint = f" The last good checkpoint is {last_good_checkpoint}." if last_good_checkpoint else ""
        return f"{self.what}: {advice}{checkpoint}"


@dataclass
class DivergenceWatch:
    """Fed each step's loss and gradient norm (`observe`); says when the run has diverged (the rule above)."""

    baseline_steps: int = BASELINE_STEPS
    loss_factor: float = LOSS_FACTOR
    loss_margin: float = LOSS_MARGIN
    patience: int = PATIENCE
    grad_factor: float = GRAD_FACTOR
    grad_floor: float = GRAD_FLOOR
    _baseline: list[float] = field(default_factory=list)
    _grad_norms: deque = field(default_factory=lambda: deque(maxlen=GRAD_WINDOW))
    _high: list[tuple[int, float]] = field(default_factory=list)  # the current run of high steps

    @property
    def start(self) -> float | None:
        return statistics.fmean(self._baseline) if self._baseline else None

    @property
    def suspect(self) -> bool:
        """Whether the last step was far above the start (a blow-up may be under way)."""
        return self.rise_began is not None

    @property
    def rise_began(self) -> int | None:
        """The first step of the current run of steps far above the start, or None."""
        return self._high[0][0] if self._high else None

    def far_above(self, loss: float) -> bool:
        start = self.start
        return start is not None and loss > self.loss_factor * start and loss > start + self.loss_margin

    def observe(self, step: int, loss: float, grad_norm: float) -> Verdict | None:
        """Record one optimiser step; a Verdict when the run has diverged, else None."""
        if verdict := self._gradient_verdict(step, grad_norm):
            return verdict
        if not math.isfinite(loss):
            return None  # loss_problem reports it
        if self.far_above(loss):
            self._high.append((step, loss))
            if len(self._high) >= self.patience:
                peak = max(value for _, value in self._high)
                return Verdict(f"The loss rose from {self.start:.3g} to {peak:.3g} in {len(self._high)} steps",
                               step, since=self.rise_began)
            return None
        self._high = []
        if len(self._baseline) < self.baseline_steps:
            self._baseline.append(loss)
        return None

    def _gradient_verdict(self, step: int, grad_norm: float) -> Verdict | None:
        if not math.isfinite(grad_norm):
            return Verdict(f"The gradient norm became {grad_norm} at step {step}", step, since=self.rise_began or step)
        earlier = self._grad_norms
        if earlier and grad_norm > self.grad_floor and grad_norm > self.grad_factor * statistics.median(earlier):
            return Verdict(f"The gradient norm exploded to {grad_norm:.3g} at step {step} (median before: "
                           f"{statistics.median(earlier):.3g})", step, since=self.rise_began or step)
        self._grad_norms.append(grad_norm)
        return None
