"""Generalised energy distance (GED) and sample diversity with the IoU distance ``d = 1 - IoU``.

``GED = 2 E[d(Ŷ, Y)] - E[d(Ŷ, Ŷ')] - E[d(Y, Y')]`` per image. By default the expectations run over all
ordered pairs including ``i = j`` (denominators N·M, N², M²), as in the Probabilistic U-Net / PHiSeg
evaluations; ``unbiased=True`` excludes the ``i = j`` pairs (denominators N(N-1), M(M-1)). IoU of two empty
masks is 1, so their distance is 0.
"""

from __future__ import annotations

import torch

from ambiseg_monai.metrics.inputs import check_binary_stack, check_preds_and_raters
from ambiseg_monai.metrics.pairwise import MaskSetOverlaps, masked_mean

__all__ = [
    "generalized_energy_distance",
    "sample_diversity",
    "generalized_energy_distance_from_overlaps",
    "sample_diversity_from_overlaps",
]


def _mean_self_distance(distance: torch.Tensor, member_mask: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Mean of a B x K x K distance matrix over pairs of real members (``member_mask`` B x K).

    With ``unbiased`` the diagonal is excluded; a set with fewer than two members then has no pair and
    contributes 0, the same value the biased form gives for a single mask (its only pair is i = j).
    """
    pair_mask = member_mask[:, :, None] & member_mask[:, None, :]
    if unbiased:
        pair_mask = pair_mask & ~torch.eye(distance.shape[-1], dtype=torch.bool, device=distance.device)
    weights = pair_mask.to(distance.dtype)
    num_pairs = weights.sum((1, 2))
    total = (distance * weights).sum((1, 2))
    return torch.where(num_pairs > 0, total / num_pairs.clamp_min(1), torch.zeros_like(total))


def sample_diversity_from_overlaps(overlaps: MaskSetOverlaps, unbiased: bool = False) -> torch.Tensor:
    """B values of ``E[d(Ŷ, Ŷ')]`` from precomputed overlaps."""
    distance = 1 - overlaps.iou_pred_pred()
    all_preds = torch.ones(distance.shape[:2], dtype=torch.bool, device=distance.device)
    return _mean_self_distance(distance, all_preds, unbiased)


def generalized_energy_distance_from_overlaps(overlaps: MaskSetOverlaps, unbiased: bool = False) -> torch.Tensor:
    """B GED values from precomputed overlaps."""
    cross = masked_mean(1 - overlaps.iou_pred_rater(), overlaps.rater_mask[:, None, :], dim=(1, 2))
    preds_term = sample_diversity_from_overlaps(overlaps, unbiased)
    raters_term = _mean_self_distance(1 - overlaps.iou_rater_rater(), overlaps.rater_mask, unbiased)
    return 2 * cross - preds_term - raters_term


def generalized_energy_distance(
    preds: torch.Tensor,
    raters: torch.Tensor,
    unbiased: bool = False,
    rater_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalised energy distance with ``d = 1 - IoU`` for each image.

    Args:
        preds: B x N x H x W binary predicted samples.
        raters: B x M x H x W binary rater masks.
        unbiased: exclude the ``i = j`` pairs from the two self terms (default: include them, as published).
        rater_mask: optional B x M bool marking real raters (padding channels are ignored).

    Returns:
        B float64 tensor of GED values (lower is better).
    """
    overlaps = MaskSetOverlaps.from_masks(*check_preds_and_raters(preds, raters, rater_mask))
    return generalized_energy_distance_from_overlaps(overlaps, unbiased)


def sample_diversity(preds: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Mean pairwise distance ``E[d(Ŷ, Ŷ')]`` (``d = 1 - IoU``) between the predicted samples of each image.

    Args:
        preds: B x N x H x W binary predicted samples.
        unbiased: exclude the ``i = j`` pairs (default: include them, the GED self term).

    Returns:
        B float64 tensor.
    """
    preds = check_binary_stack(preds, "preds")
    no_raters = preds[:, :0]
    mask = torch.zeros(preds.shape[0], 0, dtype=torch.bool, device=preds.device)
    return sample_diversity_from_overlaps(MaskSetOverlaps.from_masks(preds, no_raters, mask), unbiased)
