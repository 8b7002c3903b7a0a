"""E[x_0 | x_t] when x_0 is one of a few known masks: the oracle denoiser and rater-posterior targets.

With ``x_t = α x_0 + σ ε`` and ``x_0`` one of K masks ``m_k`` in {-1, 1}^D drawn with prior
weights ``p_k``, the posterior over the masks is a softmax (``||m_k||² = D`` for every k, so it
cancels):

    w_k(x_t) = softmax_k( log p_k + α <x_t, m_k> / σ² ),      E[x_0 | x_t] = Σ_k w_k m_k.

Nothing here assumes α² + σ² = 1: the same formula is exact for rectified flow's linear interpolation
(α = 1 - t, σ = t), where it also gives the exact velocity ``E[x_0 - ε | x_t] = E[x_0 | x_t] - (x_t - α
E[x_0 | x_t]) / σ``.

Two uses share this one function:

- :class:`~ambiseg_monai.diffusion.oracle.MixtureOracleDenoiser`: the exact denoiser of a known
  finite mixture, to test samplers without a network;
- rater-posterior training targets (:func:`rater_posterior_target`): an image's raters are draws
  from its mask distribution, so regressing on ``E[x_0 | x_t, the image's raters]`` instead of on
  the one rater that made ``x_t`` has the same minimiser given the raters, with far less target
  variance at large t where x_t says little about which rater it came from ("stable target
  field", Xu et al., ICLR 2023). See docs/benchmarks.md for what it changes on the demo.
"""

from __future__ import annotations

import torch

__all__ = ["mixture_posterior_mean", "rater_posterior_target"]


def mixture_posterior_mean(
    x_t: torch.Tensor, masks: torch.Tensor, log_weights: torch.Tensor, alpha: torch.Tensor, variance: torch.Tensor
) -> torch.Tensor:
    """E[x_0 | x_t] for x_0 drawn from per-row finite mixtures of {-1, 1} masks.

    Args:
        x_t: B x D noisy samples (flattened).
        masks: B x K x D candidate masks in {-1, 1}.
        log_weights: B x K log prior weights (``-inf`` removes a candidate, e.g. a padded rater).
        alpha, variance: B x 1 signal scale α and noise variance σ² of each row.

    Returns:
        B x D posterior mean, in the dtype of ``x_t``.
    """
    logits = log_weights + alpha * torch.einsum("bd,bkd->bk", x_t, masks) / variance
    weights = torch.softmax(logits, dim=1)
    return torch.einsum("bk,bkd->bd", weights, masks)


def rater_posterior_target(
    x_t: torch.Tensor,
    raters: torch.Tensor,
    rater_mask: torch.Tensor | None,
    signal_variance: torch.Tensor,
    noise_variance: torch.Tensor | None = None,
) -> torch.Tensor:
    """E[x_0 | x_t, raters] when x_0 was one of an image's raters, picked uniformly.

    Args:
        x_t: B x 1 x H x W noisy targets (``α x_0 + σ ε``, x_0 in [-1, 1]).
        raters: B x R x H x W rater masks in {0, 1} (padded raters allowed).
        rater_mask: B x R, True for real raters (None: all R are real).
        signal_variance: (B,) α² of each row (ᾱ_t, γ(t) in continuous time, (1 - t)² for rectified flow).
        noise_variance: (B,) σ² of each row; None: ``1 - signal_variance`` (variance preserving). Rectified
            flow passes t² (see :func:`~ambiseg_monai.diffusion.protocols.interpolation_variances`).

    Returns:
        B x 1 x H x W float32 target in [-1, 1].
    """
    batch = x_t.shape[0]
    gamma = signal_variance.reshape(batch, 1).double()
    variance = 1.0 - gamma if noise_variance is None else noise_variance.reshape(batch, 1).double().to(gamma.device)
    masks = 2.0 * raters.reshape(batch, raters.shape[1], -1).double() - 1.0
    present = (
        torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device) if rater_mask is None else rater_mask.bool()
    )
    if not bool(present.any(dim=1).all()):
        raise ValueError("rater_posterior_target: an image has no rater (its rater_mask row is all False).")
    log_weights = torch.zeros(present.shape, dtype=torch.float64, device=masks.device).masked_fill(
        ~present, float("-inf")
    )
    # float64: at small t, α <x_t, m_k> / σ² reaches 1e6 and the softmax must still pick the right rater
    target = mixture_posterior_mean(x_t.reshape(batch, -1).double(), masks, log_weights, gamma.sqrt(), variance)
    return target.reshape(x_t.shape).float()
