"""Prediction-to-rater matching scores: mean cross-pair Dice / IoU and Hungarian-matched IoU.

- Cross-pair Dice / IoU (AmbDiffSeg's "dice"): the mean over all (rater, prediction) pairs.
- Hungarian-matched IoU (CCDM, Zbinden et al. 2023): both sets are repeated to the least common multiple L of
  N and M (each mask repeated consecutively, like ``np.repeat``), a one-to-one assignment maximising the
  total IoU is found with the Hungarian algorithm (SciPy), and the matched IoUs are averaged.
Both-empty pairs have IoU = Dice = 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ambiseg_monai.metrics.inputs import check_preds_and_raters
from ambiseg_monai.metrics.pairwise import MaskSetOverlaps, masked_mean

__all__ = [
    "cross_pair_dice",
    "cross_pair_iou",
    "hungarian_matched_iou",
    "cross_pair_dice_from_overlaps",
    "cross_pair_iou_from_overlaps",
    "hungarian_matched_iou_from_overlaps",
    "hungarian_matched_score",
]


def cross_pair_dice_from_overlaps(overlaps: MaskSetOverlaps) -> torch.Tensor:
    """B mean Dice over all (prediction, real rater) pairs."""
    return masked_mean(overlaps.dice_pred_rater(), overlaps.rater_mask[:, None, :], dim=(1, 2))


def cross_pair_iou_from_overlaps(overlaps: MaskSetOverlaps) -> torch.Tensor:
    """B mean IoU over all (prediction, real rater) pairs."""
    return masked_mean(overlaps.iou_pred_rater(), overlaps.rater_mask[:, None, :], dim=(1, 2))


def hungarian_matched_score(similarity: np.ndarray) -> float:
    """Mean similarity of the best one-to-one matching after repeating both sets to their LCM size.

    Args:
        similarity: N x M matrix (predictions x raters), e.g. pairwise IoU.
    """
    num_preds, num_raters = similarity.shape
    size = math.lcm(num_preds, num_raters)
    rows = np.repeat(np.arange(num_preds), size // num_preds)
    cols = np.repeat(np.arange(num_raters), size // num_raters)
    expanded = similarity[np.ix_(rows, cols)]
    matched_rows, matched_cols = linear_sum_assignment(expanded, maximize=True)
    return float(expanded[matched_rows, matched_cols].mean())


def hungarian_matched_iou_from_overlaps(overlaps: MaskSetOverlaps) -> torch.Tensor:
    """B Hungarian-matched IoU values; the assignment itself is solved per image by SciPy."""
    iou = overlaps.iou_pred_rater().cpu().numpy()
    real = overlaps.rater_mask.cpu().numpy()
    scores = [hungarian_matched_score(iou[b][:, real[b]]) for b in range(iou.shape[0])]
    return torch.tensor(scores, dtype=torch.float64, device=overlaps.pred_area.device)


def _overlaps(preds: torch.Tensor, raters: torch.Tensor, rater_mask: torch.Tensor | None) -> MaskSetOverlaps:
    return MaskSetOverlaps.from_masks(*check_preds_and_raters(preds, raters, rater_mask))


def cross_pair_dice(preds: torch.Tensor, raters: torch.Tensor, rater_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Dice over all (rater, prediction) pairs of each image.

    Args:
        preds: B x N x H x W binary predicted samples.
        raters: B x M x H x W binary rater masks.
        rater_mask: optional B x M bool marking real raters.

    Returns:
        B float64 tensor.
    """
    return cross_pair_dice_from_overlaps(_overlaps(preds, raters, rater_mask))


def cross_pair_iou(preds: torch.Tensor, raters: torch.Tensor, rater_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean IoU over all (rater, prediction) pairs of each image (shapes as :func:`cross_pair_dice`)."""
    return cross_pair_iou_from_overlaps(_overlaps(preds, raters, rater_mask))


def hungarian_matched_iou(
    preds: torch.Tensor, raters: torch.Tensor, rater_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Hungarian-matched IoU (HM-IoU) of each image: B float64 values in [0, 1] (shapes as
    :func:`cross_pair_dice`); with ``rater_mask`` the LCM of sample and rater counts uses each image's own
    number of real raters."""
    return hungarian_matched_iou_from_overlaps(_overlaps(preds, raters, rater_mask))
