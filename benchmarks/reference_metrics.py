"""Straightforward per-pair NumPy reference of every metric in ``ambiseg_monai.metrics``.

Written the obvious way (loops over images, pairs, thresholds, raters and samples; one NumPy call per mask
pair) directly from the definitions in METHODS.md section 4 / docs/metrics.md. It is the ground truth of
the equivalence tests (tests/test_metrics_reference.py) and the "loop" side of benchmarks/metrics.py.

All functions take NumPy arrays: ``preds`` B x N x H x W, ``raters`` B x M x H x W (binary),
``rater_mask`` B x M bool or None, and return a float64 array of B per-image values.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment

QUBIQ_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CONSTANT_VARIANCE = 1e-10  # same "constant map" rule as ambiseg_monai.metrics.ncc


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2 * np.logical_and(a, b).sum() / total


def _real_raters(raters: np.ndarray, rater_mask: np.ndarray | None, b: int) -> list[np.ndarray]:
    return [raters[b, j] for j in range(raters.shape[1]) if rater_mask is None or rater_mask[b, j]]


def _mean_pair_distance(set_a: list, set_b: list, skip_same_index: bool) -> float:
    distances = [
        1 - iou(a, b) for i, a in enumerate(set_a) for j, b in enumerate(set_b) if not (skip_same_index and i == j)
    ]
    return float(np.mean(distances)) if distances else 0.0


def generalized_energy_distance(preds, raters, unbiased=False, rater_mask=None) -> np.ndarray:
    preds, raters = preds.astype(bool), raters.astype(bool)
    out = []
    for b in range(preds.shape[0]):
        samples, gts = list(preds[b]), _real_raters(raters, rater_mask, b)
        cross = _mean_pair_distance(samples, gts, skip_same_index=False)
        within_samples = _mean_pair_distance(samples, samples, skip_same_index=unbiased)
        within_gts = _mean_pair_distance(gts, gts, skip_same_index=unbiased)
        out.append(2 * cross - within_samples - within_gts)
    return np.array(out)


def sample_diversity(preds, unbiased=False) -> np.ndarray:
    preds = preds.astype(bool)
    return np.array([_mean_pair_distance(list(p), list(p), skip_same_index=unbiased) for p in preds])


def _variance_extremes(masks: list, include_self_pairs: bool) -> tuple[float, float]:
    variances = [
        np.var(masks[i].astype(np.float64) - masks[j].astype(np.float64))
        for i in range(len(masks))
        for j in range(len(masks))
        if (i <= j if include_self_pairs else i < j)
    ]
    return (min(variances), max(variances)) if variances else (0.0, 0.0)


def collective_insight(preds, raters, include_self_pairs=False, harmonic=False, rater_mask=None) -> dict:
    preds, raters = preds.astype(bool), raters.astype(bool)
    out = {"combined_sensitivity": [], "dmax": [], "diversity_agreement": [], "ci": []}
    for b in range(preds.shape[0]):
        samples, gts = list(preds[b]), _real_raters(raters, rater_mask, b)
        pred_union = np.logical_or.reduce(samples)
        gt_union = np.logical_or.reduce(gts)
        tp = np.logical_and(pred_union, gt_union).sum()
        fn = np.logical_and(~pred_union, gt_union).sum()
        sensitivity = 1.0 if tp + fn == 0 else tp / (tp + fn)
        dice_matching = np.mean([max(dice(p, g) for p in samples) for g in gts])
        gt_min, gt_max = _variance_extremes(gts, include_self_pairs)
        pred_min, pred_max = _variance_extremes(samples, include_self_pairs)
        agreement = 1 - (abs(gt_max - pred_max) + abs(gt_min - pred_min)) / 2
        parts = (sensitivity, dice_matching, agreement)
        if harmonic:
            ci = 0.0 if min(parts) == 0 else 3 / sum(1 / x for x in parts)
        else:
            ci = 0.0 if sum(parts) == 0 else 3 * sensitivity * dice_matching * agreement / sum(parts)
        for key, value in zip(out, (*parts, ci)):
            out[key].append(value)
    return {k: np.array(v, dtype=np.float64) for k, v in out.items()}


def _mean_cross_pair(score, preds, raters, rater_mask) -> np.ndarray:
    preds, raters = preds.astype(bool), raters.astype(bool)
    out = []
    for b in range(len(preds)):
        out.append(np.mean([score(p, g) for p in preds[b] for g in _real_raters(raters, rater_mask, b)]))
    return np.array(out)


def cross_pair_dice(preds, raters, rater_mask=None) -> np.ndarray:
    return _mean_cross_pair(dice, preds, raters, rater_mask)


def cross_pair_iou(preds, raters, rater_mask=None) -> np.ndarray:
    return _mean_cross_pair(iou, preds, raters, rater_mask)


def hungarian_matched_iou(preds, raters, rater_mask=None) -> np.ndarray:
    preds, raters = preds.astype(bool), raters.astype(bool)
    out = []
    for b in range(preds.shape[0]):
        samples, gts = list(preds[b]), _real_raters(raters, rater_mask, b)
        size = math.lcm(len(samples), len(gts))
        samples = [s for s in samples for _ in range(size // len(samples))]  # np.repeat order
        gts = [g for g in gts for _ in range(size // len(gts))]
        cost = np.array([[1 - iou(s, g) for g in gts] for s in samples])
        rows, cols = linear_sum_assignment(cost)
        out.append(np.mean(1 - cost[rows, cols]))
    return np.array(out)


def soft_dice(pred_soft, raters, thresholds=QUBIQ_THRESHOLDS, rater_mask=None, smooth=1e-6) -> np.ndarray:
    raters = raters.astype(bool)
    out = []
    for b in range(pred_soft.shape[0]):
        gts = _real_raters(raters, rater_mask, b)
        gt_soft = np.sum([g.astype(np.float64) for g in gts], axis=0) / len(gts)
        scores = []
        for t in thresholds:
            # compare each map with the threshold in the map's own dtype (see ambiseg_monai.metrics.soft_dice)
            a = pred_soft[b] >= np.asarray(t, dtype=pred_soft.dtype)
            g = gt_soft >= t
            scores.append((2 * np.logical_and(a, g).sum() + smooth) / (a.sum() + g.sum() + smooth))
        out.append(np.mean(scores))
    return np.array(out)


def _pixel_cross_entropy(target: np.ndarray, prob: np.ndarray, eps: float) -> np.ndarray:
    """PHiSeg's pixel_wise_xent for the two classes (background, foreground)."""
    return -(target * np.log(prob + eps) + (1 - target) * np.log(1 - prob + eps))


def _ncc(a: np.ndarray, v: np.ndarray) -> float:
    a, v = a.ravel(), v.ravel()
    a_const, v_const = np.var(a) <= CONSTANT_VARIANCE, np.var(v) <= CONSTANT_VARIANCE
    if a_const or v_const:
        return float(a_const and v_const)
    return float(np.mean((a - a.mean()) * (v - v.mean())) / (np.std(a) * np.std(v)))


def s_ncc(preds_or_probs, raters, rater_mask=None, eps=1e-8) -> np.ndarray:
    raters = raters.astype(np.float64)
    out = []
    for b in range(preds_or_probs.shape[0]):
        samples = [s.astype(np.float64) for s in preds_or_probs[b]]
        gts = _real_raters(raters, None if rater_mask is None else rater_mask, b)
        mean_seg = np.mean(samples, axis=0)
        e_ss = np.mean([_pixel_cross_entropy(mean_seg, s, eps) for s in samples], axis=0)
        nccs = []
        for g in gts:
            e_sy = np.mean([_pixel_cross_entropy(g, s, eps) for s in samples], axis=0)
            nccs.append(_ncc(e_ss, e_sy))
        out.append(np.mean(nccs))
    return np.array(out)


def relative_area_filter(preds, r=0.5) -> np.ndarray:
    out = preds.copy()
    for b in range(preds.shape[0]):
        areas = [np.count_nonzero(s) for s in preds[b]]
        for i, area in enumerate(areas):
            if area < r * max(areas):
                out[b, i] = 0
    return out


def all_metrics(preds, raters, rater_mask=None) -> dict[str, np.ndarray]:
    """Every metric with default options, named as ``ambiseg_monai.metrics.METRIC_NAMES``."""
    ci = collective_insight(preds, raters, rater_mask=rater_mask)
    return {
        "ged": generalized_energy_distance(preds, raters, rater_mask=rater_mask),
        "sample_diversity": sample_diversity(preds),
        **ci,
        "soft_dice": soft_dice(preds.astype(np.float64).mean(1), raters, rater_mask=rater_mask),
        "hm_iou": hungarian_matched_iou(preds, raters, rater_mask=rater_mask),
        "cross_pair_dice": cross_pair_dice(preds, raters, rater_mask=rater_mask),
        "cross_pair_iou": cross_pair_iou(preds, raters, rater_mask=rater_mask),
        "s_ncc": s_ncc(preds, raters, rater_mask=rater_mask),
    }
