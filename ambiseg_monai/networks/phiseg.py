"""PHiSeg (Baumgartner et al. 2019): hierarchical spatial latents for binary segmentation.

Levels: ``resolution_levels`` encoder resolutions (paper: 7; level ``k`` has size ``H / 2^k``) of which the
``latent_levels`` coarsest carry a spatial Gaussian latent (paper: 5). Latent level ``l`` (0 = finest latent)
lives at resolution level ``k = l + resolution_levels - latent_levels``.

* Prior ``p(z_l | z_{l+1}, x)`` and posterior ``q(z_l | z_{l+1}, x, y)``: the same hierarchical encoder
  (:class:`HierarchicalLatentEncoder`) on the image, resp. image + mask. The coarsest latent depends on the
  encoder features only; each finer one also on the upsampled latent below it. During training the prior is
  conditioned on the *posterior's* samples (so each level's KL compares like with like), as in the authors'
  code; when sampling it is conditioned on its own.
* Likelihood (:class:`HierarchicalLikelihood`): each latent is decoded, brought up to resolution level ``l``,
  merged bottom-up, and turned into a logit map per level; level maps are upsampled to ``H x W`` and summed
  from the coarsest level down (residual formulation), so level 0's map is the prediction and every level has
  its own reconstruction loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn
from torch.distributions import Distribution

from ambiseg_monai.networks.latent_distributions import (
    AxisAlignedGaussian,
    latent_kl_divergence,
    sample_with_generators,
)
from ambiseg_monai.networks.prob_unet import LatentSegmentationNetwork, check_binary_target

__all__ = ["HierarchicalLatentEncoder", "HierarchicalLikelihood", "PHiSeg"]


def _conv_block(in_channels: int, out_channels: int, depth: int, norm: str | tuple) -> nn.Sequential:
    """``depth`` 3x3 MONAI convolutions with normalisation and ReLU."""
    layers = [
        Convolution(2, in_channels if i == 0 else out_channels, out_channels, kernel_size=3, act="relu", norm=norm)
        for i in range(depth)
    ]
    return nn.Sequential(*layers)


def _upsample(x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
    """Bilinear upsampling by 2 (or to ``size``)."""
    if size is None:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class HierarchicalLatentEncoder(nn.Module):
    """PHiSeg prior/posterior net: a down path plus a coarse-to-fine chain of spatial Gaussian latents.

    Args:
        in_channels: input channels (image, plus 1 for the mask in the posterior).
        channels: channels per resolution level (``len == resolution_levels``).
        latent_levels: number of latent levels (the coarsest resolution levels).
        latent_dim: channels of each spatial latent (paper: 2).
        convs_per_level: 3x3 convolutions per resolution level of the down path (paper: 3).
        norm: MONAI normalisation (paper: batch norm).
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        latent_levels: int,
        latent_dim: int,
        convs_per_level: int = 3,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        self.channels = tuple(channels)
        self.latent_levels = latent_levels
        self.offset = len(self.channels) - latent_levels
        self.latent_distribution = AxisAlignedGaussian(latent_dim)
        self.down = nn.ModuleList(
            _conv_block(in_channels if k == 0 else self.channels[k - 1], width, convs_per_level, norm)
            for k, width in enumerate(self.channels)
        )
        # Width of the upsampled latent fed to the level above, as in the authors' code (n0 * zdim).
        up_width = self.channels[0] * latent_dim
        self.latent_up = nn.ModuleList(_conv_block(latent_dim, up_width, 2, norm) for _ in range(latent_levels - 1))
        self.merge = nn.ModuleList(
            _conv_block(self.channels[level + self.offset] + up_width, self.channels[level + self.offset], 2, norm)
            for level in range(latent_levels - 1)
        )
        self.heads = nn.ModuleList(
            Convolution(
                2, self.channels[level + self.offset], self.latent_distribution.num_parameters, 1, conv_only=True
            )
            for level in range(latent_levels)
        )

    def forward(
        self,
        x: torch.Tensor,
        override_samples: Sequence[torch.Tensor] | None = None,
        num_samples: int = 1,
        generators: Sequence[torch.Generator] | None = None,
    ) -> tuple[list[Distribution], list[torch.Tensor]]:
        """Encode ``x`` and walk the latent chain from the coarsest level to the finest.

        Args:
            x: ``B x C_in x H x W``.
            override_samples: latents to condition each finer level on instead of this encoder's own samples
                (training prior: the posterior's samples); list indexed by latent level, ``B x D x h_l x w_l``.
            num_samples: independent latent chains per image (``N``); the down path runs once per image.
            generators: optional ``B * N`` CPU generators (image-major) drawing each chain's noise, coarse level
                first; ``None``: reparameterised samples from the global RNG (training).

        Returns:
            ``(distributions, samples)``, both lists indexed by latent level (0 = finest). Distribution ``l`` has
            ``batch_shape == (B * N,)`` and ``event_shape == (D, h_l, w_l)``; rows are image-major
            (row ``b * N + n``). ``samples`` is empty when ``override_samples`` is given.
        """
        if override_samples is not None and (num_samples != 1 or len(override_samples) != self.latent_levels):
            raise ValueError(
                f"HierarchicalLatentEncoder: override_samples needs one tensor per latent level "
                f"({self.latent_levels}) and num_samples=1, got {len(override_samples)} and {num_samples}."
            )
        features = []
        h = x
        for k, block in enumerate(self.down):
            h = block(h if k == 0 else F.avg_pool2d(h, 2))
            features.append(h)
        distributions: list[Distribution | None] = [None] * self.latent_levels
        samples: list[torch.Tensor | None] = [None] * self.latent_levels
        for level in reversed(range(self.latent_levels)):
            level_features = features[level + self.offset]
            if num_samples > 1:
                level_features = level_features.repeat_interleave(num_samples, dim=0)
            if level < self.latent_levels - 1:
                below = override_samples[level + 1] if override_samples is not None else samples[level + 1]
                if below is None:
                    raise RuntimeError(f"latent level {level + 1} has no sample")  # the coarser level sets it
                up = self.latent_up[level](_upsample(below))
                level_features = self.merge[level](torch.cat([level_features, up], dim=1))
            distribution = self.latent_distribution(self.heads[level](level_features))
            distributions[level] = distribution
            if override_samples is None:
                samples[level] = (
                    distribution.rsample() if generators is None else sample_with_generators(distribution, generators)
                )
        # every level is filled by the loop above
        filled_distributions = cast(list[Distribution], distributions)
        return filled_distributions, [] if override_samples is not None else cast(list[torch.Tensor], samples)


class HierarchicalLikelihood(nn.Module):
    """PHiSeg likelihood net: spatial latents -> residual logit maps, one per latent level.

    Args:
        channels: channels per resolution level (``len == resolution_levels``).
        latent_levels: number of latent levels.
        latent_dim: channels of each spatial latent.
        norm: MONAI normalisation.
    """

    def __init__(self, channels: Sequence[int], latent_levels: int, latent_dim: int, norm: str | tuple = "batch"):
        super().__init__()
        self.channels = tuple(channels)
        self.latent_levels = latent_levels
        self.offset = len(self.channels) - latent_levels
        post_sample = []
        for level in range(latent_levels):
            k = level + self.offset
            steps: list[nn.Module] = [_conv_block(latent_dim, self.channels[k], 2, norm)]
            # Bring latent level `level` from resolution level k up to resolution level `level` (offset doublings).
            for step in range(self.offset):
                steps += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
                steps += [
                    _conv_block(self.channels[k] if step == 0 else self.channels[level], self.channels[level], 1, norm)
                ]
            post_sample.append(nn.Sequential(*steps))
        self.post_sample = nn.ModuleList(post_sample)
        self.post_concat = nn.ModuleList(
            _conv_block(self.channels[level] + self.channels[level + 1], self.channels[level], 2, norm)
            for level in range(latent_levels - 1)
        )
        self.heads = nn.ModuleList(
            Convolution(2, self.channels[level], 1, kernel_size=1, conv_only=True) for level in range(latent_levels)
        )

    def forward(self, samples: Sequence[torch.Tensor], output_size: Sequence[int]) -> torch.Tensor:
        """Decode the latents.

        Args:
            samples: per latent level (0 = finest) ``B x D x h_l x w_l``.
            output_size: ``(H, W)`` of the image.

        Returns:
            ``B x L x H x W`` logits; channel ``l`` is the prediction using latent levels ``l .. L-1``
            (channel 0: the model's prediction).
        """
        decoded = [self.post_sample[level](z) for level, z in enumerate(samples)]
        merged = decoded[-1]
        level_logits = [self.heads[-1](merged)]
        for level in reversed(range(self.latent_levels - 1)):
            merged = self.post_concat[level](torch.cat([decoded[level], _upsample(merged)], dim=1))
            level_logits.insert(0, self.heads[level](merged))
        size = tuple(output_size)
        full = torch.cat([s if tuple(s.shape[2:]) == size else _upsample(s, size) for s in level_logits], dim=1)
        # Residual formulation: each level refines the sum of the coarser ones.
        return full.flip(1).cumsum(1).flip(1)


class PHiSeg(LatentSegmentationNetwork):
    """PHiSeg for binary masks.

    Args:
        in_channels: image channels (1 for CT, 4 for multi-sequence MS MRI).
        channels: channels per resolution level; its length is the number of resolution levels
            (paper: ``(32, 64, 128, 192, 192, 192, 192)``, 7 levels).
        latent_levels: number of latent levels (paper: 5), at most ``len(channels)``.
        latent_dim: channels of each spatial latent (paper: 2).
        convs_per_level: 3x3 convolutions per level of the encoders' down paths (paper: 3).
        norm: MONAI normalisation (paper: batch norm).

    Image height and width must be divisible by ``2 ** (len(channels) - 1)``.
    """

    level_name = "resolution levels"

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 192, 192, 192, 192),
        latent_levels: int = 5,
        latent_dim: int = 2,
        convs_per_level: int = 3,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        if not 1 <= latent_levels <= len(channels):
            raise ValueError(
                f"PHiSeg: latent_levels must be in 1..{len(channels)} (the resolution levels), got {latent_levels}."
            )
        self.in_channels = int(in_channels)
        self.channels = tuple(int(c) for c in channels)
        self.latent_levels = int(latent_levels)
        self.size_divisor = 2 ** (len(self.channels) - 1)
        self.prior = HierarchicalLatentEncoder(
            self.in_channels, self.channels, latent_levels, latent_dim, convs_per_level, norm
        )
        self.posterior = HierarchicalLatentEncoder(
            self.in_channels + 1, self.channels, latent_levels, latent_dim, convs_per_level, norm
        )
        self.likelihood = HierarchicalLikelihood(self.channels, latent_levels, latent_dim, norm)

    def forward(self, image: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training pass with posterior samples.

        Args:
            image: ``B x C x H x W``.
            target: ``B x 1 x H x W`` binary training mask (one rater).

        Returns:
            ``{"logits": B x 1 x H x W, "level_logits": B x L x H x W, "kl": B x L}``: the prediction, the
            residual prediction of every latent level (channel 0 == ``logits``), and the analytic
            KL(q(z_l | .) || p(z_l | .)) per image and level (summed over latent channels and pixels).
        """
        self._check_image(image)
        target = check_binary_target("PHiSeg", image, target)
        posteriors, z = self.posterior(torch.cat([image, target - 0.5], dim=1))
        priors, _ = self.prior(image, override_samples=z)
        kl = torch.stack([latent_kl_divergence(q, p) for q, p in zip(posteriors, priors, strict=True)], dim=1)
        level_logits = self.likelihood(z, image.shape[2:])
        return {"logits": level_logits[:, :1], "level_logits": level_logits, "kl": kl}

    def _sample(
        self, image: torch.Tensor, num_samples: int, generators: Sequence[torch.Generator] | None
    ) -> torch.Tensor:
        """Latent hierarchies from the prior (each level conditioned on the prior's own coarser samples)."""
        _, z = self.prior(image, num_samples=num_samples, generators=generators)  # rows image-major: b * N + n
        logits = self.likelihood(z, image.shape[2:])[:, 0]
        return logits.reshape(image.shape[0], num_samples, *image.shape[2:])
