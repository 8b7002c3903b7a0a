"""Consensus-diffusion post-processing: per-level generations -> per-level maps -> the soft consensus map.

Amit et al. (MICCAI 2023), Alg. 2 and "Employing multiple generations": for every consensus level
c = 1..C the reverse chain is run G times ("generations"); the G results of a level are averaged,
and the soft consensus map is the mean of the C level maps. If every level map were perfect,
``mean_c M^c`` is the fraction of raters marking each pixel, the QUBIQ soft ground truth.

Averaging rules (:func:`average_generations`, :func:`combine_consensus_samples`):

- plain: ``level_map_c = mean_g sample_{c,g}``; ``soft = mean_c level_map_c``;
- majority vote (the authors' code, ``x.mean(0).round()``): each level's average is rounded first,
  ``level_map_c = 1[mean_g sample_{c,g} > 0.5]`` (a tie at exactly 0.5 rounds to 0, as ``torch.round``
  does), so ``soft`` takes values k / C.

The per-level binary masks ``1[mean_g sample_{c,g} > 0.5]`` are exposed as ``"pred"``: C plausible
masks from the most liberal (c = 1, the union) to the most conservative (c = C, the intersection),
the set GED / CI are computed on.

The same machinery serves the ablations: "annotator" (the C slots are rater ids instead of levels),
"no annotator" (C unconditional slots) and "soft label" (unconditional slots whose samples are the
regressed soft maps, ``sample_values="continuous"``, no rounding).

Sampling is the one N-sample inferer's (:class:`~ambiseg_monai.inferers.DiffusionSamplingInferer`) with
N = G x C samples per image, sample ``n = g * C + c`` labelled with slot c
(:func:`consensus_sample_labels`), and :class:`CombineConsensusSamples` as its post-processing;
:class:`~ambiseg_monai.inferers.consensus.ConsensusSamplingInferer` is that configuration under one name.
:class:`UnpackPredictiond` moves its dict prediction to the top level of the evaluator's output.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = [
    "average_generations",
    "consensus_soft_map",
    "combine_consensus_samples",
    "consensus_sample_labels",
    "CombineConsensusSamples",
    "UnpackPredictiond",
]


def _check_samples(samples: torch.Tensor) -> torch.Tensor:
    if samples.ndim != 5:
        raise ValueError(
            f"consensus samples must be B x C x G x H x W (images, levels, generations, height, width), "
            f"got shape {tuple(samples.shape)}."
        )
    if samples.shape[1] < 1 or samples.shape[2] < 1:
        raise ValueError(f"consensus samples need at least one level and one generation, got {tuple(samples.shape)}.")
    samples = samples.float()
    if bool(torch.isnan(samples).any()) or float(samples.min()) < 0.0 or float(samples.max()) > 1.0:
        raise ValueError("consensus samples must be masks or soft maps with values in [0, 1] (no NaN).")
    return samples


def average_generations(samples: torch.Tensor, majority_vote: bool = False) -> torch.Tensor:
    """Per-level average over generations: B x C x G x H x W in [0, 1] -> B x C x H x W.

    With ``majority_vote`` the average is rounded (``> 0.5``; ties round to 0), as in the authors' code.
    """
    mean = _check_samples(samples).mean(dim=2)
    return (mean > 0.5).float() if majority_vote else mean


def consensus_soft_map(level_maps: torch.Tensor) -> torch.Tensor:
    """Mean over levels: B x C x H x W -> the soft consensus map B x H x W."""
    if level_maps.ndim != 4:
        raise ValueError(f"level maps must be B x C x H x W, got shape {tuple(level_maps.shape)}.")
    return level_maps.float().mean(dim=1)


def combine_consensus_samples(samples: torch.Tensor, majority_vote: bool = False) -> dict[str, torch.Tensor]:
    """All inference outputs from the per-level generations.

    Args:
        samples: B x C x G x H x W, binary masks (or soft maps) in [0, 1].
        majority_vote: round each level's average before averaging the levels.

    Returns:
        ``{"pred": B x C x H x W binary per-level masks (strict majority over generations),
        "level_maps": B x C x H x W per-level maps that are averaged (rounded with majority_vote),
        "pred_soft": B x H x W soft consensus map}``.
    """
    mean = _check_samples(samples).mean(dim=2)
    masks = (mean > 0.5).float()
    level_maps = masks if majority_vote else mean
    return {"pred": masks, "level_maps": level_maps, "pred_soft": consensus_soft_map(level_maps)}


def consensus_sample_labels(num_levels: int, num_generations: int) -> list[int]:
    """The slot of each of the G x C samples of an image: sample ``n = g * C + c`` is slot c.

    So a mask's seed index (n) does not depend on G: raising G only adds generations.
    """
    return list(range(int(num_levels))) * int(num_generations)


class CombineConsensusSamples:
    """Post-processing of the N-sample inferer: B x (G C) x H x W samples -> the consensus outputs.

    Sample ``n = g * C + c`` of an image is generation g of slot c (see :func:`consensus_sample_labels`).

    Args:
        num_levels: C.
        majority_vote: round each level's average over generations before averaging levels.
        return_samples: include the B x C x G x H x W ``"samples"``.

    ``__call__(samples)`` returns :func:`combine_consensus_samples`' dict (plus ``"samples"``).
    """

    def __init__(self, num_levels: int, majority_vote: bool = True, return_samples: bool = True) -> None:
        if int(num_levels) < 1:
            raise ValueError(f"num_levels must be >= 1 (the dataset's rater count), got {num_levels}.")
        self.num_levels = int(num_levels)
        self.majority_vote = bool(majority_vote)
        self.return_samples = bool(return_samples)

    def __call__(self, samples: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, count = samples.shape[:2]
        if count % self.num_levels:
            raise ValueError(
                f"{count} samples per image are not a whole number of generations of {self.num_levels} levels."
            )
        grouped = samples.reshape(batch, count // self.num_levels, self.num_levels, *samples.shape[2:])
        by_level = grouped.transpose(1, 2).contiguous()  # B x C x G x H x W
        result = combine_consensus_samples(by_level, self.majority_vote)
        if self.return_samples:
            result["samples"] = by_level
        return result


class UnpackPredictiond(MapTransform):
    """Evaluator post-processing: move the entries of a dict prediction to the top level of the output.

    :class:`~ambiseg_monai.inferers.consensus.ConsensusSamplingInferer` returns a dict, which
    ``SupervisedEvaluator`` stores under ``output["pred"]``; metric and image handlers read
    ``output["pred"]`` (the B x C x H x W level masks) and ``output["pred_soft"]`` (the soft map). This
    replaces ``output[key]`` by ``output[key][key]`` and copies every other entry of the dict next to it.
    (MONAI's ``FlattenSubKeysd`` refuses an entry with the name of the flattened key itself.) A
    prediction that is not a dict is left as it is.

    Args:
        keys: output key(s) holding the inferer's dict (default ``"pred"``).
        overwrite: allow an entry to replace an existing output key other than ``key``.
    """

    def __init__(self, keys: KeysCollection = "pred", overwrite: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.overwrite = overwrite

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            prediction = d[key]
            if not isinstance(prediction, Mapping):
                continue
            if key not in prediction:
                raise KeyError(
                    f"the dict prediction under '{key}' has no '{key}' entry; entries: {sorted(prediction)}."
                )
            for name, value in prediction.items():
                if name != key and name in d and not self.overwrite:
                    raise KeyError(f"prediction entry '{name}' would overwrite the existing output key '{name}'.")
                d[name] = value
        return d
