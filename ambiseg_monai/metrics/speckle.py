"""Speckle: foreground pixels with no foreground neighbour, the salt-and-pepper of an unconverged sampler.

A segmentation mask of a lesion is a few compact blobs; a diffusion model whose denoiser is not yet
good at low noise levels leaves isolated pixels behind. Their share of the foreground is a direct,
model-free measure of that defect (the demo's true masks have none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ambiseg_monai.metrics.inputs import check_binary_stack

__all__ = ["isolated_pixel_fraction"]


def isolated_pixel_fraction(masks: torch.Tensor) -> torch.Tensor:
    """Per image, the fraction of foreground pixels whose 8 neighbours are all background.

    Args:
        masks: B x N x H x W binary masks (the N samples of each image are pooled).

    Returns:
        B float64 tensor: isolated foreground pixels / foreground pixels (0 without foreground).
    """
    masks = check_binary_stack(masks, "masks")
    batch, count, height, width = masks.shape
    flat = masks.reshape(batch * count, 1, height, width).to(torch.float32)
    kernel = torch.ones(1, 1, 3, 3, dtype=flat.dtype, device=flat.device)
    kernel[0, 0, 1, 1] = 0.0
    neighbours = F.conv2d(flat, kernel, padding=1)
    isolated = ((flat > 0) & (neighbours == 0)).reshape(batch, -1).sum(1).to(torch.float64)
    foreground = masks.reshape(batch, -1).sum(1).to(torch.float64)
    return isolated / foreground.clamp(min=1)
