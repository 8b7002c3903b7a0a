"""Conditional denoisers: the network protocol every diffusion method here implements.

Protocol (used by the training inferer and the N-sample sampler):

- ``encode_condition(image) -> cond``: computed once per image. The default returns the image;
  a denoiser with an image encoder (consensus diffusion's RRDB) returns its features.
- ``forward(x_t, timesteps, cond=None, class_labels=None, image=None, target=None)``:
  ``x_t`` B x C x H x W noisy masks, ``timesteps`` (B,) (integer or continuous), ``cond`` the
  encoded condition (when None, ``image`` is encoded inside ``forward``: training does this so that
  every trainable part runs inside one ``forward``, which DistributedDataParallel requires),
  ``class_labels`` (B,) ints or None. Returns B x C_out x H x W, or, when ``target`` (the clean
  mask in [-1, 1]) is given and the network has auxiliary losses, a tuple
  ``(output, {"l_name": (B,) tensor, ...})``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet

__all__ = ["ConditionalDenoiser", "ConcatConditionedDenoiser", "diffusion_unet", "unwrap_network", "condition_of"]


def diffusion_unet(
    in_channels: int,
    out_channels: int,
    channels: Sequence[int],
    attention_levels: Sequence[bool] | None = None,
    num_class_embeds: int | None = None,
    spatial_dims: int = 2,
    **options: Any,
) -> DiffusionModelUNet:
    """The MONAI ``DiffusionModelUNet`` every denoiser here is built on.

    ``attention_levels`` defaults to no attention at any level (one entry per ``channels`` level);
    ``options`` (``num_res_blocks``, ``norm_num_groups``, ``num_head_channels``, ``resblock_updown``,
    ``use_flash_attention``, ...) go to the U-Net as they are.
    """
    return DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        attention_levels=tuple(attention_levels) if attention_levels is not None else (False,) * len(channels),
        num_class_embeds=num_class_embeds,
        **options,
    )


def unwrap_network(network: torch.nn.Module) -> Any:
    """The module inside DataParallel / DistributedDataParallel wrappers.

    Typed ``Any``: callers use the methods of the concrete network that ``nn.Module`` does not declare
    (``encode_condition``, ``sample``, ...).
    """
    while isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        network = network.module
    return network


def condition_of(network: Any, cond: Any, image: torch.Tensor | None) -> Any:
    """The ``cond`` a protocol ``forward`` was given, else ``network.encode_condition(image)`` (B x C_img x H x W).

    The one implementation of the protocol's ``cond=None, image=...`` rule, shared by every denoiser
    ``forward`` and the wrappers that restore the protocol (the deploy app's exported model, the CPU engines).
    """
    if cond is not None:
        return cond
    if image is None:
        raise ValueError(f"{type(network).__name__} needs either `cond` or `image`.")
    return network.encode_condition(image)


class ConditionalDenoiser(torch.nn.Module):
    """Base class of the protocol above; subclasses implement :meth:`denoise`."""

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        """B x C_img x H x W -> the condition used at every step (default: the image itself)."""
        return image

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond, class_labels: torch.Tensor | None):
        """The denoiser proper: B x C x H x W -> B x C_out x H x W."""
        raise NotImplementedError

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        cond=None,
        class_labels: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
    ):
        return self.denoise(x_t, timesteps, condition_of(self, cond, image), class_labels)


class ConcatConditionedDenoiser(ConditionalDenoiser):
    """``DiffusionModelUNet(concat(image, x_t), t)``: only the mask channels are noised (CIMD, Wolleb et al.).

    Args:
        image_channels: channels of the conditioning image (1 for CT, 4 for the MS MR sequences).
        mask_channels: channels of the diffused mask (1 for a binary mask).
        learn_variance: output 2 x ``mask_channels`` channels (ε, then the learned-range value v).
        spatial_dims, channels, num_res_blocks, attention_levels, norm_num_groups, num_head_channels,
        num_class_embeds, resblock_updown, dropout_cattn, use_flash_attention: passed to
            :class:`monai.networks.nets.DiffusionModelUNet`.
    """

    def __init__(
        self,
        image_channels: int = 1,
        mask_channels: int = 1,
        learn_variance: bool = True,
        spatial_dims: int = 2,
        channels: Sequence[int] = (32, 64),
        num_res_blocks: Sequence[int] | int = 1,
        attention_levels: Sequence[bool] | None = None,
        norm_num_groups: int = 16,
        num_head_channels: int | Sequence[int] = 32,
        num_class_embeds: int | None = None,
        resblock_updown: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        self.image_channels = int(image_channels)
        self.mask_channels = int(mask_channels)
        self.out_channels = self.mask_channels * (2 if learn_variance else 1)
        self.unet = diffusion_unet(
            self.image_channels + self.mask_channels,
            self.out_channels,
            channels,
            attention_levels,
            num_class_embeds,
            spatial_dims,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            resblock_updown=resblock_updown,
            use_flash_attention=use_flash_attention,
        )

    def denoise(self, x_t, timesteps, cond, class_labels=None):
        if cond.shape[1] != self.image_channels:
            raise ValueError(
                f"the image has {cond.shape[1]} channel(s) but the network was built for image_channels="
                f"{self.image_channels}; set image_channels to the dataset's 'image_channels'."
            )
        if x_t.shape[1] != self.mask_channels:
            raise ValueError(f"x_t has {x_t.shape[1]} channel(s); the network diffuses {self.mask_channels}.")
        return self.unet(torch.cat([cond.to(x_t.dtype), x_t], dim=1), timesteps, class_labels=class_labels)
