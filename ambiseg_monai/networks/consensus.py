"""Consensus diffusion's denoiser (Amit et al., MICCAI 2023): ``ε(x_t, I, t, c) = D(E(F(x_t) + G(I)))``.

- ``F`` is the first convolution of MONAI's :class:`~monai.networks.nets.DiffusionModelUNet` (mask
  channels -> the U-Net's first width ``L``);
- ``G`` is the RRDB image encoder (:class:`~ambiseg_monai.networks.rrdb.RRDBEncoder`, image -> ``L``
  channels at full resolution);
- their **sum** (not a channel concatenation) enters the rest of the U-Net encoder ``E`` and is also its
  first skip connection to the decoder ``D``, exactly as in the authors' code (``h = input_blocks[0](x) +
  rrdb(image)``);
- the consensus level ``c`` (or the rater id in the "annotator" ablation) is a lookup-table embedding
  added to the time embedding: ``DiffusionModelUNet(num_class_embeds=C)`` does precisely that.

How ``G(I)`` reaches the U-Net without re-implementing MONAI's forward: the U-Net's ``conv_in`` is
replaced by :class:`SummedConditionStem`, which receives ``concat(x_t, G(I))`` and returns
``F(x_t) + G(I)``. ``G`` runs in :meth:`ConsensusDenoiser.encode_condition`, which the sampler calls
once per image; every reverse step reuses its output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ambiseg_monai.networks.denoisers import ConditionalDenoiser, diffusion_unet
from ambiseg_monai.networks.rrdb import RRDBEncoder

__all__ = ["SummedConditionStem", "ConsensusDenoiser"]


class SummedConditionStem(nn.Module):
    """``F(x_t) + G(I)``: the U-Net's input stem when the image features are added, not concatenated.

    Args:
        mask_conv: ``F``, the convolution applied to the noisy mask (mask channels -> L).
        mask_channels: how many leading input channels are the noisy mask.

    ``forward(x)``: ``x`` is B x (mask_channels + L) x H x W, the noisy mask followed by the encoded image;
    returns B x L x H x W.
    """

    def __init__(self, mask_conv: nn.Module, mask_channels: int) -> None:
        super().__init__()
        self.conv = mask_conv
        self.mask_channels = int(mask_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_t, image_features = x[:, : self.mask_channels], x[:, self.mask_channels :]
        return self.conv(x_t) + image_features


class ConsensusDenoiser(ConditionalDenoiser):
    """Denoiser with an RRDB image encoder added to the first feature map and a level embedding.

    Follows the conditional-denoiser protocol of :mod:`ambiseg_monai.networks.denoisers`:
    ``encode_condition(image) -> G(image)`` (B x L x H x W, computed once per image when sampling) and
    ``forward(x_t, timesteps, cond=None, class_labels=None, image=None, target=None)``.

    Args:
        image_channels: channels of the conditioning image (4 for QUBIQ brain tumour).
        mask_channels: channels of the diffused mask (1).
        learn_variance: output 2 x ``mask_channels`` channels (ε, then the learned-range value v).
        num_levels: size of the level (or rater-id) embedding table: the dataset's rater count C.
            ``class_labels`` are 0-based (level c -> c - 1, as written by ``RandomConsensusLeveld``).
            None builds an unconditional network ("no annotator" and "soft label" ablations).
        channels, num_res_blocks, attention_levels, norm_num_groups, num_head_channels, resblock_updown,
        use_flash_attention: passed to :class:`monai.networks.nets.DiffusionModelUNet` (2D); ``channels[0]``
            is ``L``, the width of ``F(x_t)`` and ``G(I)``.
        rrdb_features, rrdb_blocks, rrdb_growth_channels: the image encoder's trunk width, number of RRDBs
            (8 in the paper) and dense-block growth channels.
    """

    def __init__(
        self,
        image_channels: int = 1,
        mask_channels: int = 1,
        learn_variance: bool = True,
        num_levels: int | None = None,
        channels: Sequence[int] = (32, 64),
        num_res_blocks: Sequence[int] | int = 1,
        attention_levels: Sequence[bool] | None = None,
        norm_num_groups: int = 16,
        num_head_channels: int | Sequence[int] = 32,
        resblock_updown: bool = False,
        use_flash_attention: bool = False,
        rrdb_features: int = 64,
        rrdb_blocks: int = 8,
        rrdb_growth_channels: int = 32,
    ) -> None:
        super().__init__()
        if num_levels is not None and int(num_levels) < 1:
            raise ValueError(f"num_levels must be >= 1 (the dataset's rater count) or None, got {num_levels}.")
        self.image_channels = int(image_channels)
        self.mask_channels = int(mask_channels)
        self.out_channels = self.mask_channels * (2 if learn_variance else 1)
        self.num_levels = None if num_levels is None else int(num_levels)
        self.feature_channels = int(channels[0])
        self.image_encoder = RRDBEncoder(
            in_channels=self.image_channels,
            out_channels=self.feature_channels,
            features=rrdb_features,
            num_blocks=rrdb_blocks,
            growth_channels=rrdb_growth_channels,
        )
        self.unet = diffusion_unet(
            self.mask_channels,
            self.out_channels,
            channels,
            attention_levels,
            self.num_levels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            resblock_updown=resblock_updown,
            use_flash_attention=use_flash_attention,
        )
        # F is the U-Net's own first convolution; the stem adds G(I) to its output (a Module in the slot
        # MONAI types as Convolution)
        self.unet.conv_in = SummedConditionStem(self.unet.conv_in, self.mask_channels)  # type: ignore[assignment]

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        """``G(I)``: B x C_img x H x W -> B x L x H x W."""
        return self.image_encoder(image)

    def _check_labels(self, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if self.num_levels is None:
            if class_labels is not None:
                raise ValueError(
                    "this ConsensusDenoiser has no level embedding (num_levels=None) but received class_labels; "
                    "set num_levels to the rater count or stop passing class labels."
                )
            return None
        if class_labels is None:
            raise ValueError(
                f"this ConsensusDenoiser embeds {self.num_levels} levels and needs class_labels "
                "(0-based level c - 1 or rater id) for every row."
            )
        labels = torch.as_tensor(class_labels).long().flatten()
        if labels.numel() != batch:
            raise ValueError(f"got {labels.numel()} class labels for a batch of {batch} noisy masks.")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_levels):
            raise ValueError(
                f"class labels must lie in [0, {self.num_levels - 1}] (0-based level or rater id), "
                f"got values in [{int(labels.min())}, {int(labels.max())}]."
            )
        return labels

    def denoise(self, x_t, timesteps, cond, class_labels=None):
        """x_t B x mask_channels x H x W, cond = ``G(I)`` B x L x H x W -> B x out_channels x H x W."""
        if x_t.shape[1] != self.mask_channels:
            raise ValueError(f"x_t has {x_t.shape[1]} channel(s); the network diffuses {self.mask_channels}.")
        if cond.ndim != 4 or cond.shape[1] != self.feature_channels or cond.shape[0] != x_t.shape[0]:
            raise ValueError(
                f"cond must be the encoded image B x {self.feature_channels} x H x W for {x_t.shape[0]} rows "
                f"(from encode_condition), got shape {tuple(cond.shape)}."
            )
        if cond.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"image features {tuple(cond.shape[2:])} and masks {tuple(x_t.shape[2:])} differ in size.")
        labels = self._check_labels(class_labels, x_t.shape[0])
        if labels is not None:
            labels = labels.to(x_t.device)
        return self.unet(torch.cat([x_t, cond.to(x_t.dtype)], dim=1), timesteps, class_labels=labels)
