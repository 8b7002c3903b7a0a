"""Diffusion training losses: the Improved-DDPM variational term and the weighted sum of the loss terms.

The training inferer (:class:`~ambiseg_monai.inferers.DiffusionTrainingInferer`) returns (B,) loss terms
(``l_simple``, ``l_vlb`` with a learned variance, the network's auxiliary terms such as CIMD's
``l_amb``); :class:`DiffusionLoss` weights and sums them. :class:`HybridDiffusionLoss` is Improved
DDPM's ``L_hybrid = L_simple + λ L_vlb (+ β L_amb for CIMD)``. The VLB term trains only the variance:
it is evaluated with the model's mean prediction detached (stop-gradient), as in Improved DDPM and CIMD.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ambiseg_monai.diffusion.gaussian import (
    GaussianChain,
    discretized_gaussian_log_likelihood,
    mean_over_pixels,
    normal_kl,
)

__all__ = ["vlb_term", "DiffusionLoss", "HybridDiffusionLoss"]


def vlb_term(
    scheduler,
    mean_output: torch.Tensor,
    var_values: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """One term ``L_t`` of the variational bound per batch row, in bits per pixel.

    ``L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for t > 0 and the discretised decoder
    NLL ``-log p(x_0 | x_1)`` for t = 0, computed on the scheduler's full training chain
    (``scheduler.train_chain``) exactly as Improved DDPM's ``_vb_terms_bpd`` (no clipping of x0).

    Args:
        scheduler: a :class:`~ambiseg_monai.diffusion.protocols.LearnedVarianceScheduler` such as
            :class:`~ambiseg_monai.schedulers.respaced.RespacedDDPMScheduler` (provides ``train_chain``,
            ``parameterization`` and ``model_log_variance``).
        mean_output: the model's mean-part output (ε, x0 or v), B x C x H x W. Detach it to train
            only the variance with this term (the hybrid loss does).
        var_values: the model's variance output (v in [-1, 1] for learned range), B x C x H x W.
        x0: clean targets in [-1, 1], B x C x H x W.
        xt: noised targets at ``timesteps``, B x C x H x W.
        timesteps: (B,) training timesteps.

    Returns:
        (B,) tensor of ``L_t`` in bits per pixel.
    """
    chain: GaussianChain = scheduler.train_chain
    mean_output, var_values, x0, xt = (v.float() for v in (mean_output, var_values, x0, xt))
    timesteps = timesteps.long()
    true_mean = chain.posterior_mean(x0, xt, timesteps)
    true_log_var = chain.gather(chain.posterior_log_variance_clipped, timesteps, x0)
    pred_x0 = scheduler.parameterization.predict_x0(mean_output, xt, *chain.coefficients(timesteps, xt))
    model_mean = chain.posterior_mean(pred_x0, xt, timesteps)
    model_log_var = scheduler.model_log_variance(var_values, timesteps, chain, x0)
    kl = mean_over_pixels(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    decoder_nll = -mean_over_pixels(
        discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * model_log_var)
    ) / math.log(2.0)
    return torch.where(timesteps.to(kl.device) == 0, decoder_nll, kl)


class DiffusionLoss(torch.nn.Module):
    """Weighted sum of the per-sample loss terms produced by the diffusion training inferer.

    The training inferer (:class:`ambiseg_monai.inferers.DiffusionTrainingInferer`) returns a dict
    with (B,) tensors ``l_simple``, ``l_vlb`` (present with a learned variance) and any auxiliary
    terms of the network (``l_amb`` for CIMD). This module returns ``Σ_k w_k term_k`` per sample (B,);
    the trainer averages it. With no ``term_weights`` it is ``l_simple`` alone (AmbDiffSeg).

    Args:
        term_weights: weights of the terms other than ``l_simple`` (whose weight is 1), e.g.
            ``{"l_vlb": 1e-3, "l_amb": 1e-3}``. A term the inferer produces that has no weight here
            raises an error (a silent 0 would hide a mistake).
    """

    def __init__(self, term_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.weights = {"l_simple": 1.0}
        self.weights.update({k: float(v) for k, v in (term_weights or {}).items()})

    def forward(self, pred: Mapping[str, torch.Tensor], target: torch.Tensor | None = None) -> torch.Tensor:
        """Args: pred: the training inferer's dict; target: unused (the inferer already consumed it)."""
        terms = {k: v for k, v in pred.items() if k.startswith("l_")}
        unknown = sorted(set(terms) - set(self.weights))
        if unknown:
            raise ValueError(
                f"loss terms {unknown} have no weight; pass them in term_weights (known: {sorted(self.weights)})."
            )
        if "l_simple" not in terms:
            raise ValueError(
                "the prediction dict has no 'l_simple' term; use DiffusionTrainingInferer as the trainer's inferer."
            )
        total = torch.zeros_like(terms["l_simple"])
        for name, value in terms.items():
            total = total + self.weights[name] * value
        return total


class HybridDiffusionLoss(DiffusionLoss):
    """Improved DDPM's hybrid loss ``l_simple + λ l_vlb`` (+ other weighted terms): a :class:`DiffusionLoss`.

    Args:
        vlb_weight: λ. With ``l_vlb`` = T·L_t (the single-sample estimate of Σ_t L_t), λ = 1e-3 is
            CIMD's value and equals improved-diffusion's "hybrid" loss for any T.
        term_weights: weights of the other terms, e.g. ``{"l_amb": 1e-3}`` (β in CIMD).

    For a model without a learned variance (no ``l_vlb``) use :class:`DiffusionLoss`.
    """

    def __init__(self, vlb_weight: float = 1e-3, term_weights: Mapping[str, float] | None = None) -> None:
        super().__init__({"l_vlb": float(vlb_weight), **(term_weights or {})})
