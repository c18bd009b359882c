"""Learning-rate schedule and step counting, shared by both backends."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    peak_lr: float
    total_steps: int
    warmup_steps: int
    kind: str = "cosine"  # cosine | linear | constant
    min_ratio: float = 0.0  # final lr = peak * min_ratio

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (1-based)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        if self.kind == "linear":
            frac = 1.0 - progress
        else:
            frac = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.peak_lr * (self.min_ratio + (1.0 - self.min_ratio) * frac)


def total_steps(iters: int, epochs: float, micro_batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps: ``iters`` if set, else enough for ``epochs`` passes."""
    if iters > 0:
        return iters
    steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / grad_accum))
    return max(1, math.ceil(epochs * steps_per_epoch))


def make_schedule(kind: str, peak_lr: float, steps: int, warmup_ratio: float) -> Schedule:
    warm = int(round(steps * warmup_ratio))
    return Schedule(peak_lr, steps, min(warm, max(steps - 1, 0)), kind)
