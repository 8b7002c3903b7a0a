"""QUBIQ soft Dice: Dice of thresholded soft maps, averaged over thresholds.

The soft ground truth is the mean of the real raters' masks. At each threshold τ both maps are binarised
with ``>= τ`` and compared with ``(2|A ∩ B| + s) / (|A| + |B| + s)``, smoothing ``s = 1e-6`` (so two empty
maps score 1); the result is the mean over τ. Default τ = 0.1, 0.2, ..., 0.9 (QUBIQ challenge); the consensus
diffusion paper reports τ = 0.1, 0.3, 0.5, 0.7, 0.9.

Each map is compared with τ expressed in that map's own dtype: a float32 soft map holding 0.7 (which is
slightly below the float64 0.7) is still ``>= 0.7``, and rater fractions k/M computed in float64 match the
float64 τ exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ambiseg_monai.metrics.inputs import check_binary_stack, check_probability_stack, check_rater_mask

__all__ = [
    "QUBIQ_THRESHOLDS",
    "CONSENSUS_PAPER_THRESHOLDS",
    "soft_dice",
    "soft_dice_from_maps",
    "soft_dice_from_counts",
    "soft_rater_map",
]

QUBIQ_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CONSENSUS_PAPER_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    thresholds = tuple(float(t) for t in thresholds)
    if not thresholds:
        raise ValueError("thresholds: at least one threshold is required.")
    if any(not 0 < t <= 1 for t in thresholds):
        raise ValueError(f"thresholds: every threshold must lie in (0, 1], got {thresholds}.")
    return thresholds


def soft_rater_map(raters: torch.Tensor, rater_mask: torch.Tensor) -> torch.Tensor:
    """B x H x W float64 fraction of real raters marking each pixel (``raters`` B x M x H x W bool)."""
    weights = rater_mask.to(torch.float32)
    votes = torch.einsum("bmhw,bm->bhw", raters.to(torch.float32), weights)  # small integers: exact
    return votes.to(torch.float64) / weights.sum(1).to(torch.float64)[:, None, None]


def _threshold_levels(maps: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """B x P number of thresholds each value reaches, ``#{τ : value >= τ}``, with τ in the map's dtype."""
    levels = torch.zeros(maps.shape, dtype=torch.int64, device=maps.device)
    for threshold in thresholds.to(maps.dtype):  # a few thresholds; faster than torch.bucketize here
        levels += maps >= threshold
    return levels


def _count_levels_reached(levels: torch.Tensor, num_thresholds: int) -> torch.Tensor:
    """B x T float64 counts ``#{p : level(p) >= t + 1}``: pixels at or above the t-th sorted threshold."""
    histogram = torch.zeros(levels.shape[0], num_thresholds + 1, dtype=torch.float64, device=levels.device)
    histogram.scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float64))
    at_least = histogram.flip(1).cumsum(1).flip(1)  # at_least[:, l] = #{level >= l}
    return at_least[:, 1:]


def soft_dice_from_maps(
    pred_soft: torch.Tensor,
    gt_soft: torch.Tensor,
    thresholds: Sequence[float] = QUBIQ_THRESHOLDS,
    smooth: float = 1e-6,
) -> torch.Tensor:
    """B soft Dice values from a soft prediction and a soft ground truth (each B x H x W or B x P).

    Instead of T binarised copies of both maps, each pixel gets the number of sorted thresholds it reaches
    (its "level"); ``map >= τ_t`` is ``level >= t + 1`` and both maps reach τ_t where the smaller level does.
    """
    thresholds_sorted = torch.tensor(sorted(_check_thresholds(thresholds)), dtype=torch.float64)
    num_thresholds = len(thresholds_sorted)
    pred_levels = _threshold_levels(pred_soft.flatten(1), thresholds_sorted.to(pred_soft.device))
    gt_levels = _threshold_levels(gt_soft.flatten(1), thresholds_sorted.to(gt_soft.device))
    pred_on = _count_levels_reached(pred_levels, num_thresholds)
    gt_on = _count_levels_reached(gt_levels, num_thresholds)
    intersection = _count_levels_reached(torch.minimum(pred_levels, gt_levels), num_thresholds)
    return ((2 * intersection + smooth) / (pred_on + gt_on + smooth)).mean(1)


def soft_dice_from_counts(
    pred_count: torch.Tensor,
    num_samples: int,
    rater_votes: torch.Tensor,
    num_raters: torch.Tensor,
    thresholds: Sequence[float] = QUBIQ_THRESHOLDS,
    smooth: float = 1e-6,
) -> torch.Tensor:
    """B soft Dice values when the soft prediction is the mean of N binary samples, from per-pixel counts.

    Same result as ``soft_dice_from_maps(pred_count / N, rater_votes / M_b)``: both maps take only N + 1 and
    M + 1 values, so one joint histogram of (sample count, rater votes) per image replaces all pixel work.

    Args:
        pred_count: B x P number of samples marking each pixel (integer valued).
        num_samples: N.
        rater_votes: B x P number of real raters marking each pixel (integer valued).
        num_raters: B number of real raters of each image.
    """
    thresholds_sorted = torch.tensor(sorted(_check_thresholds(thresholds)), dtype=torch.float64)
    batch, device = pred_count.shape[0], pred_count.device
    max_votes = int(num_raters.max())
    num_bins = batch * (num_samples + 1) * (max_votes + 1)
    index_dtype = torch.int32 if num_bins < 2**31 else torch.int64  # int32 indices are faster to build
    image = torch.arange(batch, dtype=index_dtype, device=device)[:, None]
    # built in place in one B x P buffer (the counts may be uint8: adding them promotes nothing)
    joint_index = pred_count.to(index_dtype, copy=True)
    joint_index += image * (num_samples + 1)
    joint_index *= max_votes + 1
    joint_index += rater_votes
    joint = torch.bincount(joint_index.flatten(), minlength=num_bins)
    joint = joint.view(batch, num_samples + 1, max_votes + 1).to(torch.float64)
    # The same float64 values the maps would hold: k / N and v / M_b.
    pred_values = torch.arange(num_samples + 1, dtype=torch.float64, device=device) / num_samples
    gt_values = (
        torch.arange(max_votes + 1, dtype=torch.float64, device=device)[None, :] / num_raters.to(torch.float64)[:, None]
    )
    levels = thresholds_sorted.to(device)
    pred_on = (pred_values[None, :] >= levels[:, None]).to(torch.float64)  # T x (N+1)
    gt_on = (gt_values[:, None, :] >= levels[None, :, None]).to(torch.float64)  # B x T x (M+1)
    pred_area = torch.einsum("bkv,tk->bt", joint, pred_on)
    gt_area = torch.einsum("bkv,btv->bt", joint, gt_on)
    intersection = torch.einsum("bkv,tk,btv->bt", joint, pred_on, gt_on)
    return ((2 * intersection + smooth) / (pred_area + gt_area + smooth)).mean(1)


def soft_dice(
    pred_soft: torch.Tensor,
    raters: torch.Tensor,
    thresholds: Sequence[float] = QUBIQ_THRESHOLDS,
    rater_mask: torch.Tensor | None = None,
    smooth: float = 1e-6,
) -> torch.Tensor:
    """QUBIQ soft Dice of each image.

    Args:
        pred_soft: B x H x W soft prediction in [0, 1] (e.g. the mean of the binary samples).
        raters: B x M x H x W binary rater masks.
        thresholds: binarisation thresholds τ in (0, 1].
        rater_mask: optional B x M bool marking real raters (the soft GT averages only those).
        smooth: additive smoothing of numerator and denominator.

    Returns:
        B float64 tensor in [0, 1].
    """
    pred_soft = check_probability_stack(pred_soft, "pred_soft", ndim=3)
    raters = check_binary_stack(raters, "raters")
    if pred_soft.shape[0] != raters.shape[0] or pred_soft.shape[-2:] != raters.shape[-2:]:
        raise ValueError(
            f"pred_soft {tuple(pred_soft.shape)} does not match raters {tuple(raters.shape)} "
            "(expected B x H x W and B x M x H x W with the same B, H, W)."
        )
    mask = check_rater_mask(rater_mask, raters)
    return soft_dice_from_maps(pred_soft, soft_rater_map(raters, mask), thresholds, smooth)
