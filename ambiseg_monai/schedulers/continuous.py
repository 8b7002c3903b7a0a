"""Continuous-time variance-preserving diffusion (AmbDiffSeg, Christensen et al. 2025; VDM, Kingma et al. 2021).

Time runs from t = 0 (data) to t = 1 (noise): ``x_t = α(t) x_0 + σ(t) ε`` with ``α = √γ``, ``σ = √(1-γ)``.

- :class:`ContinuousVPSchedule` is the noise schedule γ(t): the cosine schedule ``γ(t) = cos²(πt/2)``,
  input scaling ``γ_b = b²γ / ((b²-1)γ + 1)`` (which multiplies the SNR by b², Chen 2023) and the
  official code's log-SNR clipping: γ_b is mapped affinely so that ``logSNR(0) = logsnr_max`` and
  ``logSNR(1) = logsnr_min`` (±20); this keeps α and σ away from 0, so x, ε and v stay interconvertible
  at both ends. Everything is computed in float64.
- :class:`ContinuousTimeScheduler` is the schedulers' shared part: a schedule, a
  :class:`~ambiseg_monai.diffusion.parameterization.DiffusionParameterization` and the time grid.
  :class:`ContinuousDDPMScheduler` (ancestral sampling, "large" or "small" variance) and
  :class:`ContinuousDDIMScheduler` (deterministic DDIM) differ only in the transition from t to s.
  They follow the scheduler protocol of :mod:`ambiseg_monai.diffusion.protocols` (training:
  ``sample_timesteps``, ``add_noise``, ``signal_variance``, ``coefficients``; sampling:
  ``set_timesteps``, ``timesteps``, ``step(model_output, timestep, sample, generator=None, noise=None)
  -> (x_prev, x̂_0)``), so the training inferer, the sampler and the N-sample inferer use them exactly as
  they use the discrete schedulers. Their ``timesteps`` are floats in (0, 1]: K steps walk the grid
  ``t_i = i / K`` from 1 down to 1/K, and the last step (to s = 0) returns x̂_0 itself, clamped to [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ambiseg_monai.diffusion.parameterization import DiffusionParameterization, eps_from_x0, velocity
from ambiseg_monai.diffusion.protocols import sample_training_times, standard_noise

__all__ = [
    "GAMMA_SCHEDULES",
    "ContinuousVPSchedule",
    "ContinuousTimeScheduler",
    "ContinuousDDPMScheduler",
    "ContinuousDDIMScheduler",
]


def _cosine_gamma(t: torch.Tensor) -> torch.Tensor:
    return torch.cos(t * (math.pi / 2)) ** 2


def _linear_gamma(t: torch.Tensor) -> torch.Tensor:
    return 1.0 - t


#: Base schedules γ(t) with γ(0) = 1 and γ(1) = 0, selectable by name.
GAMMA_SCHEDULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"cosine": _cosine_gamma, "linear": _linear_gamma}


def _as_time(t: torch.Tensor | float) -> torch.Tensor:
    t = torch.as_tensor(t)
    device = t.device if t.device.type != "mps" else torch.device("cpu")  # MPS has no float64
    return t.to(device=device, dtype=torch.float64)


class ContinuousVPSchedule:
    """The variance-preserving schedule γ_b(t) with input scaling and log-SNR clipping.

    Args:
        schedule: name of the base schedule γ(t) in :data:`GAMMA_SCHEDULES` ("cosine").
        input_scale: b in (0, 1]; SNR_b(t) = b² SNR(t). b = 1 is no input scaling; 0.1 is the paper's.
        logsnr_min, logsnr_max: log-SNR at t = 1 and t = 0 after clipping (official code: -20, 20).
            Both None disables clipping (then SNR is exactly b² SNR(t), and infinite / zero at the ends).

    All methods take t as a float or a tensor of any shape with values in [0, 1] and return float64
    tensors of the same shape.
    """

    def __init__(
        self,
        schedule: str = "cosine",
        input_scale: float = 0.1,
        logsnr_min: float | None = -20.0,
        logsnr_max: float | None = 20.0,
    ) -> None:
        if schedule not in GAMMA_SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(GAMMA_SCHEDULES)}, got {schedule!r}.")
        if not 0.0 < float(input_scale) <= 1.0:
            raise ValueError(f"input_scale (b) must lie in (0, 1], got {input_scale}.")
        if (logsnr_min is None) != (logsnr_max is None):
            raise ValueError("give both logsnr_min and logsnr_max (clipping) or neither (no clipping).")
        if logsnr_min is not None and logsnr_max is not None and not float(logsnr_min) < float(logsnr_max):
            raise ValueError(f"logsnr_min must be below logsnr_max, got {logsnr_min} and {logsnr_max}.")
        if logsnr_max is not None and float(logsnr_max) > 36.0:
            # sigmoid(36) rounds to 1 in float64: σ(0) would be 0 and the clipping would be void
            raise ValueError(f"logsnr_max must be <= 36 (float64 limit), got {logsnr_max}.")
        self.schedule = schedule
        self.input_scale = float(input_scale)
        self.logsnr_min = None if logsnr_min is None else float(logsnr_min)
        self.logsnr_max = None if logsnr_max is None else float(logsnr_max)
        self._base_gamma = GAMMA_SCHEDULES[schedule]
        if self.logsnr_min is None or self.logsnr_max is None:  # both or neither (checked above)
            self._slope, self._offset = 1.0, 0.0
        else:
            # γ_b(0) = 1 and γ_b(1) = 0 are mapped to sigmoid(logsnr_max) and sigmoid(logsnr_min)
            low = 1.0 / (1.0 + math.exp(-self.logsnr_min))
            high = 1.0 / (1.0 + math.exp(-self.logsnr_max))
            self._slope, self._offset = high - low, low

    def input_scaled_gamma(self, t: torch.Tensor | float) -> torch.Tensor:
        """γ_b(t) = b²γ / ((b²-1)γ + 1), before clipping (paper eq. 7)."""
        gamma = self._base_gamma(_as_time(t))
        b2 = self.input_scale**2
        return b2 * gamma / ((b2 - 1.0) * gamma + 1.0)

    def gamma(self, t: torch.Tensor | float) -> torch.Tensor:
        """γ(t) = α(t)² used for noising: the input-scaled schedule after log-SNR clipping."""
        return self.input_scaled_gamma(t) * self._slope + self._offset

    def alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """Signal coefficient α(t) = √γ(t)."""
        return self.gamma(t).sqrt()

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Noise coefficient σ(t) = √(1 - γ(t))."""
        return (1.0 - self.gamma(t)).sqrt()

    def snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """SNR(t) = γ / (1 - γ) (paper eq. 5)."""
        gamma = self.gamma(t)
        return gamma / (1.0 - gamma)

    def logsnr(self, t: torch.Tensor | float) -> torch.Tensor:
        """log SNR(t), monotonically decreasing in t."""
        gamma = self.gamma(t)
        return torch.log(gamma) - torch.log1p(-gamma)

    def dlogsnr_dt(self, t: torch.Tensor | float) -> torch.Tensor:
        """d logSNR / dt (negative), by automatic differentiation of :meth:`logsnr`."""
        t = _as_time(t).detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.logsnr(t).sum(), t)
        return grad.detach()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(schedule={self.schedule!r}, input_scale={self.input_scale}, "
            f"logsnr_min={self.logsnr_min}, logsnr_max={self.logsnr_max})"
        )


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) float64 coefficients -> B x 1 x ... x 1 in ``like``'s dtype and device.

    One coefficient on the CPU (a sampling step: one time for every row) stays a 0-dim CPU tensor,
    which PyTorch passes to a CUDA kernel as a scalar: no host-to-device copy per step.
    """
    if values.numel() == 1 and values.device.type == "cpu":
        return values.reshape(()).to(dtype=like.dtype)
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class ContinuousTimeScheduler:
    """Shared part of the continuous-time schedulers: noising, training times, the time grid, x̂_0 from the network.

    Subclasses implement :meth:`transition`, the step from grid time t to the next time s > 0.

    Args:
        schedule: a :class:`ContinuousVPSchedule`; when None one is built from ``input_scale``,
            ``gamma_schedule``, ``logsnr_min`` and ``logsnr_max``.
        parameterization: a :class:`~ambiseg_monai.diffusion.parameterization.DiffusionParameterization`;
            when None one is built from ``prediction_type`` and ``tanh_x_output``.
        num_inference_steps: K, the default number of sampling steps (10 in the paper).
        clip_sample: clamp x̂_0 to [-1, 1] at every step (the masks live in [-1, 1]).

    Attributes:
        timesteps: 1-D float32 tensor of the K sampling times in sampling order (1, ..., 1/K).
        prediction_type: "x", "v" or "eps" (the parameterisation's).
    """

    def __init__(
        self,
        schedule: ContinuousVPSchedule | None = None,
        parameterization: DiffusionParameterization | None = None,
        num_inference_steps: int = 10,
        clip_sample: bool = True,
        input_scale: float = 0.1,
        gamma_schedule: str = "cosine",
        logsnr_min: float | None = -20.0,
        logsnr_max: float | None = 20.0,
        prediction_type: str = "x",
        tanh_x_output: bool = True,
    ) -> None:
        self.schedule = schedule or ContinuousVPSchedule(gamma_schedule, input_scale, logsnr_min, logsnr_max)
        self.parameterization = parameterization or DiffusionParameterization(prediction_type, tanh_x_output)
        self.clip_sample = bool(clip_sample)
        self.set_timesteps(num_inference_steps)

    @property
    def prediction_type(self) -> str:
        return self.parameterization.prediction_type

    # ---------------------------------------------------------------- training side
    def sample_timesteps(
        self, batch: int, device: str | torch.device | None = None, stratified: bool = False
    ) -> torch.Tensor:
        """(B,) training times in [0, 1) (see :func:`~ambiseg_monai.diffusion.protocols.sample_training_times`)."""
        return sample_training_times(batch, stratified, device=device)

    def signal_variance(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) γ(t) = α(t)², float64 on ``timesteps``' device."""
        return torch.as_tensor(self.schedule.gamma(timesteps.detach().double())).to(timesteps.device)

    def coefficients(self, timesteps: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α(t), σ(t)) per row in ``like``'s dtype: B x 1 x ... x 1, or a 0-dim CPU tensor for one time."""
        t = _as_time(timesteps).reshape(-1)
        return _per_row(self.schedule.alpha(t), like), _per_row(self.schedule.sigma(t), like)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = α(t) x_0 + σ(t) ε.

        Args:
            original_samples: x_0, B x C x H x W.
            noise: ε, B x C x H x W.
            timesteps: (B,) times in [0, 1].
        """
        t = timesteps.reshape(-1)
        if t.numel() not in (1, original_samples.shape[0]):
            raise ValueError(f"got {t.numel()} timesteps for a batch of {original_samples.shape[0]} samples.")
        alpha, sigma = self.coefficients(t, original_samples)
        return alpha * original_samples + sigma * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = α(t) ε - σ(t) x_0 (the v-prediction target), B x C x H x W."""
        alpha, sigma = self.coefficients(timesteps, sample)
        return velocity(sample, noise, alpha, sigma)

    def predict(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor | float):
        """(x̂_0, ε̂) from the network output at x_t = ``sample`` and time(s) ``timesteps`` (scalar or (B,))."""
        return self.parameterization.predict(model_output, sample, *self.coefficients(timesteps, sample))

    # ---------------------------------------------------------------- sampling side
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Use K = ``num_inference_steps`` evenly spaced times 1, (K-1)/K, ..., 1/K."""
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        self.num_inference_steps = int(num_inference_steps)
        grid = torch.arange(self.num_inference_steps, 0, -1, dtype=torch.float64) / self.num_inference_steps
        self._times = grid.tolist()
        self.timesteps = grid.float().to(device) if device is not None else grid.float()

    def step_times(self, timestep: torch.Tensor | float) -> tuple[float, float]:
        """(t, s): the grid time matching ``timestep`` and the next (smaller) one, 0 after the last."""
        value = float(timestep)
        index = min(range(len(self._times)), key=lambda i: abs(self._times[i] - value))
        if abs(self._times[index] - value) > 0.25 / self.num_inference_steps:
            raise ValueError(
                f"timestep {value} is not on the sampling grid {self._times}; use the scheduler's timesteps "
                "(set_timesteps) to sample."
            )
        t = self._times[index]
        s = self._times[index + 1] if index + 1 < len(self._times) else 0.0
        return t, s

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampling step from grid time ``timestep`` to the next grid time.

        Args:
            model_output: the network output at (x_t, t), B x C x H x W.
            timestep: one of ``self.timesteps``.
            sample: x_t, B x C x H x W.
            generator: used only when ``noise`` is None (stochastic steps only).
            noise: standard-normal B x C x H x W (ignored by deterministic steps and at the last step).

        Returns:
            (x_s, x̂_0), both B x C x H x W; at the last step x_s is x̂_0.
        """
        t, s = self.step_times(timestep)
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}; expected {tuple(sample.shape)} like the sample "
                "(continuous-time diffusion has no learned variance channels)."
            )
        x0, _ = self.predict(model_output, sample, t)
        if self.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        if s == 0.0:
            return x0, x0
        return self.transition(sample, x0, t, s, noise, generator), x0

    def transition(
        self,
        sample: torch.Tensor,
        x0: torch.Tensor,
        t: float,
        s: float,
        noise: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """x_s from x_t = ``sample`` and the (clipped) x̂_0, for grid times 0 < s < t."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.schedule!r}, {self.parameterization!r}, "
            f"num_inference_steps={self.num_inference_steps}, clip_sample={self.clip_sample})"
        )


class ContinuousDDPMScheduler(ContinuousTimeScheduler):
    """Ancestral sampling from ``p(x_s | x_t) = q(x_s | x_t, x_0 = x̂_0)`` (VDM; paper eq. 2).

    With r = SNR(t) / SNR(s) the posterior mean is ``r (α_s/α_t) x_t + (1 - r) α_s x̂_0`` and the variance
    ``(1 - r) σ_t²`` ("large", the paper's and official code's choice) or ``(1 - r) σ_s²`` ("small", the
    true posterior variance). The last step returns x̂_0.

    Args:
        variance_type: "large" or "small".
        other arguments: see :class:`ContinuousTimeScheduler`.
    """

    def __init__(self, *args, variance_type: str = "large", **kwargs) -> None:
        if variance_type not in ("large", "small"):
            raise ValueError(f"variance_type must be 'large' or 'small', got {variance_type!r}.")
        self.variance_type = variance_type
        super().__init__(*args, **kwargs)

    def posterior_coefficients(self, t: float, s: float) -> tuple[float, float, float]:
        """(coefficient of x_t, coefficient of x̂_0, standard deviation) of ``p(x_s | x_t)``, 0 <= s < t."""
        logsnr_t, logsnr_s = self.schedule.logsnr(t), self.schedule.logsnr(s)
        one_minus_r = -torch.expm1(logsnr_t - logsnr_s)  # 1 - SNR(t)/SNR(s), accurate for close times
        coef_xt = (1.0 - one_minus_r) * self.schedule.alpha(s) / self.schedule.alpha(t)  # r α_s / α_t
        coef_x0 = one_minus_r * self.schedule.alpha(s)
        noise_time = t if self.variance_type == "large" else s
        std = (one_minus_r * self.schedule.sigma(noise_time) ** 2).sqrt()
        return float(coef_xt), float(coef_x0), float(std)

    def transition(self, sample, x0, t, s, noise, generator):
        """``x_s = coef_xt x_t + coef_x0 x̂_0 + std · noise`` (see :meth:`posterior_coefficients`)."""
        coef_xt, coef_x0, std = self.posterior_coefficients(t, s)
        mean = coef_xt * sample + coef_x0 * x0
        return mean + std * standard_noise(sample, noise, generator)


class ContinuousDDIMScheduler(ContinuousTimeScheduler):
    """Deterministic DDIM (Song et al. 2021, η = 0): ``x_s = α_s x̂_0 + σ_s ε̂``; the last step returns x̂_0.

    ``generator`` and ``noise`` are accepted for the protocol and ignored.
    """

    def transition(self, sample, x0, t, s, noise, generator):
        """``x_s = α_s x̂_0 + σ_s ε̂`` with ε̂ consistent with the (possibly clamped) x̂_0, as improved-diffusion's DDIM."""
        alpha_t, sigma_t = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        eps = eps_from_x0(sample, x0, alpha_t, sigma_t)
        alpha_s, sigma_s = float(self.schedule.alpha(s)), float(self.schedule.sigma(s))
        return alpha_s * x0 + sigma_s * eps
