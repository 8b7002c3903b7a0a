"""Residual-in-Residual Dense Blocks (ESRGAN, Wang et al. 2018) and the RRDB image encoder.

The image encoder ``G`` of consensus diffusion (Amit et al., MICCAI 2023, Sec. 3 "Architecture"):
an input convolution, a stack of RRDBs with one residual connection around the whole stack, a
convolution, a leaky ReLU and an output convolution to the U-Net's first feature width. No batch
normalisation anywhere (ESRGAN's design). The layer layout follows the authors' ``RRDBNet`` so that
parameter counts are comparable: ``conv_first -> trunk(RRDB x n) -> trunk_conv (+ residual) ->
hr_conv -> leaky ReLU -> conv_last``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResidualDenseBlock", "RRDB", "RRDBEncoder"]

_RESIDUAL_SCALE = 0.2  # ESRGAN's residual scaling: keeps deep stacks of dense blocks stable
_LEAKY_SLOPE = 0.2


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=True)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convolutions with a scaled residual: B x F x H x W -> B x F x H x W.

    Convolution k sees the block input and the outputs of convolutions 1..k-1 (concatenated);
    the first four produce ``growth_channels`` each and are followed by a leaky ReLU, the fifth maps
    back to ``features``. Output: ``x + 0.2 * conv5(...)``.

    Args:
        features: channels F of the block input and output.
        growth_channels: channels added by each inner convolution.
    """

    def __init__(self, features: int = 64, growth_channels: int = 32) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            _conv3x3(features + k * growth_channels, growth_channels if k < 4 else features) for k in range(5)
        )
        self.act = nn.LeakyReLU(negative_slope=_LEAKY_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in self.convs[:-1]:
            features.append(self.act(conv(torch.cat(features, dim=1))))
        return x + _RESIDUAL_SCALE * self.convs[-1](torch.cat(features, dim=1))


class RRDB(nn.Module):
    """Residual in Residual Dense Block: three :class:`ResidualDenseBlock` and a scaled residual.

    B x F x H x W -> B x F x H x W.
    """

    def __init__(self, features: int = 64, growth_channels: int = 32) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualDenseBlock(features, growth_channels) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _RESIDUAL_SCALE * self.blocks(x)


class RRDBEncoder(nn.Module):
    """The consensus-diffusion image encoder ``G``: B x C_img x H x W -> B x C_out x H x W (same H, W).

    Args:
        in_channels: image channels (1 for CT/MR slices, 4 for QUBIQ brain tumour's sequences).
        out_channels: the U-Net's first feature width (``L``), so ``G(I)`` can be added to ``F(x_t)``.
        features: width of the RRDB trunk (64 in the official code).
        num_blocks: number of RRDBs (the paper uses 8; more is better as memory allows).
        growth_channels: growth channels of the dense blocks (32).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 128,
        features: int = 64,
        num_blocks: int = 8,
        growth_channels: int = 32,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("features", features),
            ("growth_channels", growth_channels),
        ):
            if int(value) < 1:
                raise ValueError(f"RRDBEncoder: {name} must be >= 1, got {value}.")
        if int(num_blocks) < 0:
            raise ValueError(f"RRDBEncoder: num_blocks must be >= 0, got {num_blocks}.")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.conv_first = _conv3x3(self.in_channels, features)
        self.trunk = nn.Sequential(*(RRDB(features, growth_channels) for _ in range(int(num_blocks))))
        self.trunk_conv = _conv3x3(features, features)
        self.hr_conv = _conv3x3(features, features)
        self.act = nn.LeakyReLU(negative_slope=_LEAKY_SLOPE)
        self.conv_last = _conv3x3(features, self.out_channels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"RRDBEncoder expects images B x {self.in_channels} x H x W, got shape {tuple(image.shape)}; "
                "set in_channels to the dataset's 'image_channels'."
            )
        features = self.conv_first(image)
        features = features + self.trunk_conv(self.trunk(features))
        return self.conv_last(self.act(self.hr_conv(features)))
