"""Inferers for diffusion segmentation: the training forward pass and the N-sample sampler.

One of each serves every diffusion method (CIMD, consensus diffusion, AmbDiffSeg, their ablations and
their flow-matching overlays), in discrete or continuous time or as a rectified flow: they use a
scheduler only through the protocol of
:mod:`ambiseg_monai.diffusion.protocols`, and what the network predicts only through its
:class:`~ambiseg_monai.diffusion.parameterization.DiffusionParameterization`.

- :class:`DiffusionTrainingInferer` is the ``inferer`` of MONAI's ``SupervisedTrainer``: it draws
  t and the noise, forms x_t and returns the per-sample loss terms that
  :class:`~ambiseg_monai.losses.diffusion.DiffusionLoss` weights.
- :class:`DiffusionSamplingInferer` is the one N-sample inferer used by the evaluator,
  ``inference.json`` and the deploy app: ``__call__(inputs, network) -> B x N x H x W``. Per-sample
  class labels and a post-processing step make it the consensus-diffusion sampler too
  (:class:`~ambiseg_monai.inferers.consensus.ConsensusSamplingInferer`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer

from ambiseg_monai.diffusion.gaussian import mean_over_pixels
from ambiseg_monai.diffusion.mixture_posterior import rater_posterior_target
from ambiseg_monai.diffusion.parameterization import eps_from_x0
from ambiseg_monai.diffusion.protocols import (
    LearnedVarianceScheduler,
    TrainingScheduler,
    interpolation_variances,
    missing_members,
)
from ambiseg_monai.diffusion.sampler import (
    autocast_dtype_from_name,
    index_rows,
    make_generators,
    reverse_diffusion,
    take_rows,
)
from ambiseg_monai.diffusion.weighting import LossWeighting
from ambiseg_monai.inferers.cpu_engine import ENGINES, CPUEngineDenoiser, require_engine
from ambiseg_monai.losses.diffusion import vlb_term
from ambiseg_monai.networks.denoisers import unwrap_network
from ambiseg_monai.schedulers.respaced import split_model_output
from ambiseg_monai.transforms.diffusion_range import mask_to_symmetric

__all__ = [
    "DiffusionTrainingInferer",
    "DiffusionSamplingInferer",
    "PerImageSeedingInferer",
    "SAMPLE_VALUES",
    "sample_statistics",
]

#: How a sampled x_0 in [-1, 1] becomes a sample value in [0, 1] (see :class:`DiffusionSamplingInferer`).
SAMPLE_VALUES = ("binary", "continuous")


def sample_statistics(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean (soft map) and variance over binary samples.

    Args:
        samples: B x N x H x W in {0, 1}.

    Returns:
        (mean, variance), each B x 1 x H x W; variance is the population variance p (1 - p).
    """
    samples = samples.float()
    mean = samples.mean(dim=1, keepdim=True)
    return mean, samples.var(dim=1, unbiased=False, keepdim=True)


class DiffusionTrainingInferer(Inferer):
    """One diffusion training forward pass, discrete or continuous time; returns the loss terms per sample.

    Draws t (``scheduler.sample_timesteps``) and ε, forms ``x_t = α(t) x_0 + σ(t) ε`` and calls the
    network. The regression loss ``l_simple`` is one of:

    - ``weighting=None``: the mean squared error of the network's prediction (ε, x_0, v or the flow
      velocity x_0 - ε: the scheduler's parameterisation, after tanh when it uses one) against its target
      (DDPM's L_simple; CIMD, consensus diffusion; flow matching's velocity loss);
    - a :class:`~ambiseg_monai.diffusion.weighting.LossWeighting` w(t): the x-space loss
      ``w(t) · mean over pixels of (x̂_0 - x_0)²`` (AmbDiffSeg, eq. 8), x̂_0 converted from the network
      output whatever it predicts; w is a function of the log-SNR, so it works with discrete and
      continuous-time schedulers alike.

    Args:
        scheduler: the training scheduler, following
            :class:`~ambiseg_monai.diffusion.protocols.TrainingScheduler`
            (:class:`~ambiseg_monai.schedulers.RespacedDDPMScheduler`, a continuous-time scheduler of
            :mod:`ambiseg_monai.schedulers.continuous`, or a rectified-flow scheduler of
            :mod:`ambiseg_monai.schedulers.flow`).
        compute_vlb: add Improved DDPM's ``l_vlb`` when the network outputs a learned variance
            (2 x C channels; needs a :class:`~ambiseg_monai.diffusion.protocols.LearnedVarianceScheduler`,
            i.e. a discrete scheduler). With False, variance channels are ignored.
        autocast_dtype: "bfloat16" or "float16": run the network call under ``torch.autocast`` on the
            inputs' device (the bundles pass :func:`~ambiseg_monai.utils.cpu_autocast_dtype`: bf16 on
            CPUs with native bf16, where it trains about 2x faster; CUDA uses the engine's ``amp``).
            The losses are computed in float32 either way.
        rater_posterior_targets: regress on ``E[x_0 | x_t, the image's raters]``
            (:func:`~ambiseg_monai.diffusion.rater_posterior_target`) instead of on the one rater
            that made x_t: same minimiser, much lower target variance at large t. Needs the raters:
            ``DiffusionTrainingPrepareBatch(rater_key="label")`` passes ``raters`` and ``rater_mask``.
            Use it only when the training target is one rater drawn uniformly (``SelectRandomRaterd``).
        weighting: the x-space loss weighting w(t) (see above); None: the prediction's own MSE.
        stratified_times: draw the batch's times stratified (one in each stratum ``[i/B, (i+1)/B)`` of
            the time range, see :func:`~ambiseg_monai.diffusion.protocols.sample_training_times`;
            AmbDiffSeg's "uniform_low_d"); False: independent uniform draws.

    ``__call__(inputs, network, target=..., class_labels=None, raters=None, rater_mask=None)``:
    ``inputs`` the images B x C x H x W, ``target`` the training masks B x 1 x H x W in [0, 1] (one
    rater's mask, or the mean mask). Returns a dict of (B,) terms ``l_simple``, ``l_vlb`` (``T · L_t``
    in bits/pixel, mean detached; with a learned variance) and the network's auxiliary terms
    (``l_amb``), plus ``model_output``, ``x_t``, ``noise`` (B x C x H x W) and ``timesteps`` (B,) for
    inspection; with a ``weighting`` also ``loss_weights`` (B,) and ``pred_x0`` (B x C x H x W).
    """

    def __init__(
        self,
        scheduler: TrainingScheduler,
        compute_vlb: bool = True,
        autocast_dtype: str | None = None,
        rater_posterior_targets: bool = False,
        weighting: LossWeighting | None = None,
        stratified_times: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(scheduler, TrainingScheduler):
            raise TypeError(
                f"{type(self).__name__} needs a scheduler following the TrainingScheduler protocol "
                f"(ambiseg_monai.diffusion.protocols); {type(scheduler).__name__} lacks "
                f"{missing_members(scheduler, TrainingScheduler)}."
            )
        # w(t) is a function of the log-SNR of a continuous-time scheduler's schedule
        # w is a function of log-SNR: a continuous-time scheduler's schedule, or the scheduler's ᾱ_t
        self._weighting_schedule = getattr(scheduler, "schedule", scheduler)
        self.scheduler = scheduler
        self.compute_vlb = compute_vlb
        self.autocast_dtype = autocast_dtype_from_name(autocast_dtype)
        self.rater_posterior_targets = rater_posterior_targets
        self.weighting = weighting
        self.stratified_times = bool(stratified_times)

    def _mixed_precision(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        *args,
        target: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        raters: torch.Tensor | None = None,
        rater_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> dict[str, torch.Tensor]:
        if target is None:
            raise ValueError(f"{type(self).__name__} needs `target` (pass it through prepare_batch's kwargs).")
        x0 = mask_to_symmetric(target).to(inputs.device)
        timesteps = self.scheduler.sample_timesteps(x0.shape[0], inputs.device, stratified=self.stratified_times)
        noise = torch.randn_like(x0)
        x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        with self._mixed_precision(inputs.device):
            out = network(x_t, timesteps, class_labels=class_labels, image=inputs, target=x0)
        aux: dict[str, torch.Tensor] = {}
        if isinstance(out, tuple):
            out, aux = out
        # the losses are computed in float32 even under autocast (the SNR weights span many decades)
        mean_part, var_values = self._split_output(out.float(), x0)
        x0_target = self._rater_posterior_x0(x_t, timesteps, raters, rater_mask) if self.rater_posterior_targets else x0
        result: dict[str, torch.Tensor]
        if self.weighting is None:
            result = {"l_simple": self._prediction_loss(mean_part, x0_target, x_t, noise, timesteps)}
        else:
            alpha, sigma = self.scheduler.coefficients(timesteps, x_t)
            pred_x0 = self.scheduler.parameterization.predict_x0(mean_part, x_t, alpha, sigma)
            weights = self.weighting(timesteps, self._weighting_schedule)
            weights = weights.to(device=x0.device, dtype=torch.float32)
            result = {
                "l_simple": weights * mean_over_pixels((pred_x0 - x0_target) ** 2),
                "loss_weights": weights,
                "pred_x0": pred_x0,
            }
        result.update({"model_output": out, "x_t": x_t, "noise": noise, "timesteps": timesteps})
        if self.compute_vlb and var_values is not None and isinstance(self.scheduler, LearnedVarianceScheduler):
            # stop-gradient on the mean: the VLB term trains only the variance (Improved DDPM)
            l_t = vlb_term(self.scheduler, mean_part.detach(), var_values, x0, x_t, timesteps)
            result["l_vlb"] = self.scheduler.num_train_timesteps * l_t
        for name, value in aux.items():
            result[name] = value.float()
        return result

    def _split_output(self, out: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean part, variance values or None) of the float32 network output, checked against the targets."""
        mean_part, var_values = split_model_output(out, x0.shape[1])
        if mean_part.shape != x0.shape:
            raise ValueError(
                f"the network output has shape {tuple(out.shape)}; expected {tuple(x0.shape)} (one channel per mask)."
            )
        if var_values is not None and self.compute_vlb and not isinstance(self.scheduler, LearnedVarianceScheduler):
            raise ValueError(
                f"the network output has shape {tuple(out.shape)}; expected {tuple(x0.shape)} (one channel per "
                f"mask): {type(self.scheduler).__name__} has no learned variance."
            )
        return mean_part, var_values

    def _rater_posterior_x0(self, x_t, timesteps, raters, rater_mask) -> torch.Tensor:
        """``E[x_0 | x_t, the image's raters]``, B x 1 x H x W."""
        if raters is None:
            raise ValueError(
                "rater_posterior_targets needs the raters: set the prepare_batch's rater_key "
                "(DiffusionTrainingPrepareBatch(rater_key='label'))."
            )
        # α² and σ² from the scheduler's coefficients: variance preserving or rectified flow alike
        signal, noise = interpolation_variances(self.scheduler, timesteps.to(x_t.device))
        return rater_posterior_target(x_t.float(), raters.to(x_t.device), rater_mask, signal, noise)

    def _prediction_loss(self, mean_part, x0_target, x_t, noise, timesteps) -> torch.Tensor:
        """Mean over pixels of (target - prediction)² in the space the network predicts in (ε, x_0 or v)."""
        parameterization = self.scheduler.parameterization
        alpha, sigma = self.scheduler.coefficients(timesteps, x_t)
        eps_target = eps_from_x0(x_t, x0_target, alpha, sigma) if self.rater_posterior_targets else noise
        regression_target = parameterization.target(x0_target, eps_target, alpha, sigma)
        return mean_over_pixels((regression_target - parameterization.prediction(mean_part)) ** 2)


class PerImageSeedingInferer(Inferer):
    """Base of the N-sample inferers: the key that seeds each image's samples.

    Every (image, sample) pair gets its own random stream seeded from ``(seed, image key, n)`` (see
    :mod:`ambiseg_monai.diffusion.sampler`), so a mask does not depend on the other images of its
    batch. The image key is the ``image_ids`` entry passed to ``__call__`` (case ids or dataset
    positions) or, without ids, a running count of the images this inferer has seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self._images_seen = 0

    def reset_counter(self) -> None:
        """Restart the running image count used as the image key when no ``image_ids`` are given."""
        self._images_seen = 0

    def _image_keys(self, batch: int, image_ids: Sequence | None) -> list[int | str]:
        """The B image keys of this call (and advance the running count)."""
        if image_ids is None:
            keys: list[int | str] = list(range(self._images_seen, self._images_seen + batch))
        else:
            keys = [i if isinstance(i, str) else int(i) for i in image_ids]
            if len(keys) != batch:
                raise ValueError(f"{type(self).__name__}: got {len(keys)} image_ids for a batch of {batch} images.")
        self._images_seen += batch
        return keys


class DiffusionSamplingInferer(PerImageSeedingInferer):
    """N masks per image by reverse diffusion: ``__call__(inputs, network) -> B x N x H x W`` in [0, 1].

    The condition is encoded once per image (``network.encode_condition``) and the N samples of the
    images in the batch run as one network batch per step (``max_rows`` splits it, e.g. ``1`` samples
    one mask at a time like the official CIMD code). Randomness is per sample (see
    :mod:`ambiseg_monai.diffusion.sampler`): sample n of an image has its own generator seeded from
    (seed, image key, n), so results do not depend on batching, and raising N only adds samples.

    Args:
        scheduler: a scheduler following :class:`~ambiseg_monai.diffusion.protocols.SamplingScheduler`
            (respaced DDPM / DDIM, continuous time, or a rectified-flow ODE / SDE solver).
        num_samples: N.
        num_inference_steps: respaced number of steps (None: the scheduler's current timesteps).
        seed: base seed; each (image, sample) gets its own seed from (seed, image key, n).
        mask_channels: channels of one diffused mask (1).
        threshold: a binary sample is ``x_0 > threshold`` (0 in the [-1, 1] range).
        return_stats: return ``{"pred": samples, "mean": B x 1 x H x W, "variance": B x 1 x H x W}``.
        max_rows: most masks per network call (None: all B x N at once).
        progress: show a progress bar over the steps.
        autocast_dtype: "bfloat16" or "float16": run the network calls under ``torch.autocast`` (on a
            CPU with native bf16, bf16 is 2-3x faster at no measured GED cost, see docs/benchmarks.md);
            None: float32 unless an enclosing autocast (an evaluator's ``amp``) applies.
        sample_labels: the class label of each of the N samples of an image (N ints, the same for every
            image), passed to the network as ``class_labels``: consensus levels or rater ids, e.g.
            ``[0, 1, 2, 0, 1, 2]`` for 3 levels x 2 generations. None: the ``class_labels`` of the call
            (one per image), or none.
        sample_values: ``"binary"`` (``x_0 > threshold``) or ``"continuous"`` (``(x_0 + 1) / 2`` clamped
            to [0, 1], for models that regress a soft map).
        postprocess: called on the B x N x H x W samples; its result is what the inferer returns (e.g.
            :class:`~ambiseg_monai.transforms.consensus.CombineConsensusSamples`). Not with ``return_stats``.
        engine: where the denoiser calls run: ``"torch"`` (the network itself), or, on a CPU,
            ``"onnxruntime"`` / ``"openvino"``: the network exported to ONNX on first use and run there
            (:class:`~ambiseg_monai.inferers.cpu_engine.CPUEngineDenoiser`; optional packages:
            ``pip install 'ambiseg-monai[cpu-engines]'``). ``encode_condition`` and the scheduler stay in
            PyTorch. ``autocast_dtype`` then means the engine's precision: onnxruntime runs float32 only,
            openvino float32 or ``"bfloat16"``.

    ``__call__`` keyword arguments: ``image_ids`` (B case ids or dataset positions; default: a running
    count of the images this inferer has seen, see :meth:`reset_counter`), ``class_labels`` (B,).
    """

    def __init__(
        self,
        scheduler,
        num_samples: int = 4,
        num_inference_steps: int | None = None,
        seed: int = 0,
        mask_channels: int = 1,
        threshold: float = 0.0,
        return_stats: bool = False,
        max_rows: int | None = None,
        progress: bool = False,
        autocast_dtype: str | None = None,
        sample_labels: Sequence[int] | None = None,
        sample_values: str = "binary",
        postprocess: Callable[[torch.Tensor], Any] | None = None,
        engine: str = "torch",
    ) -> None:
        super().__init__()
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}.")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if max_rows is not None and int(max_rows) < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}.")
        if sample_values not in SAMPLE_VALUES:
            raise ValueError(f"sample_values must be one of {SAMPLE_VALUES}, got {sample_values!r}.")
        if sample_labels is not None:
            sample_labels = [int(label) for label in sample_labels]
            if len(sample_labels) != int(num_samples) or min(sample_labels) < 0:
                raise ValueError(
                    f"sample_labels must hold one non-negative label per sample ({num_samples}), got {sample_labels}."
                )
        if return_stats and postprocess is not None:
            raise ValueError("give return_stats or postprocess, not both (return_stats is a post-processing).")
        self.scheduler = scheduler
        self.num_samples = int(num_samples)
        self.num_inference_steps = num_inference_steps
        self.seed = int(seed)
        self.mask_channels = int(mask_channels)
        self.threshold = float(threshold)
        self.return_stats = return_stats
        self.max_rows = None if max_rows is None else int(max_rows)
        self.progress = progress
        self.autocast_dtype = autocast_dtype_from_name(autocast_dtype)
        self.sample_labels = sample_labels
        self.sample_values = sample_values
        self.postprocess = postprocess
        self.engine = engine
        self._engine_network: CPUEngineDenoiser | None = None
        if engine != "torch":
            allowed = (None, torch.bfloat16) if engine == "openvino" else (None,)
            if self.autocast_dtype not in allowed:
                raise ValueError(
                    f"engine={engine!r} runs float32{' or bfloat16' if engine == 'openvino' else ''}; "
                    f"got autocast_dtype={autocast_dtype!r}."
                )
            require_engine(engine)  # a missing package fails here, not at the first image

    def _network_for_engine(self, network: torch.nn.Module) -> torch.nn.Module:
        """The network the sampling loop calls: ``network`` itself, or its engine wrapper (one per network)."""
        if self.engine == "torch":
            return network
        if self._engine_network is None or self._engine_network.network is not unwrap_network(network):
            precision = "bfloat16" if self.autocast_dtype == torch.bfloat16 else "float32"
            self._engine_network = CPUEngineDenoiser(network, self.engine, precision)
        return self._engine_network

    def _row_labels(self, batch: int, class_labels: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """The (B N,) class labels of the rows (image-major), or None."""
        if self.sample_labels is None:
            return None if class_labels is None else class_labels.repeat_interleave(self.num_samples, dim=0)
        if class_labels is not None:
            raise ValueError(
                f"{type(self).__name__} labels its samples itself (sample_labels); do not pass class_labels too."
            )
        return torch.as_tensor(self.sample_labels, dtype=torch.long, device=device).repeat(batch)

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
        class_labels: torch.Tensor | None = None,
        **kwargs,
    ):
        """inputs: B x C x H x W images -> B x N x H x W samples (float), or what return_stats / postprocess
        make of them."""
        if inputs.ndim < 3:
            raise ValueError(
                f"inputs must be images B x C x H x W (or B x C x D x H x W), got shape {tuple(inputs.shape)}."
            )
        batch, n = inputs.shape[0], self.num_samples
        keys = self._image_keys(batch, image_ids)
        generators = make_generators(self.seed, keys, n)  # row b * N + n: sample n of image b
        network = self._network_for_engine(network)
        cond = unwrap_network(network).encode_condition(inputs)  # once per image, reused at every step
        row_labels = self._row_labels(batch, class_labels, inputs.device)
        image_of_row = torch.arange(batch, device=inputs.device).repeat_interleave(n)
        if self.num_inference_steps is not None:
            self.scheduler.set_timesteps(int(self.num_inference_steps))  # CPU timesteps: no device read per step
        sample_shape = (self.mask_channels, *inputs.shape[2:])
        rows, chunk = batch * n, self.max_rows or batch * n
        reference = inputs if inputs.is_floating_point() else inputs.float()
        pieces = []
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            x0 = reverse_diffusion(
                network,
                self.scheduler,
                index_rows(cond, image_of_row[part]),
                sample_shape,
                generators[part],
                class_labels=take_rows(row_labels, part),
                progress=self.progress,
                reference=reference,
                autocast_dtype=self.autocast_dtype if self.engine == "torch" else None,
            )
            pieces.append(self._to_values(x0))
        samples = torch.cat(pieces).reshape(batch, n, *inputs.shape[2:])
        if self.postprocess is not None:
            return self.postprocess(samples)
        if not self.return_stats:
            return samples
        mean, variance = sample_statistics(samples)
        return {"pred": samples, "mean": mean, "variance": variance}
