"""Validation and normalisation of metric inputs (sample stacks, rater stacks, rater masks).

Every metric accepts binary masks as ``bool`` or as ``{0, 1}`` integer/float tensors. These helpers check
shapes and values once, with messages that name the offending argument, and hand the metric code tensors in
a single canonical form so the arithmetic never has to care about the caller's dtype.
"""

from __future__ import annotations

import torch

__all__ = [
    "check_binary_stack",
    "check_probability_stack",
    "check_rater_mask",
    "check_same_geometry",
    "check_preds_and_raters",
]


def check_binary_stack(masks: torch.Tensor, name: str) -> torch.Tensor:
    """Check a B x K x H x W stack of binary masks and return it as ``bool``.

    Args:
        masks: B x K x H x W tensor, ``bool`` or numeric with values in {0, 1}.
        name: argument name used in error messages (``"preds"``, ``"raters"``).

    Returns:
        The same masks as a ``bool`` tensor (no copy when already ``bool``).
    """
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(masks).__name__}.")
    if masks.ndim != 4:
        raise ValueError(f"{name}: expected shape B x K x H x W (4 dims), got {tuple(masks.shape)}.")
    if masks.shape[0] == 0 or masks.shape[1] == 0 or masks.shape[2] * masks.shape[3] == 0:
        raise ValueError(f"{name}: every dimension must be non-empty, got {tuple(masks.shape)}.")
    if masks.dtype == torch.bool:
        return masks
    if masks.is_floating_point() and torch.isnan(masks).any():
        raise ValueError(f"{name}: contains NaN values; binary masks must hold only 0 and 1.")
    if not ((masks == 0) | (masks == 1)).all():
        bad = masks[(masks != 0) & (masks != 1)].flatten()[:3].tolist()
        raise ValueError(
            f"{name}: binary masks must hold only 0 and 1 (or be bool); found other values such as {bad}. "
            "Binarise samples first (a diffusion sample x0 in [-1, 1] is foreground where x0 > 0)."
        )
    return masks != 0


def check_probability_stack(maps: torch.Tensor, name: str, ndim: int) -> torch.Tensor:
    """Check a stack of probability maps in [0, 1] and return it as floating point (``bool`` -> float64).

    Args:
        maps: tensor with ``ndim`` dims whose values lie in [0, 1].
        name: argument name used in error messages.
        ndim: expected number of dims (3 for B x H x W soft maps, 4 for B x N x H x W sample stacks).
    """
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(maps).__name__}.")
    if maps.ndim != ndim:
        layout = "B x H x W" if ndim == 3 else "B x N x H x W"
        raise ValueError(f"{name}: expected shape {layout} ({ndim} dims), got {tuple(maps.shape)}.")
    if maps.numel() == 0:
        raise ValueError(f"{name}: is empty, got shape {tuple(maps.shape)}.")
    if not maps.is_floating_point():
        # bool / integer {0, 1} maps: float64 keeps the later threshold comparisons exact.
        maps = maps.to(torch.float64)
    if torch.isnan(maps).any():
        raise ValueError(f"{name}: contains NaN values.")
    if maps.min() < 0 or maps.max() > 1:
        raise ValueError(
            f"{name}: values must lie in [0, 1], got range [{maps.min().item():g}, {maps.max().item():g}]."
        )
    return maps


def check_same_geometry(preds: torch.Tensor, raters: torch.Tensor, preds_name: str = "preds") -> None:
    """Check that predictions and raters share batch size and H x W (sample and rater counts may differ)."""
    if preds.shape[0] != raters.shape[0]:
        raise ValueError(
            f"{preds_name} and raters have different batch sizes: {preds.shape[0]} vs {raters.shape[0]} "
            f"(shapes {tuple(preds.shape)} and {tuple(raters.shape)})."
        )
    if preds.shape[-2:] != raters.shape[-2:]:
        raise ValueError(
            f"{preds_name} and raters have different image sizes: {tuple(preds.shape[-2:])} vs "
            f"{tuple(raters.shape[-2:])}."
        )


def check_rater_mask(rater_mask: torch.Tensor | None, raters: torch.Tensor) -> torch.Tensor:
    """Return a B x M ``bool`` mask of real raters (all ``True`` when ``rater_mask`` is None).

    Args:
        rater_mask: optional B x M tensor (bool or {0, 1}); ``True`` marks a real rater, ``False`` a padding
            channel (datasets with a variable rater count pad the stack with empty masks).
        raters: the B x M x H x W rater stack it describes.
    """
    batch, num_raters = raters.shape[:2]
    if rater_mask is None:
        return torch.ones(batch, num_raters, dtype=torch.bool, device=raters.device)
    if not isinstance(rater_mask, torch.Tensor):
        rater_mask = torch.as_tensor(rater_mask)
    if tuple(rater_mask.shape) != (batch, num_raters):
        raise ValueError(
            f"rater_mask: expected shape B x M = {(batch, num_raters)} matching raters {tuple(raters.shape)}, "
            f"got {tuple(rater_mask.shape)}."
        )
    if rater_mask.dtype != torch.bool:
        if not ((rater_mask == 0) | (rater_mask == 1)).all():
            raise ValueError("rater_mask: must be boolean (or 0/1).")
        rater_mask = rater_mask != 0
    rater_mask = rater_mask.to(raters.device)
    without_rater = (~rater_mask.any(dim=1)).nonzero().flatten().tolist()
    if without_rater:
        raise ValueError(f"rater_mask: images at batch positions {without_rater} have no real rater.")
    return rater_mask


def check_preds_and_raters(
    preds: torch.Tensor, raters: torch.Tensor, rater_mask: torch.Tensor | None = None, raters_name: str = "raters"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check B x N x H x W binary predictions against B x M x H x W binary reference masks (raters, or a
    true distribution's modes) and their optional B x M mask; return ``(preds, raters, mask)`` as ``bool``."""
    preds = check_binary_stack(preds, "preds")
    raters = check_binary_stack(raters, raters_name)
    check_same_geometry(preds, raters)
    return preds, raters, check_rater_mask(rater_mask, raters)
