"""AmbDiffSeg's denoiser: MONAI's diffusion U-Net on ``concat(image, x_t)`` conditioned on continuous time.

The paper embeds the continuous time t in [0, 1] sinusoidally. MONAI's
:class:`~monai.networks.nets.DiffusionModelUNet` embeds its timesteps with frequencies from 1 down to
1/10000 per unit, tuned for integer steps 0..999, so t is multiplied by ``time_scale`` (1000) first:
the embedding then resolves continuous times as finely as it resolves DDPM's integer steps.

Paper U-Net (appendix 8.3): channels (32, 32, 64, 128), res blocks (1, 2, 3, 4), one-head attention
at the lowest resolution, GroupNorm with 32 groups. MONAI's U-Net has a fixed middle block (res,
attention, res) instead of the paper's 4 middle res blocks; everything else is configurable.
"""

from __future__ import annotations

from typing import Any

import torch

from ambiseg_monai.networks.denoisers import ConcatConditionedDenoiser

__all__ = ["ContinuousTimeDenoiser"]


class ContinuousTimeDenoiser(ConcatConditionedDenoiser):
    """:class:`~ambiseg_monai.networks.denoisers.ConcatConditionedDenoiser` taking times t in [0, 1].

    Args:
        time_scale: t is embedded as ``time_scale * t``.
        other arguments: as :class:`ConcatConditionedDenoiser`; there is no learned variance
            (``learn_variance`` is always False: the output has ``mask_channels`` channels, x, v or ε).

    ``forward(x_t, timesteps, cond=None, class_labels=None, image=None, target=None)``: ``x_t``
    B x C x H x W, ``timesteps`` (B,) floats in [0, 1]; returns B x C x H x W.
    """

    def __init__(
        self, image_channels: int = 1, mask_channels: int = 1, *, time_scale: float = 1000.0, **kwargs: Any
    ) -> None:
        # the other arguments are keyword-only: a third positional argument would be learn_variance
        if kwargs.pop("learn_variance", False):
            raise ValueError("ContinuousTimeDenoiser has no learned variance; remove learn_variance=True.")
        super().__init__(image_channels, mask_channels, learn_variance=False, **kwargs)
        if float(time_scale) <= 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}.")
        self.time_scale = float(time_scale)

    def denoise(self, x_t, timesteps, cond, class_labels=None):
        timesteps = torch.as_tensor(timesteps, device=x_t.device)
        if timesteps.is_floating_point() and timesteps.numel() and float(timesteps.abs().max()) > 1.0:
            raise ValueError(
                f"ContinuousTimeDenoiser expects times in [0, 1], got values up to {float(timesteps.max())}; "
                "use it with a continuous-time scheduler."
            )
        return super().denoise(x_t, timesteps.float() * self.time_scale, cond, class_labels)
