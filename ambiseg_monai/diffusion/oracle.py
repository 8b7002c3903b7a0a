"""The exact denoiser of a finite mixture of masks: a network-free check of every sampler.

When the data distribution is a finite set of masks ``m_1..m_K`` (values in {-1, 1}) with
probabilities ``p_k``, the posterior over the masks given a noisy ``x_t = α x_0 + σ ε`` has a closed
form (:func:`~ambiseg_monai.diffusion.mixture_posterior.mixture_posterior_mean`), and so does the
ideal denoiser output: ε̂ = (x_t - α x̂_0) / σ,  v̂ = α ε̂ - σ x̂_0, and the exact flow velocity
û = x̂_0 - ε̂ of rectified flow (α = 1 - t, σ = t: the formula does not assume α² + σ² = 1).

A sampler fed this oracle must draw the masks with frequencies ``p_k`` (up to its discretisation
error), whatever the network would have learned: this separates sampler defects from learning
problems (``tests/test_sampler_oracle.py``). The oracle follows the conditional-denoiser protocol
of :mod:`ambiseg_monai.networks.denoisers`, so it runs through the real N-sample inferers.

``class_labels`` may select one of several mixtures (consensus diffusion: one distribution of
consensus masks per level).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ambiseg_monai.diffusion.mixture_posterior import mixture_posterior_mean
from ambiseg_monai.diffusion.parameterization import DiffusionParameterization, eps_from_x0
from ambiseg_monai.diffusion.protocols import TrainingScheduler, interpolation_variances
from ambiseg_monai.networks.denoisers import ConditionalDenoiser

__all__ = ["MixtureOracleDenoiser", "signal_variance_of", "noise_variance_of"]


def signal_variance_of(scheduler) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from the network's timestep input to the signal variance α² (= ᾱ_t or γ(t)).

    A scheduler following :class:`~ambiseg_monai.diffusion.protocols.TrainingScheduler` gives it
    (``signal_variance``: ᾱ[t] for integer training timesteps, γ(t) for t in [0, 1]); for MONAI's own
    discrete schedulers it is ``ᾱ[t]``.
    """
    if isinstance(scheduler, TrainingScheduler):
        return lambda t: scheduler.signal_variance(t.detach().cpu()).double()
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod).detach().cpu().double()
    return lambda t: alphas_cumprod[t.detach().cpu().long()]


def noise_variance_of(scheduler) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from the network's timestep input to the noise variance σ² (float64).

    For a :class:`~ambiseg_monai.diffusion.protocols.TrainingScheduler` it comes from its ``coefficients``
    (so rectified flow's σ = t is right: σ² is not 1 - α² there); for MONAI's own discrete schedulers
    it is ``1 - ᾱ[t]``.
    """
    if isinstance(scheduler, TrainingScheduler):
        return lambda t: interpolation_variances(scheduler, t.detach().cpu())[1]
    signal = signal_variance_of(scheduler)
    return lambda t: 1.0 - signal(t)


class MixtureOracleDenoiser(ConditionalDenoiser):
    """The ideal denoiser of one (or one per class label) finite mixture of masks.

    Args:
        modes: the candidate masks, K x C x H x W, or L x K x C x H x W with one mixture per class
            label (pad a shorter mixture with any mask of probability 0). Binary {0, 1} masks are
            mapped to {-1, 1}; masks already in {-1, 1} are kept.
        probabilities: K (or L x K) non-negative weights, normalised per mixture.
        signal_variance: maps the (B,) timestep input of a call to (B,) α² in (0, 1); use
            :func:`signal_variance_of` for a scheduler, or :meth:`for_scheduler`.
        prediction_type: what the network outputs: "eps", "x" or "v" (aliases as in
            :data:`~ambiseg_monai.diffusion.parameterization.PREDICTION_TYPES`).
        tanh_x_output: with "x", return ``atanh(x̂_0)`` because the scheduler applies tanh.
        variance_value: when not None, append C channels holding this constant (a learned-range
            "v" in [-1, 1]: -1 is the posterior variance β̃, +1 is β).
        noise_variance: maps the (B,) timestep input to (B,) σ²; None: ``1 - α²`` (variance preserving).
            :meth:`for_scheduler` passes :func:`noise_variance_of` the scheduler (rectified flow: σ² = t²).

    ``forward(x_t, timesteps, cond=None, class_labels=None, ...)`` as every conditional denoiser;
    the condition is ignored (the mixture is the same for every image).
    """

    modes: torch.Tensor  # buffer: L x K x D
    log_probabilities: torch.Tensor  # buffer: L x K

    def __init__(
        self,
        modes: torch.Tensor,
        probabilities: torch.Tensor,
        signal_variance: Callable[[torch.Tensor], torch.Tensor],
        prediction_type: str = "eps",
        tanh_x_output: bool = False,
        variance_value: float | None = None,
        noise_variance: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        modes = torch.as_tensor(modes).double()
        probabilities = torch.as_tensor(probabilities).double()
        if modes.ndim == 4:
            modes, probabilities = modes[None], probabilities[None]
        if modes.ndim != 5 or probabilities.shape != modes.shape[:2]:
            raise ValueError(
                f"modes must be K x C x H x W (or L x K x C x H x W) with probabilities K (or L x K); got "
                f"{tuple(modes.shape)} and {tuple(probabilities.shape)}."
            )
        if bool((probabilities < 0).any()) or bool((probabilities.sum(1) <= 0).any()):
            raise ValueError("probabilities must be non-negative with a positive sum per mixture.")
        if bool(((modes >= 0) & (modes <= 1)).all()):
            modes = 2.0 * modes - 1.0
        if not bool((modes.abs() == 1).all()):
            raise ValueError("modes must be binary masks, in {0, 1} or in {-1, 1}.")
        self.parameterization = DiffusionParameterization(prediction_type, tanh_x_output)
        self.register_buffer("modes", modes.flatten(2))  # L x K x D
        self.register_buffer("log_probabilities", (probabilities / probabilities.sum(1, keepdim=True)).log())
        self.mask_shape = tuple(modes.shape[2:])
        self.signal_variance = signal_variance
        self.noise_variance = noise_variance
        self.prediction_type = self.parameterization.prediction_type
        self.tanh_x_output = self.parameterization.tanh_x_output
        self.variance_value = variance_value

    @classmethod
    def for_scheduler(cls, scheduler, modes, probabilities, variance_value: float | None = None):
        """The oracle whose output matches ``scheduler``: its time input, prediction type and tanh."""
        parameterization = getattr(scheduler, "parameterization", None)
        if parameterization is None:  # MONAI's own schedulers: the prediction type, no output activation
            parameterization = DiffusionParameterization(str(scheduler.prediction_type), tanh_x_output=False)
        return cls(
            modes,
            probabilities,
            signal_variance_of(scheduler),
            prediction_type=parameterization.prediction_type,
            tanh_x_output=parameterization.uses_tanh,
            variance_value=variance_value,
            noise_variance=noise_variance_of(scheduler),
        )

    def variances(self, timesteps: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(α², σ²) at the (B,) ``timesteps`` (or one for all rows), each float64 B x 1 on the CPU."""
        times = timesteps.reshape(-1).expand(batch)
        gamma = torch.as_tensor(self.signal_variance(times)).double().cpu().reshape(batch, 1)
        if self.noise_variance is None:
            return gamma, 1.0 - gamma
        return gamma, torch.as_tensor(self.noise_variance(times)).double().cpu().reshape(batch, 1)

    def posterior_mean(self, x_t: torch.Tensor, timesteps: torch.Tensor, class_labels=None) -> torch.Tensor:
        """E[x_0 | x_t] for B x C x H x W ``x_t`` at (B,) ``timesteps``; float64."""
        batch = x_t.shape[0]
        gamma, variance = self.variances(timesteps, batch)
        alpha = gamma.sqrt()
        labels = torch.zeros(batch, dtype=torch.long) if class_labels is None else class_labels.reshape(-1).long().cpu()
        if int(labels.max()) >= self.modes.shape[0]:
            raise ValueError(
                f"class label {int(labels.max())} has no mixture (the oracle holds {self.modes.shape[0]})."
            )
        modes = self.modes[labels]  # B x K x D
        x = x_t.detach().double().cpu().reshape(batch, -1)
        return mixture_posterior_mean(x, modes, self.log_probabilities[labels], alpha, variance).reshape(
            batch, *self.mask_shape
        )

    def denoise(self, x_t, timesteps, cond, class_labels=None):
        batch = x_t.shape[0]
        x0 = self.posterior_mean(x_t, timesteps, class_labels)
        gamma, variance = self.variances(timesteps, batch)
        alpha = gamma.sqrt().reshape(-1, 1, 1, 1)
        sigma = variance.sqrt().reshape(-1, 1, 1, 1)
        x = x_t.detach().double().cpu()
        out = self.parameterization.target(x0, eps_from_x0(x, x0, alpha, sigma), alpha, sigma)
        if self.parameterization.uses_tanh:  # the scheduler applies tanh: return its inverse
            out = torch.atanh(out.clamp(-1 + 1e-7, 1 - 1e-7))
        if self.variance_value is not None:
            out = torch.cat([out, torch.full_like(out, float(self.variance_value))], dim=1)
        return out.to(device=x_t.device, dtype=x_t.dtype)
