"""S_NCC of PHiSeg (Baumgartner et al., MICCAI 2019): does the predicted uncertainty sit where raters disagree?

With per-pixel cross-entropy ``CE(q, p) = -(q log(p + ε) + (1 - q) log(1 - p + ε))`` (ε = 1e-8 as in PHiSeg):

- ``E_ss = mean_i CE(mean_i' p_i', p_i)``: the samples' mean cross-entropy against their own mean map;
- ``E_sy_j = mean_i CE(y_j, p_i)``: the expected cross-entropy of the samples against rater j;
- ``S_NCC = mean_j NCC(E_ss, E_sy_j)`` with NCC the Pearson correlation over pixels.

Both maps are affine in the target: with ``L1 = mean_i log(p_i + ε)``, ``L0 = mean_i log(1 - p_i + ε)`` and
``D = L1 - L0`` one has ``E_ss = -(L0 + m D)`` (m the mean sample) and ``E_sy_j = -(L0 + y_j D)``. So every
mean, variance and covariance needed for all raters comes from a few per-pixel maps and one batched product
with the rater masks, never from a rater x sample loop. For binary samples L1 and L0 only depend on the count
of foreground samples per pixel.

Constant maps (no spread, variance <= 1e-10) make the correlation undefined (PHiSeg returns NaN). We define
NCC = 1 when both maps are constant (the samples agree with each other and with the rater everywhere: no
uncertainty predicted, none needed) and 0 when only one is constant.
"""

from __future__ import annotations

import math

import torch

from ambiseg_monai.metrics.inputs import (
    check_binary_stack,
    check_probability_stack,
    check_rater_mask,
    check_same_geometry,
)
from ambiseg_monai.metrics.pairwise import masked_mean

__all__ = [
    "s_ncc",
    "s_ncc_from_log_maps",
    "s_ncc_from_counts",
    "sample_log_maps",
    "sample_log_maps_from_counts",
    "rater_level_histogram",
    "CONSTANT_VARIANCE",
]

# Below this pixel variance (nats^2) a cross-entropy map counts as constant. Non-constant maps of binary
# samples have variance >= (|log ε| / N)^2 / P, far above it; rounding noise of the moment formulas is ~1e-13.
CONSTANT_VARIANCE = 1e-10
_FLOAT64_BUFFER_ELEMENTS = 8 * 2**20


def sample_log_maps_from_counts(
    foreground_count: torch.Tensor, num_samples: int, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, L1, L0), each B x P float64, for binary samples given the per-pixel foreground count (B x P)."""
    count = foreground_count.to(torch.float64)
    log_hit, log_miss = math.log(1 + eps), math.log(eps)
    mean_map = count / num_samples
    log_fg = (count * log_hit + (num_samples - count) * log_miss) / num_samples
    log_bg = ((num_samples - count) * log_hit + count * log_miss) / num_samples
    return mean_map, log_fg, log_bg


def sample_log_maps(samples: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, L1, L0), each B x P float64, for B x N x H x W samples (binary or foreground probabilities)."""
    if samples.dtype == torch.bool or bool(((samples == 0) | (samples == 1)).all()):
        return sample_log_maps_from_counts((samples != 0).flatten(2).sum(1), samples.shape[1], eps)
    probs = samples.flatten(2).to(torch.float64)
    return probs.mean(1), torch.log(probs + eps).mean(1), torch.log(1 - probs + eps).mean(1)


def _rater_products(raters: torch.Tensor, pixel_maps: torch.Tensor) -> torch.Tensor:
    """B x M x K sums ``Σ_p y_j(p) f_k(p)`` for B x M x P bool raters and B x P x K float64 maps."""
    batch, num_raters, num_pixels = raters.shape
    chunk = max(1, _FLOAT64_BUFFER_ELEMENTS // (num_raters * num_pixels))
    blocks = [
        torch.bmm(raters[s : s + chunk].to(torch.float64), pixel_maps[s : s + chunk]) for s in range(0, batch, chunk)
    ]
    return torch.cat(blocks, dim=0)


def s_ncc_from_log_maps(
    mean_map: torch.Tensor,
    log_fg: torch.Tensor,
    log_bg: torch.Tensor,
    raters: torch.Tensor,
    rater_mask: torch.Tensor,
) -> torch.Tensor:
    """B S_NCC values from the sample maps (m, L1, L0: B x P) and B x M x H x W bool raters."""
    num_pixels = mean_map.shape[1]
    diff = log_fg - log_bg
    bg_centred = log_bg - log_bg.mean(1, keepdim=True)
    # Sign dropped: Pearson(-X, -Y) = Pearson(X, Y).
    self_map = log_bg + mean_map * diff
    self_centred = self_map - self_map.mean(1, keepdim=True)
    self_var = (self_centred**2).mean(1)  # B

    pixel_maps = torch.stack([diff, diff**2, bg_centred * diff, self_centred * diff], dim=-1)
    sums = _rater_products(raters.flatten(2), pixel_maps) / num_pixels  # B x M x 4
    mean_d, mean_d2, mean_bgc_d, mean_selfc_d = sums.unbind(-1)
    # Var(L0 + y D) = Var(L0) + 2 E[L0c y D] + E[y D^2] - E[y D]^2  (y binary, so y^2 = y)
    rater_var = (bg_centred**2).mean(1, keepdim=True) + 2 * mean_bgc_d + mean_d2 - mean_d**2
    # Cov(X_ss, L0 + y D) = E[X_ss,c L0] + E[X_ss,c y D]
    cov = (self_centred * log_bg).mean(1, keepdim=True) + mean_selfc_d

    return _mean_ncc_from_moments(self_var, rater_var, cov, rater_mask)


def _mean_ncc_from_moments(
    self_var: torch.Tensor, rater_var: torch.Tensor, cov: torch.Tensor, rater_mask: torch.Tensor
) -> torch.Tensor:
    """Mean over real raters of the Pearson correlation, with the constant-map convention (B x M inputs)."""
    self_constant = (self_var <= CONSTANT_VARIANCE)[:, None]
    rater_constant = rater_var <= CONSTANT_VARIANCE
    denom = (self_var[:, None] * rater_var).clamp_min(CONSTANT_VARIANCE**2).sqrt()
    ncc = (cov / denom).clamp(-1, 1)
    ncc = torch.where(self_constant | rater_constant, (self_constant & rater_constant).to(ncc.dtype), ncc)
    return masked_mean(ncc, rater_mask, dim=1)


# Raters folded into one byte per pixel: 2**8 patterns per count level keep the histogram small.
_RATERS_PER_PATTERN = 8


def rater_level_histogram(
    pred_count: torch.Tensor, levels: int, raters: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Histograms of the per-pixel sample count k over every rater's foreground and over all pixels.

    Raters are taken in groups of up to 8: each pixel's group pattern ``Σ_t y_t 2^t`` is one byte, and one
    ``bincount`` of (image, k, pattern) per group gives every rater's histogram (sum over the patterns with
    its bit set). One pass over B x P indices per group instead of one per rater.

    Args:
        pred_count: B x P integer count k in 0..levels-1 of foreground samples per pixel.
        levels: N + 1.
        raters: B x M x P bool rater masks.

    Returns:
        ``on_rater`` B x M x levels float64 (pixels with count k on rater j's foreground) and ``per_level``
        B x levels float64 (pixels with count k).
    """
    batch, num_raters, num_pixels = raters.shape
    device = raters.device
    image = torch.arange(batch, device=device)[:, None]
    groups = []
    for first in range(0, num_raters, _RATERS_PER_PATTERN):
        group = raters[:, first : first + _RATERS_PER_PATTERN].view(torch.uint8)
        width = group.shape[1]
        weights = (2 ** torch.arange(width, device=device)).to(torch.uint8)
        pattern = (group * weights[None, :, None]).sum(1, dtype=torch.uint8)  # B x P, one byte per pixel
        num_bins = batch * levels * 2**width
        # int32 indices are several times faster to build (and to count) than int64 ones
        index_dtype = torch.int32 if num_bins < 2**31 else torch.int64
        index = pred_count.to(index_dtype, copy=True)  # built in place in one B x P buffer
        index += (image * levels).to(index_dtype)
        index *= 2**width
        index += pattern
        histogram = torch.bincount(index.flatten(), minlength=num_bins).view(batch, levels, 2**width)
        bits = (torch.arange(2**width, device=device)[:, None] >> torch.arange(width, device=device)) & 1
        # B x levels x 2^w @ 2^w x w -> B x w x levels: the pixels of each level on each rater
        groups.append((histogram.to(torch.float64) @ bits.to(torch.float64)).transpose(1, 2))
    per_level = histogram.sum(-1).to(torch.float64)  # every group covers all pixels
    return torch.cat(groups, dim=1), per_level


def s_ncc_from_counts(
    pred_count: torch.Tensor,
    num_samples: int,
    raters: torch.Tensor,
    rater_mask: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """B S_NCC values for binary samples, from the per-pixel count of foreground samples (B x P).

    For binary samples every per-pixel map (m, L1, L0, D, E_ss) is a function of the count k in 0..N, so all
    moments follow from the histogram of k per image and, per rater, the histogram of k over the rater's
    foreground: O(P) counting instead of float64 maps.
    """
    batch, num_pixels = pred_count.shape
    levels = num_samples + 1
    device = pred_count.device
    on_rater, per_level = rater_level_histogram(pred_count, levels, raters.flatten(2))

    mean_map, log_fg, log_bg = sample_log_maps_from_counts(
        torch.arange(levels, dtype=torch.float64, device=device)[None], num_samples, eps
    )  # each 1 x (N+1): the value of the per-pixel maps at count k
    diff = log_fg - log_bg
    self_map = log_bg + mean_map * diff
    bg_centred = log_bg - (per_level * log_bg).sum(1, keepdim=True) / num_pixels  # B x (N+1)
    self_centred = self_map - (per_level * self_map).sum(1, keepdim=True) / num_pixels
    self_var = (per_level * self_centred**2).sum(1) / num_pixels

    def rater_mean(level_values: torch.Tensor) -> torch.Tensor:
        """B x M mean over pixels of ``y_j * f(k)`` for a per-level function f (1 or B x (N+1))."""
        return (on_rater * level_values.expand(batch, levels)[:, None, :]).sum(-1) / num_pixels

    mean_d, mean_d2 = rater_mean(diff), rater_mean(diff**2)
    rater_var = (per_level * bg_centred**2).sum(1, keepdim=True) / num_pixels
    rater_var = rater_var + 2 * rater_mean(bg_centred * diff) + mean_d2 - mean_d**2
    cov = (per_level * self_centred * log_bg).sum(1, keepdim=True) / num_pixels + rater_mean(self_centred * diff)
    return _mean_ncc_from_moments(self_var, rater_var, cov, rater_mask)


def s_ncc(
    preds_or_probs: torch.Tensor,
    raters: torch.Tensor,
    rater_mask: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """PHiSeg's S_NCC of each image.

    Args:
        preds_or_probs: B x N x H x W binary samples or per-sample foreground probabilities in [0, 1].
        raters: B x M x H x W binary rater masks.
        rater_mask: optional B x M bool marking real raters (the average runs over those).
        eps: the ε inside ``log(p + ε)``.

    Returns:
        B float64 tensor in [-1, 1] (higher is better).
    """
    samples = check_probability_stack(preds_or_probs, "preds_or_probs", ndim=4)
    raters = check_binary_stack(raters, "raters")
    check_same_geometry(samples, raters, "preds_or_probs")
    mask = check_rater_mask(rater_mask, raters)
    if bool(((samples == 0) | (samples == 1)).all()):  # binary samples: histogram path
        return s_ncc_from_counts(samples.flatten(2).sum(1), samples.shape[1], raters, mask, eps)
    return s_ncc_from_log_maps(*sample_log_maps(samples, eps), raters, mask)
