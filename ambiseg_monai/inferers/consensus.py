"""Consensus-diffusion sampling: the N-sample inferer configured for C slots x G generations.

See :mod:`ambiseg_monai.transforms.consensus` for how the G x C samples of an image are combined
(per-level maps, the soft consensus map) and Amit et al. (MICCAI 2023) for the method.
"""

from __future__ import annotations

from ambiseg_monai.inferers.diffusion import DiffusionSamplingInferer
from ambiseg_monai.transforms.consensus import CombineConsensusSamples, consensus_sample_labels

__all__ = ["ConsensusSamplingInferer"]


class ConsensusSamplingInferer(DiffusionSamplingInferer):
    """Soft consensus maps by reverse diffusion: ``__call__(inputs, network) -> dict`` (see below).

    A :class:`~ambiseg_monai.inferers.DiffusionSamplingInferer` configured for consensus diffusion: for
    each image, C slots (consensus levels, or rater ids / unconditional slots in the ablations) x G
    generations are sampled as its N = G x C samples (labels :func:`consensus_sample_labels`), and
    :class:`CombineConsensusSamples` combines them. The image is encoded once; all B x G x C masks run as
    one network batch per reverse step (``max_rows`` splits it). Every mask has its own generator seeded
    from (seed, image key, g * C + c), so a mask depends neither on the batching nor on G: raising G only
    adds generations, and the first g generations of a run are exactly a run with G = g (what the
    soft-Dice-vs-generations curve relies on).

    Args:
        scheduler: a scheduler following :class:`~ambiseg_monai.diffusion.protocols.SamplingScheduler`.
        num_levels: C, the number of slots (the model's level / rater embedding size).
        num_generations: G (25 in the paper).
        conditioned: pass slot c as ``class_labels`` (0-based); False for unconditional networks
            ("no annotator", "soft label").
        majority_vote: round each level's average over generations before averaging levels (the
            authors' code). Default True: it produced the paper's numbers.
        sample_values: ``"binary"`` (``x_0 > threshold``, the project's convention) or ``"continuous"``
            (``(x_0 + 1) / 2`` clamped to [0, 1]: what the authors' code averages, and what the
            "soft label" ablation must use since it regresses a soft map).
        return_samples: include the B x C x G x H x W ``"samples"`` (needed by the generation curve).
        num_inference_steps, seed, mask_channels, threshold, max_rows, progress, autocast_dtype, engine: as in
            :class:`~ambiseg_monai.inferers.DiffusionSamplingInferer` (``max_rows`` counts B x C x G masks).

    ``__call__(inputs, network, image_ids=None)``: ``inputs`` B x C_img x H x W; ``image_ids`` B case ids
    or dataset positions (default: a running count, see :meth:`reset_counter`). Returns
    ``{"pred": B x C x H x W per-level binary masks, "pred_soft": B x H x W, "level_maps": B x C x H x W,
    "samples": B x C x G x H x W}`` (see :func:`combine_consensus_samples`); in an evaluator, unpack it
    with :class:`~ambiseg_monai.transforms.consensus.UnpackPredictiond` as post-processing.
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
        engine: str = "torch",
    ) -> None:
        combine = CombineConsensusSamples(num_levels, majority_vote, return_samples)
        if int(num_generations) < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}.")
        super().__init__(
            scheduler,
            num_samples=combine.num_levels * int(num_generations),
            num_inference_steps=num_inference_steps,
            seed=seed,
            mask_channels=mask_channels,
            threshold=threshold,
            max_rows=max_rows,
            progress=progress,
            autocast_dtype=autocast_dtype,
            engine=engine,
            sample_labels=consensus_sample_labels(num_levels, num_generations) if conditioned else None,
            sample_values=sample_values,
            postprocess=combine,
        )
        self.num_levels = combine.num_levels
        self.num_generations = int(num_generations)
