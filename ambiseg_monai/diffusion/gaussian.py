"""Closed-form quantities of a discrete Gaussian diffusion chain (Ho et al. 2020, Nichol & Dhariwal 2021).

Everything here is derived from one 1-D sequence ``alphas_cumprod`` (ᾱ at each timestep of the
chain, in increasing time order). The same code serves the full training chain (all T steps) and a
respaced sampling chain (a subsequence of the training timesteps): Improved DDPM's respacing keeps
ᾱ at the kept steps and *recomputes* the betas from consecutive kept ᾱ, ``β'_i = 1 - ᾱ_i / ᾱ_{i-1}``,
which is exactly what building a :class:`GaussianChain` on the kept ᾱ does.
"""

from __future__ import annotations

import math

import torch

__all__ = ["GaussianChain", "normal_kl", "discretized_gaussian_log_likelihood", "mean_over_pixels"]


class GaussianChain:
    """Per-step coefficients of ``q(x_{i-1} | x_i, x_0)`` for a chain given by its ᾱ sequence.

    Args:
        alphas_cumprod: 1-D tensor, ᾱ of each step in increasing time order (step 0 first). Kept in
            float64 because the posterior variance at small t is a difference of numbers close to 1.

    Attributes (1-D float64 tensors, one value per step):
        betas: ``β_i = 1 - ᾱ_i / ᾱ_{i-1}`` with ᾱ_{-1} = 1.
        alphas_cumprod_prev: ᾱ_{i-1} (1 for the first step).
        posterior_variance: ``β̃_i = β_i (1 - ᾱ_{i-1}) / (1 - ᾱ_i)`` (0 at the first step).
        posterior_log_variance_clipped: ``log β̃_i`` with the first step's 0 replaced by ``β̃_1``
            (Improved DDPM's choice, so the log stays finite; also the lower end of "learned range").
        posterior_mean_coef_x0, posterior_mean_coef_xt: ``μ̃_i = c0 x_0 + ct x_i``.
        log_betas: ``log β_i`` (the upper end of "learned range").
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if abar.numel() < 1 or not bool(((abar > 0) & (abar <= 1)).all()):
            raise ValueError("alphas_cumprod must be a non-empty sequence of values in (0, 1].")
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.betas = 1.0 - abar / self.alphas_cumprod_prev
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - abar)
        first_nonzero = self.posterior_variance[1] if abar.numel() > 1 else self.betas[0]
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([first_nonzero.reshape(1), self.posterior_variance[1:]])
        )
        self.posterior_mean_coef_x0 = self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef_xt = (1.0 - self.alphas_cumprod_prev) * (1.0 - self.betas).sqrt() / (1.0 - abar)
        self.log_betas = self.betas.log()

    def __len__(self) -> int:
        return self.alphas_cumprod.numel()

    @staticmethod
    def gather(values: torch.Tensor, index: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``values[index]`` in ``like``'s dtype, shaped to broadcast against ``like``.

        Args:
            values: 1-D per-step tensor (on the CPU).
            index: a step index (sampling: one step for the whole batch), or a (B,) tensor of step
                indices (training: one per batch row).
            like: B x C x H x W tensor the result is combined with.

        Returns:
            for an int index a 0-dim CPU tensor: PyTorch passes it to a CUDA kernel as a scalar
            argument, so a sampling step copies nothing to the device; for a tensor index a
            B x 1 x ... x 1 tensor on ``index``'s device.
        """
        if not isinstance(index, torch.Tensor) or (index.ndim == 0 and index.device.type == "cpu"):
            return values[int(index)].to(dtype=like.dtype)
        out = values.to(device=index.device)[index.long()].to(dtype=like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def posterior_mean(self, x0: torch.Tensor, xt: torch.Tensor, index: torch.Tensor | int) -> torch.Tensor:
        """Mean of ``q(x_{i-1} | x_i, x_0)``; same shape as ``x0``."""
        return (
            self.gather(self.posterior_mean_coef_x0, index, x0) * x0
            + self.gather(self.posterior_mean_coef_xt, index, xt) * xt
        )

    def coefficients(self, index: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, σ) = (sqrt(ᾱ), sqrt(1 - ᾱ)) at step(s) ``index``, in ``like``'s dtype, as :meth:`gather` shapes them.

        The pair a :class:`~ambiseg_monai.diffusion.parameterization.DiffusionParameterization` converts
        the network output with (``x_t = α x_0 + σ ε``).
        """
        abar = self.gather(self.alphas_cumprod, index, like)
        return abar.sqrt(), (1.0 - abar).sqrt()

    def learned_range_log_variance(self, values: torch.Tensor, index: torch.Tensor | int) -> torch.Tensor:
        """Improved DDPM's "learned range": ``v`` in [-1, 1] interpolates *log* variances.

        ``log σ² = f log β_i + (1 - f) log β̃_i`` with ``f = (v + 1) / 2``; both ends come from this
        chain, so a respaced chain uses its own (respaced) β and β̃.
        """
        min_log = self.gather(self.posterior_log_variance_clipped, index, values)
        max_log = self.gather(self.log_betas, index, values)
        frac = (values + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log


def mean_over_pixels(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one: B x ... -> B."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Element-wise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # the tanh approximation used by Improved DDPM, so our VLB matches the official numbers
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood (nats, element-wise) of data in [-1, 1] quantised to 256 bins under a Gaussian.

    Improved DDPM's decoder term ``L_0 = -log p(x_0 | x_1)``; the outermost bins extend to ±inf.

    Args:
        x: target values in [-1, 1].
        means, log_scales: Gaussian mean and log standard deviation, broadcastable to ``x``.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )
