"""AmbDiffSeg's learning-rate schedule.

:class:`WarmupConstantCosine` is the paper's learning-rate schedule as an ``LambdaLR`` factor: linear
warm-up, constant, then cosine decay to 0 over the last ``decay_steps`` iterations. (AmbDiffSeg trains
with the one training inferer, :class:`~ambiseg_monai.inferers.DiffusionTrainingInferer`, given a
``weighting`` and ``stratified_times: true``.)
"""

from __future__ import annotations

import math

__all__ = ["WarmupConstantCosine"]


class WarmupConstantCosine:
    """LR factor for ``torch.optim.lr_scheduler.LambdaLR``, stepped once per iteration.

    Linear warm-up from 0 to 1 over ``warmup_steps``, constant 1, then cosine decay to 0 over the last
    ``decay_steps`` of ``total_steps`` (paper: 1000 warm-up steps, 100k of 400k decaying). With
    ``decay_steps = total_steps - warmup_steps`` it is MONAI's warm-up cosine schedule.

    Args:
        warmup_steps, decay_steps, total_steps: in iterations; warmup + decay <= total.
    """

    def __init__(self, warmup_steps: int, decay_steps: int, total_steps: int) -> None:
        if min(warmup_steps, decay_steps) < 0 or total_steps < 1:
            raise ValueError(
                f"steps must be non-negative (total >= 1), got {warmup_steps}, {decay_steps}, {total_steps}."
            )
        if warmup_steps + decay_steps > total_steps:
            raise ValueError(
                f"warmup_steps ({warmup_steps}) + decay_steps ({decay_steps}) exceed total_steps ({total_steps})."
            )
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = int(decay_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_start = self.total_steps - self.decay_steps
        if step < decay_start or self.decay_steps == 0:
            return 1.0
        progress = min(1.0, (step - decay_start) / self.decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
