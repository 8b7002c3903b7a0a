"""Consensus-diffusion inference: per-level generations -> per-level maps -> the soft consensus map.

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
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from ambiseg_monai.diffusion.sampler import autocast_dtype_from_name, make_generators, reverse_diffusion
from ambiseg_monai.engines.inferers import PerImageSeedingInferer
from ambiseg_monai.networks.denoisers import unwrap_network

__all__ = [
    "average_generations",
    "consensus_soft_map",
    "combine_consensus_samples",
    "ConsensusSamplingInferer",
    "UnpackPredictiond",
]

SAMPLE_VALUES = ("binary", "continuous")


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


class ConsensusSamplingInferer(PerImageSeedingInferer):
    """Soft consensus maps by reverse diffusion: ``__call__(inputs, network) -> dict`` (see below).

    For each image, C slots (consensus levels, or rater ids / unconditional slots in the ablations) x
    G generations are sampled. The image is encoded once (``network.encode_condition``); all
    B x G x C masks run as one network batch per reverse step (``max_rows`` splits it). Every mask
    has its own generator seeded from (seed, image key, g * C + c), so a mask does not depend on the
    batching nor on G: raising G only adds generations, and the first g generations of a run are
    exactly a run with G = g (what the soft-Dice-vs-generations curve relies on).

    Args:
        scheduler: a scheduler following :mod:`ambiseg_monai.diffusion.schedulers`' protocol.
        num_levels: C, the number of slots (the model's level / rater embedding size).
        num_generations: G (25 in the paper).
        num_inference_steps: respaced number of reverse steps (None: the scheduler's current timesteps).
        seed: base seed of the per-mask generators.
        conditioned: pass slot c as ``class_labels`` (0-based); False for unconditional networks
            ("no annotator", "soft label").
        majority_vote: round each level's average over generations before averaging levels (the
            authors' code). Default True: it produced the paper's numbers.
        sample_values: ``"binary"`` (``x_0 > threshold``, the project's convention) or ``"continuous"``
            (``(x_0 + 1) / 2`` clamped to [0, 1]: what the authors' code averages, and what the
            "soft label" ablation must use since it regresses a soft map).
        mask_channels: channels of one diffused mask (1).
        threshold: binarisation threshold of ``x_0`` in [-1, 1] for ``"binary"`` samples.
        max_rows: most masks per network call (None: all B x C x G at once).
        return_samples: include the B x C x G x H x W ``"samples"`` (needed by the generation curve).
        progress: show a progress bar over the reverse steps.
        autocast_dtype: "bfloat16" or "float16": run the network calls under ``torch.autocast`` (on a
            CPU with native bf16, bf16 is 2-3x faster at no measured GED cost, see docs/benchmarks.md);
            None: float32 unless an enclosing autocast (an evaluator's ``amp``) applies.

    ``__call__(inputs, network, image_ids=None)``: ``inputs`` B x C_img x H x W; ``image_ids`` B case ids
    or dataset positions (default: a running count, see :meth:`reset_counter`). Returns
    ``{"pred": B x C x H x W per-level binary masks, "pred_soft": B x H x W, "level_maps": B x C x H x W,
    "samples": B x C x G x H x W}`` (see :func:`combine_consensus_samples`); in an evaluator, unpack it
    with :class:`UnpackPredictiond` as post-processing.
    """

    def __init__(
        self,
        scheduler,
        num_levels: int,
        num_generations: int = 25,
        num_inference_steps: int | None = None,
        seed: int = 0,
        conditioned: bool = True,
        majority_vote: bool = True,
        sample_values: str = "binary",
        mask_channels: int = 1,
        threshold: float = 0.0,
        max_rows: int | None = None,
        return_samples: bool = True,
        progress: bool = False,
        autocast_dtype: str | None = None,
    ) -> None:
        super().__init__()
        if int(num_levels) < 1:
            raise ValueError(f"num_levels must be >= 1 (the dataset's rater count), got {num_levels}.")
        if int(num_generations) < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}.")
        if max_rows is not None and int(max_rows) < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}.")
        if sample_values not in SAMPLE_VALUES:
            raise ValueError(f"sample_values must be one of {SAMPLE_VALUES}, got {sample_values!r}.")
        self.scheduler = scheduler
        self.num_levels = int(num_levels)
        self.num_generations = int(num_generations)
        self.num_inference_steps = num_inference_steps
        self.seed = int(seed)
        self.conditioned = bool(conditioned)
        self.majority_vote = bool(majority_vote)
        self.sample_values = sample_values
        self.mask_channels = int(mask_channels)
        self.threshold = float(threshold)
        self.max_rows = None if max_rows is None else int(max_rows)
        self.return_samples = bool(return_samples)
        self.progress = progress
        self.autocast_dtype = autocast_dtype_from_name(autocast_dtype)

    def _to_values(self, x0: torch.Tensor) -> torch.Tensor:
        """rows x mask_channels x H x W in [-1, 1] -> rows x H x W in [0, 1] (first mask channel)."""
        if self.sample_values == "binary":
            return (x0[:, 0] > self.threshold).float()
        return ((x0[:, 0].float() + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        *args,
        image_ids: Sequence | None = None,
        **kwargs,
    ) -> dict[str, torch.Tensor]:
        if inputs.ndim != 4:
            raise ValueError(f"inputs must be images B x C x H x W, got shape {tuple(inputs.shape)}.")
        batch, levels, generations = inputs.shape[0], self.num_levels, self.num_generations
        per_image = levels * generations
        keys = self._image_keys(batch, image_ids)
        # row r of image b is generation g = r // C at slot c = r % C: a mask's seed index g * C + c
        # does not depend on G
        generators = make_generators(self.seed, keys, per_image)
        cond = unwrap_network(network).encode_condition(inputs)  # once per image, reused at every step
        rows = batch * per_image
        image_of_row = torch.arange(batch, device=inputs.device).repeat_interleave(per_image)
        slot_of_row = torch.arange(levels, device=inputs.device).repeat(batch * generations)
        if self.num_inference_steps is not None:
            self.scheduler.set_timesteps(int(self.num_inference_steps))  # CPU timesteps: no device read per step
        sample_shape = (self.mask_channels, *inputs.shape[2:])
        reference = inputs if inputs.is_floating_point() else inputs.float()
        chunk = self.max_rows or rows
        pieces = []
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            x0 = reverse_diffusion(
                network,
                self.scheduler,
                cond.index_select(0, image_of_row[part]),
                sample_shape,
                generators[part],
                class_labels=slot_of_row[part] if self.conditioned else None,
                progress=self.progress,
                reference=reference,
                autocast_dtype=self.autocast_dtype,
            )
            pieces.append(self._to_values(x0))
        values = torch.cat(pieces).reshape(batch, generations, levels, *inputs.shape[2:])
        samples = values.transpose(1, 2).contiguous()  # B x C x G x H x W
        result = combine_consensus_samples(samples, self.majority_vote)
        if self.return_samples:
            result["samples"] = samples
        return result


class UnpackPredictiond(MapTransform):
    """Evaluator post-processing: move the entries of a dict prediction to the top level of the output.

    :class:`ConsensusSamplingInferer` returns a dict, which ``SupervisedEvaluator`` stores under
    ``output["pred"]``; metric and image handlers read ``output["pred"]`` (the B x C x H x W level masks)
    and ``output["pred_soft"]`` (the soft map). This replaces ``output[key]`` by ``output[key][key]`` and
    copies every other entry of the dict next to it. (MONAI's ``FlattenSubKeysd`` refuses an entry with
    the name of the flattened key itself.) A prediction that is not a dict is left as it is.

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
                raise KeyError(f"the dict prediction under '{key}' has no '{key}' entry; entries: {sorted(prediction)}.")
            for name, value in prediction.items():
                if name != key and name in d and not self.overwrite:
                    raise KeyError(f"prediction entry '{name}' would overwrite the existing output key '{name}'.")
                d[name] = value
        return d
