"""Stochastic Segmentation Networks (Monteiro et al., NeurIPS 2020): a low-rank Gaussian over the logit map.

A deterministic U-Net (``monai.networks.nets.UNet``) computes features of the last decoder level; 1x1
convolutions map them to the three parameters of a multivariate normal over the **whole** logit map
``eta`` (``K = C x H x W`` values, flattened channel-major):

* the mean ``mu`` (``C`` channels);
* the log of the diagonal covariance ``log D`` (``C`` channels); ``D = exp(log D) + epsilon``;
* a low-rank factor ``P`` (``C x rank`` channels), so that ``Sigma = P P^T + diag(D)``:
  ``torch.distributions.LowRankMultivariateNormal(loc=mu, cov_factor=P, cov_diag=D)``.

A sample of ``eta`` is a whole logit map whose pixels are correlated through ``P``; a mask follows by a
pixel-wise argmax (``C = 2``, the authors' code) or threshold at 0 (``C = 1``). Every sample of an image
comes from one network pass: the backbone runs once and the ``N`` logit maps are ``mu + P e_W + sqrt(D) e_D``
with standard-normal ``e_W`` (``rank``) and ``e_D`` (``K``).

Binary masks and the class count. The authors' code models LIDC with two classes (background and
foreground logits, softmax). Only the difference of the two logits enters the softmax, and the difference
of two low-rank-plus-diagonal Gaussians of rank ``R`` is again one of rank ``R``; so ``num_classes=1``
(one foreground logit, sigmoid) is the same family with half the head parameters. Both are offered;
:meth:`StochasticSegmentationNetwork.sample` returns, for either, the foreground logit (``eta_1 - eta_0``
for two classes) so that ``> 0`` is the argmax.

* Training (``forward(image)``): the distribution's parameters, for
  :class:`~ambiseg_monai.losses.ssn.StochasticSegmentationLoss` (the Monte Carlo log-likelihood).
* Sampling (``sample(image, num_samples, generators)``): ``B x N x H x W`` foreground logits, the
  interface of :class:`~ambiseg_monai.inferers.latent.LatentSampleInferer`, export and deploy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.distributions import Distribution, Independent, LowRankMultivariateNormal, Normal

from ambiseg_monai.networks.prob_unet import LatentSegmentationNetwork, decoder_features_unet

__all__ = [
    "COVARIANCE_EPSILON",
    "StochasticSegmentationNetwork",
    "foreground_logits",
    "logit_distribution",
    "sample_logit_maps",
]

#: added to ``exp(log D)``, as in both of the authors' implementations (BraTS and LIDC)
COVARIANCE_EPSILON = 1e-5


def logit_distribution(
    loc: torch.Tensor, cov_factor: torch.Tensor | None, cov_diag: torch.Tensor, validate_args: bool = False
) -> Distribution:
    """The distribution over flattened logit maps.

    Args:
        loc: ``B x K`` mean.
        cov_factor: ``B x K x R`` low-rank factor, or ``None`` for the diagonal model (independent normals,
            the paper's rank-0 ablation).
        cov_diag: ``B x K`` diagonal of the covariance (positive).
        validate_args: check the parameters' constraints (off by default: the check costs a pass over
            ``K`` values and the loss reports non-finite values itself).

    Returns:
        ``LowRankMultivariateNormal(loc, cov_factor, cov_diag)``, or ``Independent(Normal(loc, sqrt(cov_diag)), 1)``
        without a factor; ``batch_shape == (B,)``, ``event_shape == (K,)``.
    """
    if cov_factor is None:
        return Independent(Normal(loc, cov_diag.sqrt(), validate_args=validate_args), 1, validate_args=validate_args)
    return LowRankMultivariateNormal(loc, cov_factor, cov_diag, validate_args=validate_args)


def sample_logit_maps(
    loc: torch.Tensor,
    cov_factor: torch.Tensor | None,
    cov_diag: torch.Tensor,
    num_samples: int,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """``num_samples`` reparameterised draws per batch row: ``loc + cov_factor e_W + sqrt(cov_diag) e_D``.

    The formula of ``LowRankMultivariateNormal.rsample`` (gradients flow to all three parameters), with
    the standard normals ``e_W`` (``R``) and ``e_D`` (``K``) drawn either from the global RNG or, row by row,
    from ``generators`` so that draw ``(b, n)`` depends only on its own generator.

    Args:
        loc: ``B x K``; cov_factor: ``B x K x R`` or ``None`` (diagonal); cov_diag: ``B x K`` (>= 0; zero
            factor and diagonal give ``loc`` itself).
        num_samples: ``N``.
        generators: ``B * N`` CPU generators, image-major (row ``b * N + n``); each gives, in order, ``e_W``
            then ``e_D`` (in float64, cast to ``loc``'s dtype). ``None``: the global RNG.

    Returns:
        ``B x N x K`` samples.
    """
    if num_samples < 1:
        raise ValueError(f"sample_logit_maps: num_samples must be >= 1, got {num_samples}.")
    batch, size = loc.shape
    rank = 0 if cov_factor is None else cov_factor.shape[-1]
    shape = (batch, num_samples)
    if generators is None:
        noise_w = torch.randn((*shape, rank), dtype=loc.dtype, device=loc.device)
        noise_d = torch.randn((*shape, size), dtype=loc.dtype, device=loc.device)
    else:
        if len(generators) != batch * num_samples:
            raise ValueError(
                f"sample_logit_maps: need one generator per (image, sample), {batch * num_samples}, "
                f"got {len(generators)}."
            )
        draws = [
            (torch.randn(rank, generator=g, dtype=torch.float64), torch.randn(size, generator=g, dtype=torch.float64))
            for g in generators
        ]
        noise_w = torch.stack([w for w, _ in draws]).reshape(*shape, rank).to(loc)
        noise_d = torch.stack([d for _, d in draws]).reshape(*shape, size).to(loc)
    samples = loc[:, None] + cov_diag.sqrt()[:, None] * noise_d
    if cov_factor is not None:
        samples = samples + torch.einsum("bkr,bnr->bnk", cov_factor, noise_w)
    return samples


def foreground_logits(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``... x C x H x W`` logit maps -> ``... x H x W`` foreground logits (foreground where ``> 0``).

    ``C = 1``: the logit itself; ``C = 2``: ``eta_1 - eta_0`` (``> 0`` exactly where class 1 wins the argmax).
    """
    if num_classes == 1:
        return logits[..., 0, :, :]
    return logits[..., 1, :, :] - logits[..., 0, :, :]


class StochasticSegmentationNetwork(LatentSegmentationNetwork):
    """Stochastic Segmentation Network for binary masks: U-Net features -> low-rank Gaussian over logit maps.

    Args:
        in_channels: image channels (1 for CT, 4 for multi-sequence MS MRI).
        channels: U-Net channels per level (the Prob. U-Net baseline's ``(32, 64, 128, 192)``; the
            authors' LIDC network is a 7-level U-Net ``(32, 64, 128, 192, 192, 192, 192)``).
        num_classes: logit channels: 2 (background and foreground, softmax; the authors' code) or 1 (one
            foreground logit, sigmoid; the same family of distributions with half the head).
        rank: rank of the covariance factor ``P`` (paper: 10); at least 1.
        num_res_units: residual units per U-Net level.
        num_head_convs: 1x1 convolutions (with ``norm`` and ReLU) between the backbone and the three heads
            (the authors' LIDC code: 3); 0 puts the heads right after the ReLU of the backbone's features.
        norm: MONAI normalisation for the U-Net and the head convolutions.
        epsilon: added to ``exp(log D)`` (authors' code: 1e-5).
        diagonal: drop the low-rank factor: independent normals per pixel (the paper's ablation).

    Image height and width must be divisible by ``2 ** (len(channels) - 1)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 192),
        num_classes: int = 2,
        rank: int = 10,
        num_res_units: int = 2,
        num_head_convs: int = 3,
        norm: str | tuple = "batch",
        epsilon: float = COVARIANCE_EPSILON,
        diagonal: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"StochasticSegmentationNetwork: channels needs at least 2 levels, got {tuple(channels)}.")
        if num_classes not in (1, 2):
            raise ValueError(
                "StochasticSegmentationNetwork: num_classes must be 1 (one foreground logit) or 2 (background and "
                f"foreground logits) for binary masks, got {num_classes}."
            )
        if int(rank) < 1:
            raise ValueError(
                f"StochasticSegmentationNetwork: rank must be >= 1 (paper: 10), got {rank}; for independent "
                "per-pixel normals (rank 0) set diagonal=True."
            )
        if num_head_convs < 0:
            raise ValueError(f"StochasticSegmentationNetwork: num_head_convs must be >= 0, got {num_head_convs}.")
        if not epsilon > 0:
            raise ValueError(f"StochasticSegmentationNetwork: epsilon must be > 0, got {epsilon}.")
        self.in_channels = int(in_channels)
        self.channels = tuple(int(c) for c in channels)
        self.num_classes = int(num_classes)
        self.rank = int(rank)
        self.epsilon = float(epsilon)
        self.diagonal = bool(diagonal)
        self.size_divisor = 2 ** (len(self.channels) - 1)

        features = self.channels[0]
        # the last decoder features (pre-activation), activated below as in the authors' code (ReLU before the heads)
        self.unet = decoder_features_unet(self.in_channels, self.channels, num_res_units, norm)
        head: list[nn.Module] = [nn.ReLU()]
        for _ in range(num_head_convs):
            head.append(Convolution(2, features, features, kernel_size=1, act="relu", norm=norm))
        self.head = nn.Sequential(*head)
        self.mean_head = Convolution(2, features, self.num_classes, kernel_size=1, conv_only=True)
        self.log_cov_diag_head = Convolution(2, features, self.num_classes, kernel_size=1, conv_only=True)
        self.cov_factor_head = (
            None
            if self.diagonal
            else Convolution(2, features, self.num_classes * self.rank, kernel_size=1, conv_only=True)
        )

    def distribution_parameters(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """``B x C_in x H x W`` image -> ``{"loc": B x K, "cov_diag": B x K[, "cov_factor": B x K x R]}``.

        ``K = num_classes * H * W``, flattened channel-major (class, row, column). The parameters are float32
        whatever the autocast dtype of the backbone: the distribution's algebra needs the precision.
        """
        features = self.head(self.unet(image)).float()
        batch = image.shape[0]
        params = {
            "loc": self.mean_head(features).float().flatten(1),
            "cov_diag": self.log_cov_diag_head(features).float().flatten(1).exp() + self.epsilon,
        }
        if self.cov_factor_head is not None:
            # channel r * C + c holds class c of factor column r (the authors' layout): B x R x (C*H*W) -> B x K x R
            factor = self.cov_factor_head(features).float().reshape(batch, self.rank, -1)
            params["cov_factor"] = factor.transpose(1, 2)
        return params

    def distribution(self, image: torch.Tensor) -> Distribution:
        """The logit-map distribution of each image (``batch_shape == (B,)``, ``event_shape == (K,)``)."""
        self._check_image(image)
        params = self.distribution_parameters(image)
        return logit_distribution(params["loc"], params.get("cov_factor"), params["cov_diag"])

    def forward(self, image: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training pass: the distribution's parameters (the loss draws its Monte Carlo samples from them).

        Args:
            image: ``B x C x H x W``.
            target: ignored (accepted so that ``LatentTrainingInferer``, which passes the training mask, drives
                this network like the Probabilistic U-Net; an SSN never sees the mask).

        Returns:
            ``{"logits": B x 1 x H x W`` foreground logit of the mean, ``"loc": B x K``, ``"cov_diag": B x K``
            and, unless ``diagonal``, ``"cov_factor": B x K x R}`` with ``K = num_classes * H * W``.
        """
        self._check_image(image)
        params = self.distribution_parameters(image)
        mean_maps = params["loc"].reshape(image.shape[0], self.num_classes, *image.shape[2:])
        return {"logits": foreground_logits(mean_maps, self.num_classes)[:, None], **params}

    def _sample(
        self, image: torch.Tensor, num_samples: int, generators: Sequence[torch.Generator] | None
    ) -> torch.Tensor:
        """One backbone pass, then ``N`` logit maps per image: ``B x N x H x W`` foreground logits."""
        params = self.distribution_parameters(image)
        with torch.autocast(image.device.type, enabled=False):
            logits = sample_logit_maps(
                params["loc"], params.get("cov_factor"), params["cov_diag"], num_samples, generators
            )
        maps = logits.reshape(image.shape[0], num_samples, self.num_classes, *image.shape[2:])
        return foreground_logits(maps, self.num_classes)
