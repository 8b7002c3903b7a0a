"""Collective Insight (CI) score of CIMD (Rahman et al., CVPR 2023, eqs. 17-23) and its three components.

- Combined sensitivity ``S_c``: TP / (TP + FN) of the union of the predictions against the union of the
  raters; 1 when the raters' union is empty. (The public implementation swaps the arguments and so computes
  precision; we follow the paper.)
- Maximum Dice matching ``D_max``: for each rater the best Dice over all predictions, averaged over raters
  (Dice of two empty masks is 1).
- Diversity agreement ``D_a = 1 - (ΔV_max + ΔV_min) / 2`` with ``ΔV = |V^Y - V^Ŷ|``, where V_min / V_max are
  the smallest / largest pixel variance of the difference map over the pairs of distinct masks of a set.
  A set with fewer than two masks has V_min = V_max = 0. ``include_self_pairs=True`` also counts the i = j
  pairs (variance 0), which forces V_min = 0, as the public implementation does.
- ``CI = 3 S_c D_max D_a / (S_c + D_max + D_a)`` as printed in eq. 17 (0 when all three are 0). The paper
  calls this a harmonic mean, which it is not; ``harmonic=True`` gives the true harmonic mean
  ``3 / (1/S_c + 1/D_max + 1/D_a)`` (0 when any component is 0).
"""

from __future__ import annotations

import torch

from ambiseg_monai.metrics.inputs import check_preds_and_raters
from ambiseg_monai.metrics.pairwise import MaskSetOverlaps, masked_mean

__all__ = [
    "CI_KEYS",
    "collective_insight",
    "combined_sensitivity_from_overlaps",
    "dmax_from_overlaps",
    "diversity_agreement_from_overlaps",
    "ci_from_components",
]

CI_KEYS = ("combined_sensitivity", "dmax", "diversity_agreement", "ci")


def combined_sensitivity_from_overlaps(overlaps: MaskSetOverlaps) -> torch.Tensor:
    """B combined sensitivities: union of predictions vs union of real raters (1 if the raters' union is empty)."""
    # On the integer counts: a pixel is in both unions where the smaller count is > 0. Clamping to 1 and
    # summing along the pixels is several times faster than summing bool masks (a widening copy).
    both = torch.minimum(overlaps.pred_count, overlaps.rater_votes)
    true_positive = both.clamp(max=1).sum(1, dtype=torch.int64).to(torch.float64)
    gt_area = overlaps.rater_votes.clamp(max=1).sum(1, dtype=torch.int64).to(torch.float64)  # = TP + FN
    return torch.where(gt_area > 0, true_positive / gt_area.clamp_min(1), torch.ones_like(gt_area))


def dmax_from_overlaps(overlaps: MaskSetOverlaps) -> torch.Tensor:
    """B values of ``D_max``: best Dice over predictions for each real rater, averaged over raters."""
    best_per_rater = overlaps.dice_pred_rater().amax(dim=1)  # B x M
    return masked_mean(best_per_rater, overlaps.rater_mask, dim=1)


def _variance_extremes(
    variance: torch.Tensor, member_mask: torch.Tensor, include_self_pairs: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(V_min, V_max), each B, over the pairs of real members of a B x K x K variance matrix."""
    num_members = variance.shape[-1]
    offset = 0 if include_self_pairs else 1
    # Variance is symmetric in the pair, so the (strict) upper triangle lists each pair once.
    triangle = torch.ones(num_members, num_members, dtype=torch.bool, device=variance.device).triu(offset)
    pair_mask = triangle & member_mask[:, :, None] & member_mask[:, None, :]
    has_pair = pair_mask.flatten(1).any(1)
    v_min = variance.masked_fill(~pair_mask, float("inf")).flatten(1).amin(1)
    v_max = variance.masked_fill(~pair_mask, float("-inf")).flatten(1).amax(1)
    zero = torch.zeros_like(v_min)
    return torch.where(has_pair, v_min, zero), torch.where(has_pair, v_max, zero)


def diversity_agreement_from_overlaps(overlaps: MaskSetOverlaps, include_self_pairs: bool = False) -> torch.Tensor:
    """B values of the diversity agreement ``D_a`` from precomputed overlaps."""
    all_preds = torch.ones(overlaps.pred_area.shape, dtype=torch.bool, device=overlaps.pred_area.device)
    pred_min, pred_max = _variance_extremes(overlaps.variance_pred_pred(), all_preds, include_self_pairs)
    gt_min, gt_max = _variance_extremes(overlaps.variance_rater_rater(), overlaps.rater_mask, include_self_pairs)
    return 1 - ((gt_max - pred_max).abs() + (gt_min - pred_min).abs()) / 2


def ci_from_components(
    sensitivity: torch.Tensor, dice_matching: torch.Tensor, agreement: torch.Tensor, harmonic: bool = False
) -> torch.Tensor:
    """Combine the three components into CI (eq. 17 as printed, or the true harmonic mean)."""
    if harmonic:
        product = sensitivity * dice_matching * agreement
        pair_products = sensitivity * dice_matching + sensitivity * agreement + dice_matching * agreement
        # 3 / (1/a + 1/b + 1/c) = 3abc / (ab + ac + bc); it tends to 0 when any component is 0.
        return torch.where(product > 0, 3 * product / pair_products.clamp_min(1e-300), torch.zeros_like(product))
    total = sensitivity + dice_matching + agreement
    return torch.where(
        total > 0, 3 * sensitivity * dice_matching * agreement / total.clamp_min(1e-300), torch.zeros_like(total)
    )


def collective_insight(
    preds: torch.Tensor,
    raters: torch.Tensor,
    include_self_pairs: bool = False,
    harmonic: bool = False,
    rater_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """CI score and its components for each image.

    Args:
        preds: B x N x H x W binary predicted samples.
        raters: B x M x H x W binary rater masks.
        include_self_pairs: count i = j pairs in the diversity agreement (public-code behaviour).
        harmonic: combine the components with the true harmonic mean instead of eq. 17 as printed.
        rater_mask: optional B x M bool marking real raters (padding channels are ignored).

    Returns:
        dict with B float64 tensors under ``combined_sensitivity``, ``dmax``,
        ``diversity_agreement`` and ``ci`` (all higher is better, in [0, 1]).
    """
    preds, raters, mask = check_preds_and_raters(preds, raters, rater_mask)
    overlaps = MaskSetOverlaps.from_masks(preds, raters, mask)
    sensitivity = combined_sensitivity_from_overlaps(overlaps)
    dice_matching = dmax_from_overlaps(overlaps)
    agreement = diversity_agreement_from_overlaps(overlaps, include_self_pairs)
    ci = ci_from_components(sensitivity, dice_matching, agreement, harmonic)
    return dict(zip(CI_KEYS, (sensitivity, dice_matching, agreement, ci), strict=True))
