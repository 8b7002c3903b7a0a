"""Inferers for diffusion segmentation: the training forward pass and the N-sample sampler.

- :class:`DiffusionTrainingInferer` is the ``inferer`` of MONAI's ``SupervisedTrainer``: it draws
  t and the noise, forms x_t and returns the per-sample loss terms that
  :class:`~ambiseg_monai.diffusion.losses.HybridDiffusionLoss` weights.
- :class:`DiffusionSamplingInferer` is the one N-sample inferer used by the evaluator,
  ``inference.json`` and the deploy app: ``__call__(inputs, network) -> B x N x H x W``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from monai.inferers import Inferer
from monai.networks.schedulers.ddpm import DDPMPredictionType

from ambiseg_monai.diffusion.gaussian import mean_over_pixels
from ambiseg_monai.diffusion.losses import vlb_term
from ambiseg_monai.diffusion.mixture_posterior import rater_posterior_target
from ambiseg_monai.diffusion.sampler import (
    autocast_dtype_from_name,
    make_generators,
    repeat_rows,
    reverse_diffusion,
    take_rows,
)
from ambiseg_monai.diffusion.schedulers import split_model_output
from ambiseg_monai.networks.denoisers import unwrap_network

__all__ = ["DiffusionTrainingInferer", "DiffusionSamplingInferer", "sample_statistics", "mask_to_symmetric"]


def mask_to_symmetric(mask: torch.Tensor) -> torch.Tensor:
    """A mask (or soft mask) in [0, 1] -> the diffusion range [-1, 1] (0 -> -1, 1 -> +1)."""
    mask = mask.float()
    low, high = float(mask.min()), float(mask.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"training targets must be masks in [0, 1] (they are mapped to [-1, 1] here); got values in [{low}, {high}]."
        )
    return 2.0 * mask - 1.0


def sample_statistics(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean (soft map) and variance over binary samples.

    Args:
        samples: B x N x H x W in {0, 1}.

    Returns:
        (mean, variance), each B x 1 x H x W; variance is the population variance p (1 - p).
    """
    samples = samples.float()
    mean = samples.mean(dim=1, keepdim=True)
    return mean, samples.var(dim=1, unbiased=False, keepdim=True)


class DiffusionTrainingInferer(Inferer):
    """One diffusion training forward pass; returns the loss terms per sample.

    Args:
        scheduler: the training scheduler (:class:`~ambiseg_monai.diffusion.RespacedDDPMScheduler`).
            Timesteps are drawn uniformly from ``[0, num_train_timesteps)``, or by the scheduler's
            ``sample_timesteps(batch, device)`` when it has one (the hook for continuous time).
        compute_vlb: add Improved DDPM's ``l_vlb`` when the network outputs a learned variance
            (discrete schedulers with a ``train_chain`` only).
        autocast_dtype: "bfloat16" or "float16": run the network call under ``torch.autocast`` on the
            inputs' device (the bundles pass :func:`~ambiseg_monai.engines.cpu_autocast_dtype`: bf16 on
            CPUs with native bf16, where it trains about 2x faster; CUDA uses the engine's ``amp``).
            The losses are computed in float32 either way.
        rater_posterior_targets: regress on ``E[x_0 | x_t, the image's raters]``
            (:func:`~ambiseg_monai.diffusion.rater_posterior_target`) instead of on the one rater
            that made x_t: same minimiser, much lower target variance at large t. Needs the raters:
            ``DiffusionTrainingPrepareBatch(rater_key="label")`` passes ``raters`` and ``rater_mask``.
            Use it only when the training target is one rater drawn uniformly (``SelectRandomRaterd``).

    ``__call__(inputs, network, target, class_labels=None)``: ``inputs`` the images
    B x C x H x W, ``target`` the training masks B x 1 x H x W in [0, 1] (one rater's mask, or the mean
    mask). Returns a dict of (B,) terms ``l_simple`` (MSE of the mean prediction), ``l_vlb``
    (``T · L_t`` in bits/pixel, mean detached) and the network's auxiliary terms (``l_amb``), plus
    ``model_output``, ``x_t``, ``noise`` and ``timesteps`` for inspection.
    """

    def __init__(
        self,
        scheduler,
        compute_vlb: bool = True,
        autocast_dtype: str | None = None,
        rater_posterior_targets: bool = False,
    ) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.compute_vlb = compute_vlb
        self.autocast_dtype = autocast_dtype_from_name(autocast_dtype)
        self.rater_posterior_targets = rater_posterior_targets

    def _mixed_precision(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def _sample_timesteps(self, batch: int, device: torch.device) -> torch.Tensor:
        # hook for continuous-time schedulers: they provide sample_timesteps(batch, device)
        sampler = getattr(self.scheduler, "sample_timesteps", None)
        if callable(sampler):
            return sampler(batch, device)
        return torch.randint(0, self.scheduler.num_train_timesteps, (batch,), device=device, dtype=torch.long)

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
            raise ValueError("DiffusionTrainingInferer needs `target` (pass it through prepare_batch's kwargs).")
        x0 = mask_to_symmetric(target).to(inputs.device)
        batch = x0.shape[0]
        timesteps = self._sample_timesteps(batch, inputs.device)
        noise = torch.randn_like(x0)
        x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        with self._mixed_precision(inputs.device):
            out = network(x_t, timesteps, class_labels=class_labels, image=inputs, target=x0)
        aux: dict[str, torch.Tensor] = {}
        if isinstance(out, tuple):
            out, aux = out
        mean_part, var_values = split_model_output(out.float(), x0.shape[1])
        regression_target = self._regression_target(x0, x_t, noise, timesteps, raters, rater_mask)
        result = {
            "l_simple": mean_over_pixels((regression_target - mean_part) ** 2),
            "model_output": out,
            "x_t": x_t,
            "noise": noise,
            "timesteps": timesteps,
        }
        if self.compute_vlb and var_values is not None:
            # stop-gradient on the mean: the VLB term trains only the variance (Improved DDPM)
            l_t = vlb_term(self.scheduler, mean_part.detach(), var_values, x0, x_t, timesteps)
            result["l_vlb"] = self.scheduler.num_train_timesteps * l_t
        for name, value in aux.items():
            result[name] = value.float()
        return result


    def _regression_target(self, x0, x_t, noise, timesteps, raters, rater_mask) -> torch.Tensor:
        """What the network's mean output regresses on: ε, x_0 or v of the (rater-posterior) target."""
        prediction_type = self.scheduler.prediction_type
        if not self.rater_posterior_targets:
            if prediction_type == DDPMPredictionType.EPSILON:
                return noise
            if prediction_type == DDPMPredictionType.SAMPLE:
                return x0
            return self.scheduler.get_velocity(x0, noise, timesteps)
        if raters is None:
            raise ValueError(
                "rater_posterior_targets needs the raters: set the prepare_batch's rater_key "
                "(DiffusionTrainingPrepareBatch(rater_key='label'))."
            )
        gamma = self.scheduler.alphas_cumprod.to(x_t.device)[timesteps].float()
        x0_target = rater_posterior_target(x_t, raters.to(x_t.device), rater_mask, gamma)
        alpha, sigma = gamma.sqrt().reshape(-1, 1, 1, 1), (1.0 - gamma).sqrt().reshape(-1, 1, 1, 1)
        eps_target = (x_t - alpha * x0_target) / sigma
        if prediction_type == DDPMPredictionType.EPSILON:
            return eps_target
        if prediction_type == DDPMPredictionType.SAMPLE:
            return x0_target
        return alpha * eps_target - sigma * x0_target


class PerImageSeedingInferer(Inferer):
    """Base of the N-sample inferers: the key that seeds each image's samples.

    Every (image, sample) pair gets its own random stream seeded from ``(seed, image key, n)`` (see
    :mod:`ambiseg_monai.diffusion.sampler`), so a mask does not depend on the other images of its
    batch. The image key is the ``image_ids`` entry passed to ``__call__`` (case ids or dataset
    positions) or, without ids, a running count of the images this inferer has seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self._images_seen = 0

    def reset_counter(self) -> None:
        """Restart the running image count used as the image key when no ``image_ids`` are given."""
        self._images_seen = 0

    def _image_keys(self, batch: int, image_ids: Sequence | None) -> list[int | str]:
        """The B image keys of this call (and advance the running count)."""
        if image_ids is None:
            keys: list[int | str] = list(range(self._images_seen, self._images_seen + batch))
        else:
            keys = [i if isinstance(i, str) else int(i) for i in image_ids]
            if len(keys) != batch:
                raise ValueError(f"{type(self).__name__}: got {len(keys)} image_ids for a batch of {batch} images.")
        self._images_seen += batch
        return keys


class DiffusionSamplingInferer(PerImageSeedingInferer):
    """N masks per image by reverse diffusion: ``__call__(inputs, network) -> B x N x H x W`` in {0, 1}.

    The condition is encoded once per image (``network.encode_condition``) and the N samples of the
    images in the batch run as one network batch per step (``max_rows`` splits it, e.g. ``1`` samples
    one mask at a time like the official CIMD code). Randomness is per sample (see
    :mod:`ambiseg_monai.diffusion.sampler`), so results do not depend on batching.

    Args:
        scheduler: a scheduler following the protocol (DDPM or DDIM, respaced).
        num_samples: N.
        num_inference_steps: respaced number of steps (None: the scheduler's current timesteps).
        seed: base seed; each (image, sample) gets its own seed from (seed, image key, n).
        mask_channels: channels of one diffused mask (1).
        threshold: a sample is ``x_0 > threshold`` (0 in the [-1, 1] range).
        return_stats: return ``{"pred": samples, "mean": B x 1 x H x W, "variance": B x 1 x H x W}``.
        max_rows: most masks per network call (None: all B x N at once).
        progress: show a progress bar over the steps.
        autocast_dtype: "bfloat16" or "float16": run the network calls under ``torch.autocast`` (on a
            CPU with native bf16, bf16 is 2-3x faster at no measured GED cost, see docs/benchmarks.md);
            None: float32 unless an enclosing autocast (an evaluator's ``amp``) applies.

    ``__call__`` keyword arguments: ``image_ids`` (B case ids or dataset positions; default: a running
    count of the images this inferer has seen, see :meth:`reset_counter`), ``class_labels`` (B,).
    """

    def __init__(
        self,
        scheduler,
        num_samples: int = 4,
        num_inference_steps: int | None = None,
        seed: int = 0,
        mask_channels: int = 1,
        threshold: float = 0.0,
        return_stats: bool = False,
        max_rows: int | None = None,
        progress: bool = False,
        autocast_dtype: str | None = None,
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}.")
        self.scheduler = scheduler
        self.num_samples = int(num_samples)
        self.num_inference_steps = num_inference_steps
        self.seed = int(seed)
        self.mask_channels = int(mask_channels)
        self.threshold = float(threshold)
        self.return_stats = return_stats
        self.max_rows = max_rows
        self.progress = progress
        self.autocast_dtype = autocast_dtype_from_name(autocast_dtype)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        *args,
        image_ids: Sequence | None = None,
        class_labels: torch.Tensor | None = None,
        **kwargs,
    ):
        """inputs: B x C x H x W images -> B x N x H x W binary masks (float), or a dict with return_stats."""
        batch, n = inputs.shape[0], self.num_samples
        keys = self._image_keys(batch, image_ids)
        generators = make_generators(self.seed, keys, n)
        cond_rows = repeat_rows(unwrap_network(network).encode_condition(inputs), n)
        label_rows = repeat_rows(class_labels, n)
        if self.num_inference_steps is not None:
            self.scheduler.set_timesteps(int(self.num_inference_steps))  # CPU timesteps: no device read per step
        sample_shape = (self.mask_channels, *inputs.shape[2:])
        rows, chunk = batch * n, self.max_rows or batch * n
        reference = inputs if inputs.is_floating_point() else inputs.float()
        pieces = []
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            pieces.append(
                reverse_diffusion(
                    network,
                    self.scheduler,
                    take_rows(cond_rows, part),
                    sample_shape,
                    generators[part],
                    class_labels=take_rows(label_rows, part),
                    progress=self.progress,
                    reference=reference,
                    autocast_dtype=self.autocast_dtype,
                )
            )
        x0 = torch.cat(pieces)  # (B N) x 1 x H x W, image-major
        samples = (x0[:, 0] > self.threshold).float().reshape(batch, n, *inputs.shape[2:])
        if not self.return_stats:
            return samples
        mean, variance = sample_statistics(samples)
        return {"pred": samples, "mean": mean, "variance": variance}
