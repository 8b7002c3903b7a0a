"""The scheduler protocol of the diffusion core, and the two pieces every implementation shares.

One training inferer (:class:`~ambiseg_monai.inferers.DiffusionTrainingInferer`) and one N-sample
inferer (:class:`~ambiseg_monai.inferers.DiffusionSamplingInferer`) serve every diffusion method; they
talk to a scheduler only through these members, so discrete time (the respaced DDPM / DDIM of
:mod:`ambiseg_monai.schedulers.respaced`, timesteps are integers in ``[0, T)``), continuous time
(:mod:`ambiseg_monai.schedulers.continuous`, t in [0, 1]) and rectified flow
(:mod:`ambiseg_monai.schedulers.flow`, t in [0, 1] times the denoiser's ``time_scale``) are
interchangeable. The first two are variance preserving (α² + σ² = 1); rectified flow interpolates
linearly (α = 1 - t, σ = t): code that needs the noise level uses ``coefficients`` (or
:func:`interpolation_variances`), never ``1 - signal_variance``.

- :class:`SamplingScheduler`: what the reverse-diffusion loop
  (:func:`~ambiseg_monai.diffusion.sampler.reverse_diffusion`) uses: ``set_timesteps``,
  ``timesteps`` and ``step(..., noise=...)`` with the per-sample standard-normal noise.
- :class:`TrainingScheduler`: what the training inferer uses: the parameterisation (what the
  network predicts), drawing training times, noising, and the per-row coefficients α(t), σ(t).
- :class:`LearnedVarianceScheduler`: a training scheduler that can also evaluate Improved DDPM's
  variational-bound term (:func:`~ambiseg_monai.losses.diffusion.vlb_term`) of a learned variance.

The protocols are ``runtime_checkable``: the inferers check a scheduler with ``isinstance`` and name
the missing members in their error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from ambiseg_monai.diffusion.gaussian import GaussianChain
    from ambiseg_monai.diffusion.parameterization import DiffusionParameterization

__all__ = [
    "SamplingScheduler",
    "TrainingScheduler",
    "LearnedVarianceScheduler",
    "missing_members",
    "sample_training_times",
    "standard_noise",
    "interpolation_variances",
]


@runtime_checkable
class SamplingScheduler(Protocol):
    """A scheduler the reverse-diffusion loop can run.

    ``timesteps`` (1-D tensor, in sampling order) is set by ``set_timesteps``; ``step`` takes one
    network output at ``timestep`` and returns ``(x_prev, predicted x_0)``. ``noise`` is the
    standard-normal tensor (shaped like ``sample``) a stochastic step adds, drawn by the caller per
    sample; a step draws from ``generator`` only when ``noise`` is None.
    """

    timesteps: torch.Tensor

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None: ...

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class TrainingScheduler(Protocol):
    """A scheduler the training inferer can train with (``x_t = α(t) x_0 + σ(t) ε``).

    - ``parameterization``: what the network predicts (x_0, v, ε or the flow velocity) and the conversions.
    - ``sample_timesteps(batch, device, stratified)``: (B,) training times in the units the network takes
      (integer steps, floats in [0, 1], or [0, time_scale]); ``stratified`` draws one per stratum of the
      batch (see :func:`sample_training_times`).
    - ``add_noise(original_samples, noise, timesteps)``: x_t.
    - ``signal_variance(timesteps)``: (B,) α(t)² (ᾱ_t, γ(t), or (1 - t)² for rectified flow).
    - ``coefficients(timesteps, like)``: (α(t), σ(t)) per row, broadcastable against ``like``.
    """

    @property
    def parameterization(self) -> DiffusionParameterization: ...

    def sample_timesteps(
        self, batch: int, device: str | torch.device | None = None, stratified: bool = False
    ) -> torch.Tensor: ...

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor: ...

    def signal_variance(self, timesteps: torch.Tensor) -> torch.Tensor: ...

    def coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class LearnedVarianceScheduler(TrainingScheduler, Protocol):
    """A discrete training scheduler that also gives the VLB term of a learned variance (Improved DDPM)."""

    num_train_timesteps: int
    train_chain: GaussianChain

    def model_log_variance(
        self, var_values: torch.Tensor | None, index: int | torch.Tensor, chain: GaussianChain, like: torch.Tensor
    ) -> torch.Tensor: ...


def missing_members(obj: object, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks (for error messages)."""
    names = set()
    for klass in protocol.__mro__:
        if klass is object or klass is Protocol or not getattr(klass, "_is_protocol", False):
            continue
        names |= {n for n in vars(klass) if not n.startswith("_")}
        names |= set(getattr(klass, "__annotations__", {}))
    return sorted(n for n in names if not hasattr(obj, n))


def sample_training_times(
    batch: int, stratified: bool = True, device: str | torch.device | None = None
) -> torch.Tensor:
    """(B,) training times in [0, 1).

    ``stratified`` (AmbDiffSeg's official code's "uniform_low_d"): one time in each of the B strata
    ``[i/B, (i+1)/B)``, in random order; still uniform per row, with less variance of the batch loss.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}.")
    if not stratified:
        return torch.rand(batch, device=device)
    return (torch.randperm(batch, device=device) + torch.rand(batch, device=device)) / batch


def interpolation_variances(scheduler: TrainingScheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α(t)², σ(t)²) of a training scheduler at (B,) ``timesteps``, float64 (B,) on their device.

    Taken from ``scheduler.coefficients``, so it holds for variance-preserving schedules (σ² = 1 - α²) and
    for rectified flow's linear interpolation (α = 1 - t, σ = t) alike: what the exact mixture posterior
    (:mod:`~ambiseg_monai.diffusion.mixture_posterior`) needs.
    """
    batch = timesteps.reshape(-1).shape[0]
    like = torch.zeros(batch, 1, dtype=torch.float64, device=timesteps.device)
    alpha, sigma = scheduler.coefficients(timesteps, like)
    alpha = torch.as_tensor(alpha, dtype=torch.float64).to(timesteps.device)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).to(timesteps.device)
    return (alpha**2).reshape(-1).expand(batch), (sigma**2).reshape(-1).expand(batch)


def standard_noise(like: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """The standard-normal noise of one stochastic step: ``noise`` (checked, cast to ``like``) or a fresh draw."""
    if noise is not None:
        if noise.shape != like.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {tuple(like.shape)}.")
        return noise.to(device=like.device, dtype=like.dtype)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
