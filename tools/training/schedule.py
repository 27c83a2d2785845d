"""Learning-rate schedule: linear warmup, then a cosine decay to a floor (as in GPT-2/3 and nanoGPT).

A pure function of the optimizer step, so a resumed run gets the same learning rate with no saved state.
"""

from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based), for a run of `max_steps` steps."""
    if step < warmup_steps:
        # (step + 1) so the first update is not wasted with a learning rate of 0.
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_steps = max(1, max_steps - warmup_steps)
    progress = (step - warmup_steps) / decay_steps  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coeff * (lr - min_lr)
