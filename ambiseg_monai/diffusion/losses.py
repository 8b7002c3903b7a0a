"""Diffusion training losses: the Improved-DDPM variational term and the weighted hybrid loss.

``L_hybrid = L_simple + λ L_vlb (+ β L_amb for CIMD)``. The VLB term trains only the variance: it is
evaluated with the model's mean prediction detached (stop-gradient), as in Improved DDPM and CIMD.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from monai.networks.schedulers.ddpm import DDPMPredictionType

from ambiseg_monai.diffusion.gaussian import (
    GaussianChain,
    discretized_gaussian_log_likelihood,
    mean_over_pixels,
    normal_kl,
)

__all__ = ["vlb_term", "HybridDiffusionLoss"]


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
        scheduler: a :class:`~ambiseg_monai.diffusion.schedulers.RespacedDDPMScheduler` (provides
            ``train_chain``, ``prediction_type``, ``variance_type`` and ``model_log_variance``).
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
    if scheduler.prediction_type == DDPMPredictionType.EPSILON:
        pred_x0 = chain.predict_x0_from_eps(xt, mean_output, timesteps)
    elif scheduler.prediction_type == DDPMPredictionType.SAMPLE:
        pred_x0 = mean_output
    else:
        pred_x0 = chain.predict_x0_from_v(xt, mean_output, timesteps)
    model_mean = chain.posterior_mean(pred_x0, xt, timesteps)
    model_log_var = scheduler.model_log_variance(var_values, timesteps, chain, x0)
    kl = mean_over_pixels(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    decoder_nll = -mean_over_pixels(
        discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * model_log_var)
    ) / math.log(2.0)
    return torch.where(timesteps.to(kl.device) == 0, decoder_nll, kl)


class HybridDiffusionLoss(torch.nn.Module):
    """Weighted sum of the per-sample loss terms produced by the diffusion training inferer.

    The training inferer (:class:`ambiseg_monai.engines.DiffusionTrainingInferer`) returns a dict
    with (B,) tensors ``l_simple``, ``l_vlb`` (present with a learned variance) and any auxiliary
    terms of the network (``l_amb`` for CIMD). This module returns
    ``Σ_k w_k term_k`` per sample (B,); the trainer averages it.

    Args:
        vlb_weight: λ. With ``l_vlb`` = T·L_t (the single-sample estimate of Σ_t L_t), λ = 1e-3 is
            CIMD's value and equals improved-diffusion's "hybrid" loss for any T.
        term_weights: weights of the other terms, e.g. ``{"l_amb": 1e-3}`` (β in CIMD). A term the
            inferer produces that has no weight here raises an error (a silent 0 would hide a mistake).
    """

    def __init__(self, vlb_weight: float = 1e-3, term_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.weights = {"l_simple": 1.0, "l_vlb": float(vlb_weight)}
        self.weights.update({k: float(v) for k, v in (term_weights or {}).items()})

    def forward(self, pred: Mapping[str, torch.Tensor], target: torch.Tensor | None = None) -> torch.Tensor:
        """Args: pred: the training inferer's dict; target: unused (the inferer already consumed it)."""
        terms = {k: v for k, v in pred.items() if k.startswith("l_")}
        unknown = sorted(set(terms) - set(self.weights))
        if unknown:
            raise ValueError(f"loss terms {unknown} have no weight; pass them in term_weights (known: {sorted(self.weights)}).")
        if "l_simple" not in terms:
            raise ValueError("the prediction dict has no 'l_simple' term; use DiffusionTrainingInferer as the trainer's inferer.")
        total = torch.zeros_like(terms["l_simple"])
        for name, value in terms.items():
            total = total + self.weights[name] * value
        return total
