"""Probabilistic U-Net (Kohl et al. 2018) and its generalised latent families (Bhat et al. 2022).

A deterministic U-Net (``monai.networks.nets.UNet``) computes features of the last decoder level; a prior net
(image) and a posterior net (image + mask) map their input to a latent distribution (see
:mod:`ambiseg_monai.networks.latent_distributions`); a latent vector ``z`` is tiled over ``H x W``,
concatenated to the features and passed through 1x1 convolutions to the mask logit.

* Training (``forward(image, target)``): ``z`` from the posterior, plus KL(posterior || prior).
* Sampling (``sample(image, num_samples)``): ``z`` from the prior; the U-Net and the prior run once per image
  and only the cheap 1x1 combiner runs per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import UNet
from torch import nn
from torch.distributions import Distribution

from ambiseg_monai.networks.latent_distributions import (
    AxisAlignedGaussian,
    LatentFamily,
    latent_kl_divergence,
    sample_with_generators,
)

__all__ = ["LatentEncoder", "LatentSegmentationNetwork", "ProbabilisticUNet", "check_binary_target"]


def check_binary_target(owner: str, image: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Validate a training mask: ``B x 1 x H x W`` with values in {0, 1}, matching ``image``'s batch and size.

    Returns the target as ``image``'s dtype.
    """
    if target is None:
        raise ValueError(
            f"{owner}.forward needs the training mask `target` (B x 1 x H x W); for sampling use "
            f"{owner}.sample(image, num_samples) or LatentSampleInferer."
        )
    expected = (image.shape[0], 1, *image.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"{owner}: target must have shape {expected} (B x 1 x H x W), got {tuple(target.shape)}.")
    if not bool(((target == 0) | (target == 1)).all()):
        raise ValueError(f"{owner}: target must be a binary mask with values in {{0, 1}}.")
    return target.to(image.dtype)


class LatentEncoder(nn.Module):
    """Convolutional encoder + global average pooling + 1x1 head producing latent-distribution parameters.

    The prior and posterior nets of the Probabilistic U-Net: the encoder mirrors the U-Net's down path
    (one MONAI ``ResidualUnit`` per level, stride 2 from the second level on).

    Args:
        spatial_dims: 2 for images.
        in_channels: input channels (image channels, plus 1 for the mask in the posterior).
        channels: channels per level, e.g. ``(32, 64, 128, 192)``.
        latent_distribution: family turning the ``B x P`` head output into a distribution.
        num_res_units: convolutions per residual unit (at least 1).
        norm: MONAI normalisation name or ``(name, args)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        latent_distribution: LatentFamily,
        num_res_units: int = 2,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        self.latent_distribution = latent_distribution
        levels = []
        previous = in_channels
        for level, width in enumerate(channels):
            levels.append(
                ResidualUnit(
                    spatial_dims,
                    previous,
                    width,
                    strides=1 if level == 0 else 2,
                    subunits=max(1, num_res_units),
                    act="relu",
                    norm=norm,
                )
            )
            previous = width
        self.encoder = nn.Sequential(*levels)
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.head = Convolution(
            spatial_dims, previous, latent_distribution.num_parameters, kernel_size=1, conv_only=True
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``B x C_in x H x W`` -> ``B x P`` raw distribution parameters."""
        return self.head(self.pool(self.encoder(x))).flatten(start_dim=1)

    def forward(self, x: torch.Tensor) -> Distribution:
        """``B x C_in x H x W`` -> distribution with ``batch_shape == (B,)`` and ``event_shape == (D,)``."""
        return self.latent_distribution(self.encode(x))


def decoder_features_unet(in_channels: int, channels: tuple[int, ...], num_res_units: int, norm: str | tuple) -> UNet:
    """MONAI's 2D ``UNet`` with ``out_channels = channels[0]``: it ends in a plain convolution, so its output
    is the last decoder features (pre-activation), ``B x channels[0] x H x W``, for a method's own head."""
    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=channels[0],
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=num_res_units,
        norm=norm,
    )


class LatentSegmentationNetwork(nn.Module):
    """Base of the latent-variable segmentation networks (:class:`ProbabilisticUNet`, PHiSeg): the image check
    and the sampling entry point they share. It holds no parameters (subclasses' state_dict keys are their own).

    Subclasses set ``in_channels``, ``channels`` (one entry per resolution level) and ``size_divisor``
    (``2 ** (len(channels) - 1)``), and implement :meth:`_sample`; ``level_name`` words the size error.
    """

    in_channels: int
    channels: tuple[int, ...]
    size_divisor: int
    level_name = "levels"

    def _check_image(self, image: torch.Tensor) -> None:
        """``image`` must be ``B x in_channels x H x W`` with ``H`` and ``W`` divisible by ``size_divisor``."""
        owner = type(self).__name__
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"{owner} expects images of shape B x {self.in_channels} x H x W, got {tuple(image.shape)}."
            )
        if image.shape[2] % self.size_divisor or image.shape[3] % self.size_divisor:
            raise ValueError(
                f"{owner} with {len(self.channels)} {self.level_name} needs H and W divisible by "
                f"{self.size_divisor}, got {tuple(image.shape[2:])}."
            )

    def sample(
        self, image: torch.Tensor, num_samples: int, generators: Sequence[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Draw ``num_samples`` latents per image from the prior and decode them.

        Args:
            image: ``B x C x H x W``.
            num_samples: ``N``.
            generators: optional ``B * N`` CPU generators, image-major (row ``b * N + n``); sample ``(b, n)``
                then depends only on its own generator, not on the batch. ``None``: the global RNG.

        Returns:
            ``B x N x H x W`` logits (foreground where ``> 0``).
        """
        self._check_image(image)
        if num_samples < 1:
            raise ValueError(f"{type(self).__name__}.sample: num_samples must be >= 1, got {num_samples}.")
        return self._sample(image, num_samples, generators)

    def _sample(
        self, image: torch.Tensor, num_samples: int, generators: Sequence[torch.Generator] | None
    ) -> torch.Tensor:
        """:meth:`sample` after its checks: ``B x C x H x W`` -> ``B x N x H x W`` logits."""
        raise NotImplementedError


class ProbabilisticUNet(LatentSegmentationNetwork):
    """Probabilistic U-Net for binary masks, with a pluggable latent family.

    Args:
        in_channels: image channels (1 for CT, 4 for multi-sequence MS MRI).
        channels: U-Net and prior/posterior encoder channels per level (paper: ``(32, 64, 128, 192)``).
        latent_distribution: latent family shared by prior and posterior; default
            ``AxisAlignedGaussian(latent_dim=6)`` (the paper's). Overlays swap in
            ``MixtureOfAxisAlignedGaussians``, ``FullCovarianceGaussian``, ``MixtureOfFullCovarianceGaussians``.
        num_res_units: residual units per U-Net level / convolutions per encoder unit.
        num_combiner_convs: 1x1 convolutions after concatenating ``z`` (paper: 3).
        norm: MONAI normalisation for the U-Net and encoders.
        kl_samples: posterior samples for the Monte Carlo KL, used only when no analytic KL exists.

    Image height and width must be divisible by ``2 ** (len(channels) - 1)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 192),
        latent_distribution: LatentFamily | None = None,
        num_res_units: int = 2,
        num_combiner_convs: int = 3,
        norm: str | tuple = "batch",
        kl_samples: int = 16,
    ) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"ProbabilisticUNet: channels needs at least 2 levels, got {tuple(channels)}.")
        if num_combiner_convs < 1:
            raise ValueError(f"ProbabilisticUNet: num_combiner_convs must be >= 1, got {num_combiner_convs}.")
        self.in_channels = int(in_channels)
        self.channels = tuple(int(c) for c in channels)
        self.latent_distribution = latent_distribution or AxisAlignedGaussian(latent_dim=6)
        self.kl_samples = int(kl_samples)
        self.size_divisor = 2 ** (len(self.channels) - 1)

        features = self.channels[0]
        self.unet = decoder_features_unet(self.in_channels, self.channels, num_res_units, norm)  # mixed with z
        self.prior = LatentEncoder(2, self.in_channels, self.channels, self.latent_distribution, num_res_units, norm)
        self.posterior = LatentEncoder(
            2, self.in_channels + 1, self.channels, self.latent_distribution, num_res_units, norm
        )
        latent_dim = self.latent_distribution.latent_dim
        combiner: list[nn.Module] = []
        width = features + latent_dim
        for _ in range(num_combiner_convs - 1):
            combiner.append(Convolution(2, width, features, kernel_size=1, act="relu", norm=None))
            width = features
        combiner.append(Convolution(2, width, 1, kernel_size=1, conv_only=True))
        self.combiner = nn.Sequential(*combiner)

    def combine(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Tile ``z`` (``B x D``) over the ``B x F x H x W`` features and map to ``B x 1 x H x W`` logits."""
        tiled = z[:, :, None, None].expand(-1, -1, *features.shape[2:])
        return self.combiner(torch.cat([features, tiled], dim=1))

    def forward(self, image: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training pass with a posterior sample.

        Args:
            image: ``B x C x H x W``.
            target: ``B x 1 x H x W`` binary training mask (one rater).

        Returns:
            ``{"logits": B x 1 x H x W, "kl": B}`` (KL(posterior || prior) per image).
        """
        self._check_image(image)
        target = check_binary_target("ProbabilisticUNet", image, target)
        features = self.unet(image)
        prior = self.prior(image)
        # Centre the mask so that "no foreground" is not an all-zero (uninformative) input channel.
        posterior = self.posterior(torch.cat([image, target - 0.5], dim=1))
        z = posterior.rsample()
        kl = latent_kl_divergence(posterior, prior, num_samples=self.kl_samples)
        return {"logits": self.combine(features, z), "kl": kl}

    def _sample(
        self, image: torch.Tensor, num_samples: int, generators: Sequence[torch.Generator] | None
    ) -> torch.Tensor:
        """Latent vectors from the prior: the U-Net and the prior run once per image, the combiner per sample."""
        batch = image.shape[0]
        features = self.unet(image)  # once per image, shared by its N samples
        prior_params = self.prior.encode(image)  # once per image
        prior = self.latent_distribution(prior_params.repeat_interleave(num_samples, dim=0))  # rows b * N + n
        z = prior.sample() if generators is None else sample_with_generators(prior, generators)
        logits = self.combine(features.repeat_interleave(num_samples, dim=0), z)
        return logits.reshape(batch, num_samples, *image.shape[2:])
