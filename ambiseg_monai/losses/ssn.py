"""Loss of the Stochastic Segmentation Network: the Monte Carlo estimate of the log-likelihood of the mask.

``SupervisedTrainer(..., inferer=LatentTrainingInferer(), loss_function=StochasticSegmentationLoss())`` with
:class:`~ambiseg_monai.networks.ssn.StochasticSegmentationNetwork`: the network's training dict (the
parameters of the low-rank Gaussian over logit maps) and one rater's mask -> the loss. Add the loss object
to ``train_handlers`` so that a divergence error names the trainer's iteration; its ``last_terms`` hold the
terms for logging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ambiseg_monai.losses.elbo import _LatentELBOLoss
from ambiseg_monai.networks.ssn import sample_logit_maps

__all__ = ["StochasticSegmentationLoss", "monte_carlo_log_likelihood"]


def _log_likelihood_per_sample(logit_maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log p(y | eta)`` summed over pixels: ``... x C x H x W`` logits, ``... x H x W`` {0, 1} target -> ``...``.

    ``C = 1``: ``-BCE(eta, y)``; ``C = 2``: ``-CE(softmax(eta), y)`` (the same value for ``eta_1 - eta_0``).
    """
    if logit_maps.shape[-3] == 1:
        nll = F.binary_cross_entropy_with_logits(logit_maps[..., 0, :, :], target, reduction="none")
    else:
        nll = -torch.log_softmax(logit_maps, dim=-3).gather(-3, target.long().unsqueeze(-3)).squeeze(-3)
    return -nll.flatten(-2).sum(-1)


def monte_carlo_log_likelihood(logit_samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log (1/M) sum_m p(y | eta_m)`` per image, by logsumexp over the ``M`` samples.

    Args:
        logit_samples: ``M x B x C x H x W`` logit maps (``C`` = 1 or 2).
        target: ``B x H x W`` binary mask.

    Returns:
        ``B`` log-likelihood estimates (a lower bound in expectation: Jensen on the log of the MC mean).
    """
    per_sample = _log_likelihood_per_sample(
        logit_samples, target.to(logit_samples.dtype).expand_as(logit_samples[:, :, 0])
    )
    return torch.logsumexp(per_sample, dim=0) - math.log(logit_samples.shape[0])


class StochasticSegmentationLoss(_LatentELBOLoss):
    """``-mean_b log (1/M) sum_m p(y_b | eta_m)``, ``eta_m ~ N(mu, P P^T + D)`` reparameterised (Monteiro et al.).

    ``p(y | eta)`` is the product over pixels of the softmax (``C = 2``) or sigmoid (``C = 1``) likelihood,
    so ``log p`` is the per-pixel cross-entropy summed over the image; the ``M`` samples are combined by
    logsumexp (a sample that explains the mask dominates the gradient), as in both of the authors'
    implementations.

    Args:
        num_mc_samples: ``M`` (paper: 20).
        antithetic: draw ``M / 2`` samples and their reflections about the mean (the authors' BraTS code,
            ``fixed_re_parametrization_trick``); ``False`` (default): ``M`` independent draws (their LIDC code).
            Needs an even ``M``.
        l2_weight: optional squared-L2 weight on the network parameters (authors' LIDC code: none).
        network: the trained network (required when ``l2_weight > 0``).

    ``forward(pred, target)``: ``pred`` is the network's training dict (``"loc"``: ``B x K``, ``"cov_diag"``:
    ``B x K``, optional ``"cov_factor"``: ``B x K x R``, with ``K = C x H x W``), ``target`` the
    ``B x 1 x H x W`` binary mask. After each call ``last_terms`` holds ``loss``, ``nll`` (the Monte Carlo
    negative log-likelihood, batch mean), ``mean_nll`` (the summed cross-entropy of the mean logits alone: a
    diagnostic, not trained; ``nll`` below it means the covariance explains the raters) and ``l2``.
    Raises ``FloatingPointError`` naming the iteration and the non-finite term if the loss is not finite.
    """

    name = "Stochastic Segmentation Network"

    def __init__(
        self,
        num_mc_samples: int = 20,
        antithetic: bool = False,
        l2_weight: float = 0.0,
        network: nn.Module | None = None,
    ) -> None:
        super().__init__(l2_weight, network)
        if int(num_mc_samples) < 1:
            raise ValueError(
                f"StochasticSegmentationLoss: num_mc_samples must be >= 1 (paper: 20), got {num_mc_samples}."
            )
        if antithetic and int(num_mc_samples) % 2:
            raise ValueError(
                f"StochasticSegmentationLoss: antithetic sampling pairs each draw with its reflection, so "
                f"num_mc_samples must be even, got {num_mc_samples}."
            )
        self.num_mc_samples = int(num_mc_samples)
        self.antithetic = bool(antithetic)

    def draw(self, pred: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``M x B x K`` reparameterised logit samples of the training dict's distribution.

        The draws of ``LowRankMultivariateNormal(loc, cov_factor, cov_diag).rsample``
        (:func:`~ambiseg_monai.networks.ssn.sample_logit_maps`), without building the distribution: its
        constructor factorises the ``R x R`` capacitance matrix ``I + P^T D^-1 P``, which sampling never
        uses and which fails when ``D`` is tiny against ``P`` (the authors' code then falls back to
        independent normals for the batch).
        """
        draws = self.num_mc_samples // 2 if self.antithetic else self.num_mc_samples
        samples = sample_logit_maps(pred["loc"], pred.get("cov_factor"), pred["cov_diag"], draws).transpose(0, 1)
        if not self.antithetic:
            return samples
        deviations = samples - pred["loc"]
        return torch.cat([deviations, -deviations]) + pred["loc"]

    def forward(self, pred: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        owner = type(self).__name__
        self._check_pred(owner, pred, ("logits", "loc", "cov_diag"))
        target = self._check_target(owner, pred["logits"], target)
        batch, _, height, width = target.shape
        size = pred["loc"].shape[-1]
        if pred["loc"].ndim != 2 or pred["loc"].shape[0] != batch or size % (height * width):
            raise ValueError(
                f"{owner}: loc must be B x (C * H * W) = {batch} x (C * {height * width}), "
                f"got {tuple(pred['loc'].shape)}."
            )
        classes = size // (height * width)
        with torch.autocast(target.device.type, enabled=False):  # the distribution's algebra in float32
            pred = {key: value.float() for key, value in pred.items()}
            mask = target.float()[:, 0]
            samples = self.draw(pred).reshape(self.num_mc_samples, batch, classes, height, width)
            nll = -monte_carlo_log_likelihood(samples, mask).mean()
            with torch.no_grad():
                mean_maps = pred["loc"].reshape(batch, classes, height, width)
                mean_nll = -_log_likelihood_per_sample(mean_maps, mask).mean()
        l2 = self._l2(nll)
        loss = nll + self.l2_weight * l2
        return self._finish({"loss": loss, "nll": nll, "mean_nll": mean_nll, "l2": l2})
