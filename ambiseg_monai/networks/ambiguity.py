"""CIMD's Ambiguity Modelling / Controlling Networks: axis-aligned Gaussian encoders.

AMN (the posterior, Q) sees ``concat(image, ground-truth mask)``; ACN (the prior, P) sees
``concat(image, the denoiser's prediction)``. Both (CIMD supplement B): four blocks of 3x3 conv +
ReLU with 32, 64, 128, 192 filters and 2x2 average pooling between blocks, global average pooling,
then a 1x1 conv to the mean and log-variance of a diagonal Gaussian. ``L_amb = KL(Q || P)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

__all__ = ["AxisAlignedGaussianEncoder", "ambiguity_kl"]


class AxisAlignedGaussianEncoder(nn.Module):
    """Image(+mask) -> ``Independent(Normal(μ, σ), 1)`` over a ``latent_dim``-dimensional latent.

    Args:
        in_channels: input channels (image channels + mask channels).
        latent_dim: latent size (6 in the official CIMD code).
        channels: filters of the conv blocks.
        spatial_dims: 2 (3 for volumes).
    """

    def __init__(
        self, in_channels: int, latent_dim: int = 6, channels: Sequence[int] = (32, 64, 128, 192), spatial_dims: int = 2
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pool = nn.AvgPool2d if spatial_dims == 2 else nn.AvgPool3d
        layers: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(channels):
            if i > 0:
                layers.append(pool(kernel_size=2, stride=2))
            layers += [conv(previous, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            previous = width
        self.in_channels = int(in_channels)
        self.latent_dim = int(latent_dim)
        self.features = nn.Sequential(*layers)
        self.head = conv(previous, 2 * latent_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> Independent:
        """x: B x in_channels x H x W -> a batch (B,) of latent_dim-dimensional diagonal Gaussians."""
        if x.shape[1] != self.in_channels:
            raise ValueError(f"the ambiguity encoder expects {self.in_channels} input channels, got {x.shape[1]}.")
        h = self.features(x)
        h = h.mean(dim=tuple(range(2, h.ndim)), keepdim=True)  # global average pooling
        mu, log_var = self.head(h).flatten(1).float().chunk(2, dim=1)
        return Independent(Normal(mu, torch.exp(0.5 * log_var)), 1)


def ambiguity_kl(
    amn: AxisAlignedGaussianEncoder,
    acn: AxisAlignedGaussianEncoder,
    image: torch.Tensor,
    target: torch.Tensor,
    prediction: torch.Tensor,
) -> torch.Tensor:
    """``L_amb = KL(AMN(image ⊕ target) || ACN(image ⊕ prediction))`` per batch row, shape (B,)."""
    posterior = amn(torch.cat([image, target.to(image.dtype)], dim=1))
    prior = acn(torch.cat([image, prediction.to(image.dtype)], dim=1))
    return kl_divergence(posterior, prior)
