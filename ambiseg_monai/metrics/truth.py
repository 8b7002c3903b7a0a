"""Metrics against a *known* rater distribution: a finite set of candidate masks with probabilities.

The demo dataset stores, per image, the K candidate masks ("modes", K x H x W) the raters draw from and
their probabilities (summing to 1). With that truth a method can be scored against the distribution
itself instead of against a handful of rater draws:

- :func:`generalized_energy_distance_to_truth`: GED with ``d = 1 - IoU`` where the expectations over the
  true distribution are probability-weighted sums over the modes,
  ``GED = 2 Σ_k p_k mean_n d(Ŷ_n, Y_k) - mean_{n,n'} d(Ŷ_n, Ŷ_n') - Σ_{k,l} p_k p_l d(Y_k, Y_l)``
  (the biased form, i = j pairs included, as :func:`~ambiseg_monai.metrics.generalized_energy_distance`).
- :func:`sampled_mode_frequencies` / :func:`mode_frequency_error`: assign every sample to the mode it
  overlaps best (IoU) and compare the modes' sampled frequencies with their true probabilities.
- :func:`empty_fraction`: the (probability-weighted) fraction of empty masks, for samples and for the truth.
- :func:`region_inclusion_frequency`: for parts of the structure that raters include independently with a
  known probability (the demo's lobes), the fraction of the non-empty samples that include each part. It
  measures the frequencies alone: a sample with a ragged outline still includes or excludes a lobe, while
  its mode assignment may change, so mode frequencies mix shape quality with frequencies.

:func:`truth_scores` computes all of them at once per image (what the evaluator handler and the
benchmarks report). Modes may be padded (images with fewer modes): give them probability 0 and
``mode_mask`` False.
"""

from __future__ import annotations

import torch

from ambiseg_monai.metrics.inputs import check_binary_stack, check_preds_and_raters, check_rater_mask
from ambiseg_monai.metrics.pairwise import MaskSetOverlaps

__all__ = [
    "generalized_energy_distance_to_truth",
    "assign_modes",
    "sampled_mode_frequencies",
    "mode_frequency_error",
    "empty_fraction",
    "region_inclusion_frequency",
    "truth_scores",
]


def _check_probabilities(probabilities: torch.Tensor, modes: torch.Tensor, mode_mask: torch.Tensor) -> torch.Tensor:
    """B x K probabilities as float64; they must be >= 0, 0 on padded modes and sum to 1 per image."""
    probabilities = torch.as_tensor(probabilities, device=modes.device).to(torch.float64)
    if probabilities.shape != modes.shape[:2]:
        raise ValueError(
            f"probabilities: expected shape B x K = {tuple(modes.shape[:2])} (one per mode), "
            f"got {tuple(probabilities.shape)}."
        )
    if not bool(torch.isfinite(probabilities).all()) or bool((probabilities < 0).any()):
        raise ValueError("probabilities: values must be finite and non-negative.")
    if bool((probabilities[~mode_mask] > 0).any()):
        raise ValueError("probabilities: padded modes (mode_mask False) must have probability 0.")
    sums = probabilities.sum(1)
    if not bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-4)):
        raise ValueError(f"probabilities: each image's probabilities must sum to 1, got sums {sums.tolist()}.")
    return probabilities


def _overlaps(preds: torch.Tensor, modes: torch.Tensor, mode_mask: torch.Tensor | None) -> MaskSetOverlaps:
    return MaskSetOverlaps.from_masks(*check_preds_and_raters(preds, modes, mode_mask, "modes"))


def generalized_energy_distance_to_truth(
    preds: torch.Tensor,
    modes: torch.Tensor,
    probabilities: torch.Tensor,
    mode_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """GED (``d = 1 - IoU``) between the predicted samples and a weighted finite true distribution.

    Args:
        preds: B x N x H x W binary samples.
        modes: B x K x H x W binary candidate masks of the true distribution.
        probabilities: B x K probabilities of the modes (sum to 1 per image; 0 on padding).
        mode_mask: optional B x K bool marking real modes.

    Returns:
        B float64 tensor (0 when the samples are exactly the true distribution with N -> inf).
    """
    overlaps = _overlaps(preds, modes, mode_mask)
    p = _check_probabilities(probabilities, modes, overlaps.rater_mask)
    cross = ((1 - overlaps.iou_pred_rater()).mean(1) * p).sum(1)  # Σ_k p_k mean_n d(Ŷ_n, Y_k)
    preds_term = (1 - overlaps.iou_pred_pred()).mean((1, 2))
    truth_term = torch.einsum("bk,bkl,bl->b", p, 1 - overlaps.iou_rater_rater(), p)
    return 2 * cross - preds_term - truth_term


def assign_modes(
    preds: torch.Tensor, modes: torch.Tensor, mode_mask: torch.Tensor | None = None, min_iou: float = 0.0
) -> torch.Tensor:
    """The mode each sample is assigned to: the one with the highest IoU (ties: the first).

    A sample whose best IoU is not above ``min_iou`` matches no mode (-1; e.g. a non-empty blob that
    overlaps nothing). An empty sample matches an empty mode with IoU 1 (two empty masks are identical).

    Args:
        preds: B x N x H x W binary samples.
        modes: B x K x H x W binary candidate masks.
        mode_mask: optional B x K bool marking real modes (padded modes never receive samples).
        min_iou: a sample needs a best IoU strictly above this to be assigned.

    Returns:
        B x N int64 mode indices, -1 where a sample matches no mode.
    """
    overlaps = _overlaps(preds, modes, mode_mask)
    iou = overlaps.iou_pred_rater().masked_fill(~overlaps.rater_mask[:, None, :], -1.0)  # B x N x K
    best_iou, best = iou.max(dim=2)
    return torch.where(best_iou > min_iou, best, torch.full_like(best, -1))


def sampled_mode_frequencies(
    preds: torch.Tensor, modes: torch.Tensor, mode_mask: torch.Tensor | None = None, min_iou: float = 0.0
) -> torch.Tensor:
    """Fraction of the samples assigned to each mode (:func:`assign_modes`), so the frequencies of an image sum
    to at most 1 (samples that match no mode count for none).

    Args: as :func:`assign_modes`.

    Returns:
        B x K float64 frequencies.
    """
    assigned = assign_modes(preds, modes, mode_mask, min_iou)
    one_hot = torch.nn.functional.one_hot(assigned.clamp(min=0), modes.shape[1]).to(torch.float64)
    return (one_hot * (assigned >= 0)[..., None]).mean(1)


def mode_frequency_error(
    preds: torch.Tensor,
    modes: torch.Tensor,
    probabilities: torch.Tensor,
    mode_mask: torch.Tensor | None = None,
    min_iou: float = 0.0,
) -> torch.Tensor:
    """Absolute error ``|f_k - p_k|`` of each mode's sampled frequency against its true probability.

    Args: as :func:`sampled_mode_frequencies`, plus ``probabilities`` (B x K, sum to 1 per image).

    Returns:
        B x K float64 errors (0 on padded modes). Their sum over K is twice the total-variation
        distance when every sample matches a mode.
    """
    overlaps = _overlaps(preds, modes, mode_mask)
    p = _check_probabilities(probabilities, modes, overlaps.rater_mask)
    return (sampled_mode_frequencies(preds, modes, mode_mask, min_iou) - p).abs() * overlaps.rater_mask


def empty_fraction(masks: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(Weighted) fraction of empty masks per image.

    Args:
        masks: B x K x H x W binary masks (samples, or the true modes).
        weights: optional B x K non-negative weights (the modes' probabilities); default uniform.

    Returns:
        B float64 tensor: ``Σ_k w_k [mask k empty] / Σ_k w_k``.
    """
    masks = check_binary_stack(masks, "masks")
    empty = (~masks.flatten(2).any(2)).to(torch.float64)  # B x K
    if weights is None:
        return empty.mean(1)
    weights = torch.as_tensor(weights, device=masks.device).to(torch.float64)
    if weights.shape != empty.shape:
        raise ValueError(f"weights: expected shape B x K = {tuple(empty.shape)}, got {tuple(weights.shape)}.")
    if bool((weights < 0).any()) or bool((weights.sum(1) <= 0).any()):
        raise ValueError("weights: must be non-negative with a positive sum per image.")
    return (empty * weights).sum(1) / weights.sum(1)


def region_inclusion_frequency(
    preds: torch.Tensor,
    regions: torch.Tensor,
    region_mask: torch.Tensor | None = None,
    min_coverage: float = 0.5,
) -> torch.Tensor:
    """Fraction of the non-empty samples that include each region (cover more than ``min_coverage`` of it).

    For a structure whose parts raters include independently (the demo's lobes: a rater who sees the
    lesion includes lobe l with probability ``p_l``), compare the result with ``p_l``. Empty samples are
    left out because ``p_l`` is conditional on the lesion being drawn at all (the empty fraction is
    scored on its own).

    Args:
        preds: B x N x H x W binary samples.
        regions: B x L x H x W binary region masks (each non-empty unless padded).
        region_mask: optional B x L bool marking real regions; padded regions get frequency 0.
        min_coverage: a sample includes a region when it covers strictly more than this fraction of it.

    Returns:
        B x L float64 frequencies; 0 for an image whose samples are all empty.
    """
    preds, regions, region_mask = check_preds_and_raters(preds, regions, region_mask, "regions")
    if not 0.0 <= float(min_coverage) < 1.0:
        raise ValueError(f"min_coverage must lie in [0, 1), got {min_coverage}.")
    flat_preds = preds.flatten(2).to(torch.float64)  # B x N x P
    flat_regions = regions.flatten(2).to(torch.float64)  # B x L x P
    sizes = flat_regions.sum(2)  # B x L
    if bool(((sizes == 0) & region_mask).any()):
        raise ValueError("regions: a real region (region_mask True) is empty.")
    covered = torch.einsum("bnp,blp->bnl", flat_preds, flat_regions) / sizes.clamp(min=1)[:, None, :]
    included = (covered > min_coverage).to(torch.float64)  # B x N x L
    drawn = flat_preds.any(2).to(torch.float64)  # B x N: the non-empty samples
    counts = (included * drawn[..., None]).sum(1)  # B x L
    frequency = counts / drawn.sum(1, keepdim=True).clamp(min=1)
    return frequency * region_mask


def truth_scores(
    preds: torch.Tensor,
    modes: torch.Tensor,
    probabilities: torch.Tensor,
    mode_mask: torch.Tensor | None = None,
    regions: torch.Tensor | None = None,
    region_probabilities: torch.Tensor | None = None,
    region_mask: torch.Tensor | None = None,
    min_coverage: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Every score of samples against a known distribution, per image.

    Args:
        preds: B x N x H x W binary samples.
        modes, probabilities, mode_mask: the true distribution (see :func:`generalized_energy_distance_to_truth`).
        regions, region_probabilities, region_mask: optional B x L x H x W regions that raters include
            independently (the demo's lobes), their B x L inclusion probabilities and B x L bool mask.
        min_coverage: see :func:`region_inclusion_frequency`.

    Returns:
        ``{"ged": B, "mode_tv": B, "empty_error": B, "lobe_error": B (NaN for an image without regions),
        "frequencies": B x K}``, float64. ``mode_tv`` is ``Σ_k |f_k - p_k| / 2 + (1 - Σ_k f_k) / 2``:
        samples that match no mode count as misplaced mass.
    """
    overlaps = _overlaps(preds, modes, mode_mask)
    mode_mask = overlaps.rater_mask
    p = _check_probabilities(probabilities, modes, mode_mask)
    frequencies = sampled_mode_frequencies(preds, modes, mode_mask)
    mode_tv = 0.5 * ((frequencies - p).abs() * mode_mask).sum(1) + 0.5 * (1.0 - frequencies.sum(1))
    true_empty = (p * (~modes.flatten(2).any(2))).sum(1)
    scores = {
        "ged": generalized_energy_distance_to_truth(preds, modes, p, mode_mask),
        "mode_tv": mode_tv,
        "empty_error": (empty_fraction(preds) - true_empty).abs(),
        "lobe_error": torch.full_like(mode_tv, float("nan")),
        "frequencies": frequencies,
    }
    if regions is not None:
        if region_probabilities is None:
            raise ValueError("region_probabilities are needed with regions.")
        region_mask = check_rater_mask(region_mask, check_binary_stack(regions, "regions"))
        inclusion = region_inclusion_frequency(preds, regions, region_mask, min_coverage)
        q = torch.as_tensor(region_probabilities, device=inclusion.device).to(torch.float64)
        count = region_mask.sum(1)
        errors = ((inclusion - q).abs() * region_mask).sum(1) / count.clamp(min=1)
        scores["lobe_error"] = torch.where(count > 0, errors, scores["lobe_error"])
    return scores
