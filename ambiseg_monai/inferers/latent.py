"""Inferers of the latent-variable baselines (Probabilistic U-Net family, PHiSeg).

Wiring with MONAI engines (no custom trainer), sharing the diffusion bundles' batch preparation:

* training: ``SupervisedTrainer(prepare_batch=DiffusionTrainingPrepareBatch(), inferer=LatentTrainingInferer(),
  loss_function=ProbUNetELBOLoss(network=net) | PHiSegELBOLoss(), network=net, ...)``. The prepare_batch
  passes the training mask as the loss target and as the ``target`` keyword; :class:`LatentTrainingInferer`
  calls ``network(image, target)``, which returns a dict of logits and KL terms; the loss
  (:mod:`ambiseg_monai.losses.elbo`) combines them.
* evaluation / inference: ``SupervisedEvaluator(prepare_batch=SamplingPrepareBatch(),
  inferer=LatentSampleInferer(num_samples), ...)`` gives ``B x N x H x W`` binary samples drawn from the prior,
  the interface (and per-sample seeding) of the diffusion bundles' ``DiffusionSamplingInferer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import Inferer
from torch import nn

from ambiseg_monai.diffusion.sampler import make_generators
from ambiseg_monai.inferers.diffusion import PerImageSeedingInferer, sample_statistics
from ambiseg_monai.networks.denoisers import unwrap_network

__all__ = ["LatentTrainingInferer", "LatentSampleInferer"]


class LatentTrainingInferer(Inferer):
    """Training forward pass of a latent model: ``__call__(inputs, network, target=...) -> network(inputs, target)``.

    ``inputs``: ``B x C x H x W`` images; ``target``: ``B x 1 x H x W`` binary training mask (one rater), given
    as a keyword by ``DiffusionTrainingPrepareBatch``. Returns the network's training dict (``"logits"``,
    ``"kl"``, for PHiSeg also ``"level_logits"``). The latent models take no class labels.
    """

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        *args: Any,
        target: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        if target is None:
            raise ValueError("LatentTrainingInferer needs `target` (pass it through prepare_batch's kwargs).")
        if class_labels is not None:
            raise ValueError(
                "LatentTrainingInferer: the Probabilistic U-Net and PHiSeg take no class labels; "
                "set the prepare_batch's class_label_key to None."
            )
        return network(inputs, target)


class LatentSampleInferer(PerImageSeedingInferer):
    """N-sample inferer for latent-variable models: ``__call__(inputs, network) -> B x N x H x W`` in {0, 1}.

    Latents are drawn from the network's **prior** (``network.sample(inputs, N, generators)``; the posterior,
    which needs the mask, is never used) and decoded in one batched call; a pixel is foreground where its
    logit is ``> 0`` (probability ``> 0.5``). Interface and seeding follow the diffusion bundles'
    ``DiffusionSamplingInferer``, so evaluation, inference and deploy code is shared: every (image, sample)
    pair draws its latent noise from its own generator seeded from ``(seed, image key, n)``, so a mask does not
    depend on the other images of its batch.

    Args:
        num_samples: ``N`` masks per image.
        seed: base seed; ``None`` uses the global RNG instead of per-sample generators.
        return_stats: return ``{"pred": samples, "mean": B x 1 x H x W, "variance": B x 1 x H x W}``.

    ``__call__`` keyword arguments: ``image_ids`` (B case ids or dataset positions; default: a running count
    of the images this inferer has seen, see :meth:`reset_counter`). Other arguments from the engine (e.g. a
    ``target``) are ignored: sampling never looks at a mask.
    """

    def __init__(self, num_samples: int = 4, seed: int | None = 0, return_stats: bool = False) -> None:
        super().__init__()
        if int(num_samples) < 1:
            raise ValueError(f"LatentSampleInferer: num_samples must be >= 1, got {num_samples}.")
        self.num_samples = int(num_samples)
        self.seed = None if seed is None else int(seed)
        self.return_stats = bool(return_stats)

    def _generators(self, batch: int, image_ids: Sequence | None) -> list[torch.Generator] | None:
        keys = self._image_keys(batch, image_ids)
        return None if self.seed is None else make_generators(self.seed, keys, self.num_samples)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        *args: Any,
        image_ids: Sequence | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        if inputs.ndim != 4:
            raise ValueError(f"LatentSampleInferer expects B x C x H x W images, got {tuple(inputs.shape)}.")
        model = unwrap_network(network)  # DDP / DataParallel expose only forward(); sampling is a method
        if not callable(getattr(model, "sample", None)):
            raise TypeError(
                "LatentSampleInferer needs a network with sample(image, num_samples, generators) (e.g. "
                f"ProbabilisticUNet, PHiSeg), got {type(model).__name__}."
            )
        generators = self._generators(inputs.shape[0], image_ids)
        logits = model.sample(inputs, self.num_samples, generators)
        expected = (inputs.shape[0], self.num_samples, *inputs.shape[2:])
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"LatentSampleInferer: {type(model).__name__}.sample returned {tuple(logits.shape)}, "
                f"expected {expected}."
            )
        samples = (logits > 0).float()
        if not self.return_stats:
            return samples
        mean, variance = sample_statistics(samples)
        return {"pred": samples, "mean": mean, "variance": variance}
