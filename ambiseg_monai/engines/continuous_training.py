"""Training pieces for continuous-time diffusion (AmbDiffSeg): the trainer's inferer and its LR schedule.

:class:`ContinuousDiffusionTrainingInferer` is the ``inferer`` of MONAI's ``SupervisedTrainer`` for a
continuous-time scheduler (:mod:`ambiseg_monai.diffusion.continuous`). The discrete
:class:`~ambiseg_monai.engines.inferers.DiffusionTrainingInferer` cannot serve here: it draws integer
timesteps from ``num_train_timesteps`` and regresses the raw network output on its target, while
AmbDiffSeg draws t in [0, 1] and weights the error of x̂_0 (after tanh, or converted from v / ε) by
w(t). It returns the same kind of dict, with the weighted loss as ``l_simple``, so
:class:`~ambiseg_monai.diffusion.losses.HybridDiffusionLoss` (with no other terms) reduces it.

:class:`WarmupConstantCosine` is the paper's learning-rate schedule as an ``LambdaLR`` factor: linear
warm-up, constant, then cosine decay to 0 over the last ``decay_steps`` iterations.
"""

from __future__ import annotations

import contextlib
import math

import torch
from monai.inferers import Inferer

from ambiseg_monai.diffusion.continuous import ContinuousVPScheduler
from ambiseg_monai.diffusion.gaussian import mean_over_pixels
from ambiseg_monai.diffusion.mixture_posterior import rater_posterior_target
from ambiseg_monai.diffusion.sampler import autocast_dtype_from_name
from ambiseg_monai.diffusion.weighting import LossWeighting
from ambiseg_monai.engines.inferers import mask_to_symmetric

__all__ = ["sample_training_times", "ContinuousDiffusionTrainingInferer", "WarmupConstantCosine"]


def sample_training_times(
    batch: int, stratified: bool = True, device: str | torch.device | None = None
) -> torch.Tensor:
    """(B,) training times in [0, 1).

    ``stratified`` (the official code's "uniform_low_d"): one time in each of the B strata
    ``[i/B, (i+1)/B)``, in random order; still uniform per row, with less variance of the batch loss.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}.")
    if not stratified:
        return torch.rand(batch, device=device)
    return (torch.randperm(batch, device=device) + torch.rand(batch, device=device)) / batch


class ContinuousDiffusionTrainingInferer(Inferer):
    """One continuous-time diffusion training forward pass; returns the weighted x-space loss per sample.

    Args:
        scheduler: a :class:`~ambiseg_monai.diffusion.continuous.ContinuousVPScheduler` (its schedule
            noises the targets, its parameterisation turns the network output into x̂_0).
        weighting: the loss weighting w(t) (default: truncated SNR).
        stratified_times: draw t stratified over the batch (see :func:`sample_training_times`).
        autocast_dtype: as in :class:`~ambiseg_monai.engines.DiffusionTrainingInferer` (bf16 network
            call on CPUs with native bf16; the loss stays float32).
        rater_posterior_targets: regress x̂_0 on ``E[x_0 | x_t, the image's raters]``, as in
            :class:`~ambiseg_monai.engines.DiffusionTrainingInferer` (needs ``raters`` from the
            prepare_batch's ``rater_key``).

    ``__call__(inputs, network, target=..., class_labels=None)``: ``inputs`` the images B x C x H x W,
    ``target`` the training masks B x 1 x H x W in [0, 1]. Returns a dict with (B,) ``l_simple``
    (``w(t) · mean over pixels of (x̂_0 - x_0)²``), and for inspection ``loss_weights`` (B,),
    ``model_output``, ``pred_x0``, ``x_t``, ``noise`` (B x 1 x H x W) and ``timesteps`` (B,).
    """

    def __init__(
        self,
        scheduler: ContinuousVPScheduler,
        weighting: LossWeighting | None = None,
        stratified_times: bool = True,
        autocast_dtype: str | None = None,
        rater_posterior_targets: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(scheduler, ContinuousVPScheduler):
            raise TypeError(
                "ContinuousDiffusionTrainingInferer needs a continuous-time scheduler, "
                f"got {type(scheduler).__name__}; "
                "use DiffusionTrainingInferer for discrete schedulers."
            )
        self.scheduler = scheduler
        self.weighting = weighting or LossWeighting()
        self.stratified_times = stratified_times
        self.autocast_dtype = autocast_dtype_from_name(autocast_dtype)
        self.rater_posterior_targets = rater_posterior_targets

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        *args,
        target: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        raters: torch.Tensor | None = None,
        rater_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> dict[str, torch.Tensor]:
        if target is None:
            raise ValueError(
                "ContinuousDiffusionTrainingInferer needs `target` (pass it through prepare_batch's kwargs)."
            )
        x0 = mask_to_symmetric(target).to(inputs.device)
        timesteps = sample_training_times(x0.shape[0], self.stratified_times, device=inputs.device)
        noise = torch.randn_like(x0)
        x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        mixed_precision = (
            torch.autocast(inputs.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with mixed_precision:
            out = network(x_t, timesteps, class_labels=class_labels, image=inputs, target=x0)
        if isinstance(out, tuple):
            raise ValueError("ContinuousDiffusionTrainingInferer expects a denoiser without auxiliary loss terms.")
        if out.shape != x0.shape:
            raise ValueError(
                f"the network output has shape {tuple(out.shape)}; expected {tuple(x0.shape)} (one channel per mask)."
            )
        # the loss is computed in float32 even under autocast: the SNR weights span many decades
        pred_x0, _ = self.scheduler.predict(out.float(), x_t.float(), timesteps)
        weights = self.weighting(timesteps, self.scheduler.schedule).to(device=x0.device, dtype=torch.float32)
        x0_target = x0
        if self.rater_posterior_targets:
            if raters is None:
                raise ValueError(
                    "rater_posterior_targets needs the raters: set the prepare_batch's rater_key "
                    "(DiffusionTrainingPrepareBatch(rater_key='label'))."
                )
            gamma = torch.as_tensor(self.scheduler.schedule.gamma(timesteps.detach().double())).to(x0.device)
            x0_target = rater_posterior_target(x_t.float(), raters.to(x0.device), rater_mask, gamma)
        return {
            "l_simple": weights * mean_over_pixels((pred_x0 - x0_target) ** 2),
            "loss_weights": weights,
            "model_output": out,
            "pred_x0": pred_x0,
            "x_t": x_t,
            "noise": noise,
            "timesteps": timesteps,
        }


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
