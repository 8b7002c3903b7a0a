"""Batched pairwise overlap statistics of two mask sets, from one Gram matrix.

For binary masks flattened to rows of 0/1 values, the Gram matrix ``X X^T`` holds every pairwise
intersection ``|A ∩ B|`` and, on its diagonal, every area ``|A|``. All pairwise quantities the metrics need
follow from these counts without touching the pixels again:

- union ``|A ∪ B| = |A| + |B| - |A ∩ B|``, IoU and Dice;
- the pixel variance of the difference map ``A - B`` (values -1, 0, 1) over P pixels:
  ``mean = (|A| - |B|) / P``, ``mean of squares = |A xor B| / P = (|A| + |B| - 2|A ∩ B|) / P``.

On CPU the products run on the masks' bytes directly (``torch._int_mm``: int8 inputs, exact int32
accumulation; one product per image, as no batched int8 product exists), which avoids converting the masks to
floating point at all. Elsewhere (GPU), or where that kernel is unavailable, a batched float32 product is used,
exact while P < 2**24 (larger images switch to float64). Ratios are formed in float64.

The per-pixel counts (how many predictions, how many real raters mark each pixel) are byte sums of the masks
(:func:`pixel_counts`), not products. Bit-packing the masks (8 or 64 pixels per word) and popcounting the AND
of every pair was measured slower than the int8 product on the project's AVX-512/AMX CPU: the packing pass
alone costs about half of the product (docs/metrics.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = [
    "MaskSetOverlaps",
    "iou_from_counts",
    "dice_from_counts",
    "difference_variance_from_counts",
    "masked_mean",
    "pixel_counts",
]

# float32 represents every integer below 2**24 exactly, so sums of 0/1 products stay exact below that size.
_FLOAT32_EXACT_COUNT = 2**24
# Images per matrix product: bounds the temporary float copy of the masks to roughly 16 MB.
_FLOAT_BUFFER_ELEMENTS = 4 * 2**20
# int32 accumulation of 0/1 products is exact below 2**31 pixels.
_INT32_EXACT_COUNT = 2**31


@lru_cache(maxsize=1)
def _int8_matmul_works() -> bool:
    """Whether this torch build has an exact CPU int8 x int8 -> int32 matrix product (``torch._int_mm``)."""
    try:
        a = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.int8)
        return bool(torch.equal(torch._int_mm(a, a.t()), torch.tensor([[2, 1], [1, 2]], dtype=torch.int32)))
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


def _gram_int8(preds: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """B x K x K int32 Gram matrix (K = N + M) of B x N x P / B x M x P bool masks, on the masks' bytes."""
    grams = []
    for image in range(preds.shape[0]):  # one product per image: there is no batched int8 product
        # joining one image's masks at a time stays in cache (a whole-batch concatenation does not);
        # bool -> int8 is a free reinterpretation
        rows = torch.cat([preds[image], raters[image]]).view(torch.int8)
        grams.append(torch._int_mm(rows, rows.t()))
    return torch.stack(grams)


def _gram_float(preds: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """Same as :func:`_gram_int8` with batched floating-point products (any device), in float32 or float64."""
    batch, num_preds, num_pixels = preds.shape
    num_masks = num_preds + raters.shape[1]
    dtype = torch.float32 if num_pixels < _FLOAT32_EXACT_COUNT else torch.float64
    chunk = max(1, _FLOAT_BUFFER_ELEMENTS // (num_masks * num_pixels))
    grams = []
    # Chunks of images (not pairs) bound the memory of the float copy.
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        block = torch.empty(stop - start, num_masks, num_pixels, dtype=dtype, device=preds.device)
        block[:, :num_preds] = preds[start:stop]
        block[:, num_preds:] = raters[start:stop]
        grams.append(torch.bmm(block, block.transpose(1, 2)))
    return torch.cat(grams)


def pixel_counts(
    preds: torch.Tensor, raters: torch.Tensor, rater_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel counts: (B x P predictions marking each pixel, B x P real raters marking each pixel).

    Args:
        preds: B x N x P bool predictions.
        raters: B x M x P bool rater masks.
        rater_mask: B x M bool real-rater mask (padding channels do not vote).

    Returns:
        Two B x P integer tensors, ``uint8`` while N and M stay below 256, else ``int32``.
    """
    # Summing the masks' bytes in uint8 needs no widening copy: one read of the masks, several times
    # faster than a sum into int32 / int64 (or the matrix product with a selector row that it replaces).
    small = max(preds.shape[1], raters.shape[1]) < 256
    dtype = torch.uint8 if small else torch.int32
    pred_count = preds.view(torch.uint8).sum(1, dtype=dtype)
    # multiplying by the 0/1 weight is much faster than a broadcast `&` on bool tensors
    real = rater_mask.view(torch.uint8)[:, :, None]
    rater_votes = (raters.view(torch.uint8) * real).sum(1, dtype=dtype)
    return pred_count, rater_votes


def iou_from_counts(intersection: torch.Tensor, area_a: torch.Tensor, area_b: torch.Tensor) -> torch.Tensor:
    """IoU ``|A ∩ B| / |A ∪ B|`` from counts (broadcasting); 1 when both masks are empty."""
    union = area_a + area_b - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def dice_from_counts(intersection: torch.Tensor, area_a: torch.Tensor, area_b: torch.Tensor) -> torch.Tensor:
    """Dice ``2|A ∩ B| / (|A| + |B|)`` from counts (broadcasting); 1 when both masks are empty."""
    total = area_a + area_b
    return torch.where(total > 0, 2 * intersection / total.clamp_min(1), torch.ones_like(total))


def difference_variance_from_counts(
    intersection: torch.Tensor, area_a: torch.Tensor, area_b: torch.Tensor, num_pixels: int
) -> torch.Tensor:
    """Population variance over pixels of the difference map ``A - B`` (values -1, 0, 1), from counts."""
    mean = (area_a - area_b) / num_pixels
    mean_of_squares = (area_a + area_b - 2 * intersection) / num_pixels
    return mean_of_squares - mean**2


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """Mean of ``values`` over ``dim`` counting only entries where ``mask`` is True (mask broadcasts)."""
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum(dim) / mask.sum(dim)


@dataclass
class MaskSetOverlaps:
    """Areas and pairwise intersections of predictions and raters for a batch of images.

    Attributes:
        pred_area: B x N foreground pixel counts of the predictions.
        rater_area: B x M foreground pixel counts of the raters.
        pred_pred: B x N x N intersections between predictions.
        rater_rater: B x M x M intersections between raters.
        pred_rater: B x N x M intersections between predictions (rows) and raters (columns).
        rater_mask: B x M bool, True for real raters (False marks padding channels).
        pred_count: B x P number of predictions marking each pixel (P = H * W).
        rater_votes: B x P number of real raters marking each pixel.
        num_pixels: H * W.
    Areas and intersections are float64; the per-pixel counts are small integers (``uint8`` below 256
    masks, see :func:`pixel_counts`) and are converted where used.
    """

    pred_area: torch.Tensor
    rater_area: torch.Tensor
    pred_pred: torch.Tensor
    rater_rater: torch.Tensor
    pred_rater: torch.Tensor
    rater_mask: torch.Tensor
    pred_count: torch.Tensor
    rater_votes: torch.Tensor
    num_pixels: int

    @classmethod
    def from_masks(cls, preds: torch.Tensor, raters: torch.Tensor, rater_mask: torch.Tensor) -> MaskSetOverlaps:
        """Compute all counts: one Gram matrix per image (or batch) and one byte sum per mask set.

        Args:
            preds: B x N x H x W bool predictions.
            raters: B x M x H x W bool rater masks.
            rater_mask: B x M bool real-rater mask.
        """
        batch, num_preds = preds.shape[:2]
        num_pixels = preds.shape[-2] * preds.shape[-1]
        preds, raters = preds.reshape(batch, num_preds, num_pixels), raters.reshape(batch, -1, num_pixels)
        # torch 2.13's CPU _int_mm returns uninitialised memory for a reduction length of 1 (1-pixel images)
        use_int8 = preds.device.type == "cpu" and 1 < num_pixels < _INT32_EXACT_COUNT and _int8_matmul_works()
        gram = (_gram_int8 if use_int8 else _gram_float)(preds, raters)
        pred_count, rater_votes = pixel_counts(preds, raters, rater_mask)
        return cls.from_gram(gram, pred_count, rater_votes, rater_mask, num_pixels)

    @classmethod
    def from_gram(
        cls,
        gram: torch.Tensor,
        pred_count: torch.Tensor,
        rater_votes: torch.Tensor,
        rater_mask: torch.Tensor,
        num_pixels: int,
    ) -> MaskSetOverlaps:
        """Split the B x (N + M) x (N + M) Gram matrix of ``[preds; raters]`` intersections into the blocks.

        Args:
            gram: B x (N + M) x (N + M) pairwise intersection counts (any numeric dtype); N is its size
                minus ``rater_mask``'s M.
            pred_count: B x P per-pixel count of the predictions covering each pixel.
            rater_votes: B x P per-pixel count of the real raters covering each pixel.
            rater_mask: B x M bool real-rater mask.
            num_pixels: P.
        """
        gram = gram.to(torch.float64)
        num_preds = gram.shape[-1] - rater_mask.shape[-1]
        area = torch.diagonal(gram, dim1=1, dim2=2)
        return cls(
            pred_area=area[:, :num_preds],
            rater_area=area[:, num_preds:],
            pred_pred=gram[:, :num_preds, :num_preds],
            rater_rater=gram[:, num_preds:, num_preds:],
            pred_rater=gram[:, :num_preds, num_preds:],
            rater_mask=rater_mask,
            pred_count=pred_count,
            rater_votes=rater_votes,
            num_pixels=num_pixels,
        )

    @property
    def pair_mask_rater_rater(self) -> torch.Tensor:
        """B x M x M bool: both raters of the pair are real."""
        return self.rater_mask[:, :, None] & self.rater_mask[:, None, :]

    def iou_pred_pred(self) -> torch.Tensor:
        """B x N x N IoU between predictions."""
        return iou_from_counts(self.pred_pred, self.pred_area[:, :, None], self.pred_area[:, None, :])

    def iou_rater_rater(self) -> torch.Tensor:
        """B x M x M IoU between raters (padding entries are meaningless; mask them)."""
        return iou_from_counts(self.rater_rater, self.rater_area[:, :, None], self.rater_area[:, None, :])

    def iou_pred_rater(self) -> torch.Tensor:
        """B x N x M IoU between predictions and raters."""
        return iou_from_counts(self.pred_rater, self.pred_area[:, :, None], self.rater_area[:, None, :])

    def dice_pred_rater(self) -> torch.Tensor:
        """B x N x M Dice between predictions and raters."""
        return dice_from_counts(self.pred_rater, self.pred_area[:, :, None], self.rater_area[:, None, :])

    def variance_pred_pred(self) -> torch.Tensor:
        """B x N x N pixel variance of the difference map of every prediction pair."""
        return difference_variance_from_counts(
            self.pred_pred, self.pred_area[:, :, None], self.pred_area[:, None, :], self.num_pixels
        )

    def variance_rater_rater(self) -> torch.Tensor:
        """B x M x M pixel variance of the difference map of every rater pair."""
        return difference_variance_from_counts(
            self.rater_rater, self.rater_area[:, :, None], self.rater_area[:, None, :], self.num_pixels
        )
