"""Learning-rate schedules as multipliers of the peak LR, one value per optimizer step.

- cosine: linear warmup, then half a cosine from the peak down to `min_lr_ratio` at the last step
  (the paper's recipe, §5).
- wsd (warmup-stable-decay): linear warmup, a flat stretch at the peak, then a linear decay to
  `min_lr_ratio` over the last `decay_fraction` of the run. A run can be extended from any
  checkpoint taken in the stable stretch, which the cosine shape does not allow.
- constant: linear warmup, then the peak.

The multiplier is a pure function of the step, so a resumed run follows the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    kind: str
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.1

    def __call__(self, step: int) -> float:
        """The LR multiplier for the optimizer step with index `step` (0 = the first)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            # (step + 1): the first step already trains, at 1/warmup of the peak rather than at zero.
            return (step + 1) / self.warmup_steps
        floor = self.min_lr_ratio
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "wsd":
            decay_steps = max(1, round(self.decay_fraction * self.total_steps))
            decay_start = max(self.warmup_steps, self.total_steps - decay_steps)
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start) / max(1, self.total_steps - decay_start))
            return 1.0 - (1 - floor) * progress
        raise ValueError(f"unknown schedule kind {self.kind!r}; choose cosine, wsd or constant")


def make_schedule(schedule_config, total_steps: int) -> Schedule:
    return Schedule(
        kind=schedule_config.kind,
        warmup_steps=schedule_config.warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=schedule_config.min_lr_ratio,
        decay_fraction=schedule_config.decay_fraction,
    )


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    # The Schedule is an object, not a closure, so LambdaLR's state_dict carries its settings too.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
