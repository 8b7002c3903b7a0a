"""Continuous-time training (AmbDiffSeg): the name its configs use for the training inferer, and its LR schedule.

:class:`ContinuousDiffusionTrainingInferer` is the one training inferer,
:class:`~ambiseg_monai.engines.DiffusionTrainingInferer`, with AmbDiffSeg's defaults: a continuous-time
scheduler (:mod:`ambiseg_monai.diffusion.continuous`), t drawn stratified over the batch, and the error of
x̂_0 (after tanh, or converted from v / ε) weighted by w(t) (truncated SNR unless given). It is kept so
that configs naming it keep working; new configs use ``DiffusionTrainingInferer`` with
``weighting`` and ``stratified_times: true``.

:class:`WarmupConstantCosine` is the paper's learning-rate schedule as an ``LambdaLR`` factor: linear
warm-up, constant, then cosine decay to 0 over the last ``decay_steps`` iterations.
"""

from __future__ import annotations

import math

from ambiseg_monai.diffusion.continuous import ContinuousTimeScheduler
from ambiseg_monai.diffusion.weighting import LossWeighting
from ambiseg_monai.engines.inferers import DiffusionTrainingInferer

__all__ = ["ContinuousDiffusionTrainingInferer", "WarmupConstantCosine"]


class ContinuousDiffusionTrainingInferer(DiffusionTrainingInferer):
    """:class:`~ambiseg_monai.engines.DiffusionTrainingInferer` with AmbDiffSeg's defaults (a config alias).

    Equivalent to ``DiffusionTrainingInferer(scheduler, weighting=weighting or LossWeighting(),
    stratified_times=stratified_times, autocast_dtype=..., rater_posterior_targets=...)`` and checks that
    the scheduler is a continuous-time one.

    Args:
        scheduler: a :class:`~ambiseg_monai.diffusion.continuous.ContinuousTimeScheduler`.
        weighting: the loss weighting w(t) (default: truncated SNR).
        stratified_times: draw t stratified over the batch (default True).
        autocast_dtype, rater_posterior_targets: as in :class:`~ambiseg_monai.engines.DiffusionTrainingInferer`.
    """

    def __init__(
        self,
        scheduler: ContinuousTimeScheduler,
        weighting: LossWeighting | None = None,
        stratified_times: bool = True,
        autocast_dtype: str | None = None,
        rater_posterior_targets: bool = False,
    ) -> None:
        if not isinstance(scheduler, ContinuousTimeScheduler):
            raise TypeError(
                "ContinuousDiffusionTrainingInferer needs a continuous-time scheduler, "
                f"got {type(scheduler).__name__}; use DiffusionTrainingInferer for discrete schedulers."
            )
        super().__init__(
            scheduler,
            autocast_dtype=autocast_dtype,
            rater_posterior_targets=rater_posterior_targets,
            weighting=weighting or LossWeighting(),
            stratified_times=stratified_times,
        )


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
