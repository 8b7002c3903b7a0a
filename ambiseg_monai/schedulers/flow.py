"""Rectified flow (flow matching with linear interpolation) behind the diffusion core's scheduler protocol.

Time runs from t = 0 (data) to t = 1 (noise), as in MONAI's
:class:`~monai.networks.schedulers.RFlowScheduler`: ``x_t = (1 - t) x_0 + t ε``, so α(t) = 1 - t and
σ(t) = t (not variance preserving: α + σ = 1). The network predicts the velocity ``u = x_0 - ε`` (prediction
type ``"flow"``; MONAI's sign and Liu et al.'s: it points from the noise to the data), and sampling integrates
the ODE ``dx/dt = -u(x, t)`` from t = 1 down to 0. ``"x"`` (x_0) prediction is accepted too: the velocity is
then ``x̂_0 - ε̂``. ε and the variance-preserving v are rejected: x_0 = (x_t - t ε) / (1 - t) is undefined at
t = 1, where sampling starts.

- :class:`RectifiedFlowScheduler` is the training side (``sample_timesteps``, ``add_noise``,
  ``signal_variance``, ``coefficients``, ``logsnr``) and the **Euler** ODE solver:
  ``x_s = x_t + (t - s) û``. The last step (to s = 0) returns ``x̂_0 = x_t + t û`` (the same Euler step).
- :class:`RectifiedFlowHeunScheduler`: Heun's second-order method (the trapezoid predictor-corrector of
  Karras et al. 2022): two network calls per step, except the last step (Euler to 0, where the velocity
  of a noiseless sample is not defined). Its ``timesteps`` list every interior time twice (predictor,
  then corrector), so the one reverse-diffusion loop (one network call per entry) runs it unchanged:
  K steps cost 2K - 1 network calls.
- :class:`RectifiedFlowSDEScheduler`: Euler–Maruyama on the reverse-time SDE with the same marginals,
  ``dx = [-u - ½ g² ∇log p_t] dt + g dW̄`` with ``g(t)² = 2 η t`` and the score ``∇log p_t = -ε̂ / t``:
  ``x_s = x_t + h (û - η ε̂) + √(2 η t h) z``, h = t - s. η = 0 is the Euler ODE.

Times. The scheduler's ``timesteps`` (what the network receives, and what ``add_noise`` / ``coefficients``
take) are ``t * time_scale``: ``time_scale = 1000`` for a denoiser built for DDPM's integer steps (CIMD,
consensus diffusion: MONAI's sinusoidal embedding resolves 0..1000), 1 for AmbDiffSeg's continuous-time
denoiser (it scales t by 1000 itself). MONAI's RFlowScheduler calls this scale ``num_train_timesteps``.

- Training times: ``"uniform"`` or ``"logit_normal"`` (SD3, Esser et al. 2024: ``t = sigmoid(m + s n)``),
  both drawn by the inverse CDF of a uniform draw so that ``stratified`` (one draw per stratum of the batch,
  AmbDiffSeg's "uniform_low_d") works for both; then the ``shift``; then mapped to ``[t_min, 1)``.
- ``shift`` s (>= 1 puts more of the training and of the sampling grid at the noisy end):
  ``t' = s t / (1 + (s - 1) t)``, MONAI's ``timestep_transform`` with a fixed ratio (SD3's shift). It
  divides the SNR ``((1 - t) / t)²`` by s², as AmbDiffSeg's input scaling b = 1 / s multiplies it by b².
- Sampling grid: K steps on ``1, 1 - 1/K, ..., 1/K`` (shifted), then 0.

What does not fit from MONAI's ``RFlowScheduler`` (so this is not a subclass of it): ``step`` takes no
per-sample ``noise`` (the protocol's reproducible per-sample randomness) and casts ``next_timestep`` to
``int`` (times in [0, 1] would be truncated to 0); ``set_timesteps`` stores the grid as float16 and allows
at most ``num_train_timesteps`` steps; ``sample_timesteps(x_start)`` has another signature and no
stratification; there is only an Euler step. Its interpolation, its velocity sign and its Euler step are
the same as here (``tests/test_flow_matching.py`` checks them against it) and its ``timestep_transform``
computes the shift.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.networks.schedulers.rectified_flow import timestep_transform

from ambiseg_monai.diffusion.parameterization import DiffusionParameterization
from ambiseg_monai.diffusion.protocols import sample_training_times, standard_noise
from ambiseg_monai.schedulers.continuous import _as_time, _per_row
from ambiseg_monai.schedulers.respaced import split_model_output

__all__ = [
    "TIME_DISTRIBUTIONS",
    "FLOW_PREDICTION_TYPES",
    "RectifiedFlowScheduler",
    "RectifiedFlowHeunScheduler",
    "RectifiedFlowSDEScheduler",
]

#: training-time distributions of :class:`RectifiedFlowScheduler`
TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
#: what a rectified-flow network may predict (canonical names of ``DiffusionParameterization``)
FLOW_PREDICTION_TYPES = ("flow", "x")


class RectifiedFlowScheduler:
    """Rectified flow: training side of the protocol and the Euler ODE sampler.

    Args:
        num_inference_steps: K, the default number of solver steps.
        time_scale: the network's time input is ``t * time_scale`` (see the module docstring).
        prediction_type: "flow" (the velocity x_0 - ε) or "x"; ignored when ``parameterization`` is given.
        tanh_x_output: with "x", pass the network output through tanh.
        parameterization: a :class:`~ambiseg_monai.diffusion.parameterization.DiffusionParameterization`
            ("flow" or "x").
        time_distribution: "uniform" or "logit_normal" training times.
        logit_normal_loc, logit_normal_scale: m and s of the logit-normal distribution (SD3: 0 and 1).
        shift: the time shift s > 0 applied to training times and to the sampling grid (1: none).
        t_min: training times lie in ``[t_min, 1)``: at t = 0 the rater-posterior target's ε = (x_t - α x̂_0) / t
            is 0 / 0. The sampler never evaluates the network below its last grid time.

    Attributes:
        timesteps: 1-D float32 tensor of the network's time inputs in sampling order.
        prediction_type: the parameterisation's ("flow" or "x").
    """

    def __init__(
        self,
        num_inference_steps: int = 50,
        time_scale: float = 1.0,
        prediction_type: str = "flow",
        tanh_x_output: bool = False,
        parameterization: DiffusionParameterization | None = None,
        time_distribution: str = "uniform",
        logit_normal_loc: float = 0.0,
        logit_normal_scale: float = 1.0,
        shift: float = 1.0,
        t_min: float = 1e-4,
    ) -> None:
        self.parameterization = parameterization or DiffusionParameterization(prediction_type, tanh_x_output)
        if self.parameterization.prediction_type not in FLOW_PREDICTION_TYPES:
            raise ValueError(
                f"rectified flow predicts the velocity ('flow') or x_0 ('x'), not "
                f"{self.parameterization.prediction_type!r}: with x_t = (1 - t) x_0 + t ε, x_0 = (x_t - t ε) / (1 - t) "
                "is undefined at t = 1 where sampling starts, and 'v' is the variance-preserving velocity."
            )
        if not float(time_scale) > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}.")
        if time_distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(f"time_distribution must be one of {TIME_DISTRIBUTIONS}, got {time_distribution!r}.")
        if not float(logit_normal_scale) > 0:
            raise ValueError(f"logit_normal_scale must be positive, got {logit_normal_scale}.")
        if not float(shift) > 0:
            raise ValueError(f"shift must be positive, got {shift}.")
        if not 0.0 <= float(t_min) < 1.0:
            raise ValueError(f"t_min must lie in [0, 1), got {t_min}.")
        self.time_scale = float(time_scale)
        self.time_distribution = time_distribution
        self.logit_normal_loc = float(logit_normal_loc)
        self.logit_normal_scale = float(logit_normal_scale)
        self.shift = float(shift)
        self.t_min = float(t_min)
        self.set_timesteps(num_inference_steps)

    @property
    def prediction_type(self) -> str:
        return self.parameterization.prediction_type

    # ---------------------------------------------------------------- time
    def to_time(self, timesteps: torch.Tensor | float) -> torch.Tensor:
        """The network's time input -> t in [0, 1] (float64)."""
        return _as_time(timesteps) / self.time_scale

    def shifted(self, t: torch.Tensor) -> torch.Tensor:
        """``s t / (1 + (s - 1) t)``: MONAI's ``timestep_transform`` with the fixed ratio ``shift``."""
        if self.shift == 1.0:
            return t
        return timestep_transform(
            t, input_img_size_numel=1, base_img_size_numel=1, scale=self.shift, num_train_timesteps=1, spatial_dim=1
        )

    # ---------------------------------------------------------------- training side
    def sample_timesteps(
        self, batch: int, device: str | torch.device | None = None, stratified: bool = False
    ) -> torch.Tensor:
        """(B,) training times (network units, float32): uniform or logit-normal, shifted, in [t_min, 1)."""
        u = sample_training_times(batch, stratified, device=device)
        if self.time_distribution == "logit_normal":
            normal = math.sqrt(2.0) * torch.erfinv((2.0 * u - 1.0).clamp(-1.0 + 1e-7, 1.0 - 1e-7))
            u = torch.sigmoid(self.logit_normal_loc + self.logit_normal_scale * normal)
        t = self.t_min + (1.0 - self.t_min) * self.shifted(u)
        return (t * self.time_scale).float()

    def signal_variance(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) α(t)² = (1 - t)², float64 on ``timesteps``' device (σ² = t², not 1 - α²)."""
        return (1.0 - self.to_time(timesteps.detach())) ** 2

    def coefficients(self, timesteps: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α(t), σ(t)) = (1 - t, t) per row in ``like``'s dtype: B x 1 x ... x 1, or 0-dim on the CPU for one time."""
        t = self.to_time(timesteps).reshape(-1)
        return _per_row(1.0 - t, like), _per_row(t, like)

    def logsnr(self, timesteps: torch.Tensor | float) -> torch.Tensor:
        """log SNR = 2 log((1 - t) / t) (float64), for :class:`~ambiseg_monai.diffusion.weighting.LossWeighting`."""
        t = self.to_time(timesteps)
        return 2.0 * (torch.log1p(-t) - torch.log(t))

    def dlogsnr_dt(self, timesteps: torch.Tensor | float) -> torch.Tensor:
        """d logSNR / d(timestep) = -2 / (t (1 - t)) / time_scale (per unit of the network's time input)."""
        t = self.to_time(timesteps)
        return -2.0 / (t * (1.0 - t)) / self.time_scale

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t ε (MONAI's ``RFlowScheduler.add_noise``), B x C x H x W."""
        t = timesteps.reshape(-1)
        if t.numel() not in (1, original_samples.shape[0]):
            raise ValueError(f"got {t.numel()} timesteps for a batch of {original_samples.shape[0]} samples.")
        alpha, sigma = self.coefficients(t, original_samples)
        return alpha * original_samples + sigma * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The regression target u = x_0 - ε (does not depend on t), B x C x H x W."""
        return sample - noise

    def predict(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor | float):
        """(x̂_0, ε̂) from the network output at x_t = ``sample`` and time(s) ``timesteps``."""
        return self.parameterization.predict(model_output, sample, *self.coefficients(timesteps, sample))

    def velocity(self, model_output: torch.Tensor, sample: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(û, x̂_0) at x_t = ``sample`` and time t in (0, 1]: the raw output and ``x_t + t û`` with "flow",
        ``x̂_0 - ε̂`` and x̂_0 with "x"."""
        if self.prediction_type == "flow":
            return model_output, sample + t * model_output
        x0, eps = self.parameterization.predict(model_output, sample, 1.0 - t, t)
        return x0 - eps, x0

    # ---------------------------------------------------------------- sampling side
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """K = ``num_inference_steps`` solver steps on the (shifted) grid 1, 1 - 1/K, ..., 1/K, then 0."""
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        self.num_inference_steps = int(num_inference_steps)
        base = torch.arange(self.num_inference_steps, -1, -1, dtype=torch.float64) / self.num_inference_steps
        self._grid = self.shifted(base).tolist()  # t_0 = 1 > ... > t_K = 0
        times = torch.tensor(self._evaluation_indices(), dtype=torch.long)
        values = (torch.tensor(self._grid, dtype=torch.float64)[times] * self.time_scale).float()
        self.timesteps = values.to(device) if device is not None else values
        self._pending: dict[str, Any] | None = None  # Heun: the predictor's x_t, û, t and target grid index

    def _evaluation_indices(self) -> list[int]:
        """Grid index of each network call, in order (Euler: one per step)."""
        return list(range(self.num_inference_steps))

    def grid_index(self, timestep: torch.Tensor | float) -> int:
        """Index i of the grid time t_i matching the network time ``timestep``."""
        value = float(timestep) / self.time_scale
        index = min(range(self.num_inference_steps), key=lambda i: abs(self._grid[i] - value))
        gaps = [self._grid[i] - self._grid[i + 1] for i in range(self.num_inference_steps)]
        if abs(self._grid[index] - value) > 0.25 * min(gaps):
            raise ValueError(
                f"timestep {float(timestep)} is not on the sampling grid {self.timesteps.tolist()}; use the "
                "scheduler's timesteps (set_timesteps) to sample."
            )
        return index

    def _check_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The velocity / x_0 part of the output (a learned-variance network's extra channels are dropped)."""
        output, _ = split_model_output(model_output, sample.shape[1])
        if output.shape != sample.shape:
            raise ValueError(f"model output has shape {tuple(model_output.shape)}; expected {tuple(sample.shape)}.")
        return output

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One solver step from grid time ``timestep`` to the next grid time.

        Args:
            model_output: the network output at (x_t, t), B x C x H x W (B x 2C x H x W: the variance half
                of a learned-variance network is ignored).
            timestep: one of ``self.timesteps``.
            sample: x_t, B x C x H x W.
            generator, noise: used by the stochastic solver only (:class:`RectifiedFlowSDEScheduler`).

        Returns:
            (x_s, x̂_0), both B x C x H x W; after the last step x_s is x̂_0 (t = 0).
        """
        output = self._check_output(model_output, sample)
        index = self.grid_index(timestep)
        t, s = self._grid[index], self._grid[index + 1]
        u, x0 = self.velocity(output, sample, t)
        if s == 0.0:
            return x0, x0
        return self.transition(sample, u, x0, index, t, s, noise, generator), x0

    def transition(self, sample, u, x0, index, t, s, noise, generator) -> torch.Tensor:
        """Euler: ``x_s = x_t + (t - s) û``."""
        return sample + (t - s) * u

    def __repr__(self) -> str:
        extra = f", logit_normal=({self.logit_normal_loc}, {self.logit_normal_scale})" * (
            self.time_distribution == "logit_normal"
        )
        return (
            f"{type(self).__name__}({self.parameterization!r}, num_inference_steps={self.num_inference_steps}, "
            f"time_scale={self.time_scale}, time_distribution={self.time_distribution!r}{extra}, shift={self.shift})"
        )


class RectifiedFlowHeunScheduler(RectifiedFlowScheduler):
    """Heun's method (2nd order): predictor ``x' = x_t + h û(x_t, t)``, corrector
    ``x_s = x_t + h (û(x_t, t) + û(x', s)) / 2``; the last step (to 0) is Euler. K steps: 2K - 1 network calls.

    ``timesteps`` holds t_0, t_1, t_1, t_2, t_2, ..., t_{K-1}, t_{K-1}: a call at a time the previous
    (predictor) call stepped to is the corrector, any other call a predictor. The scheduler keeps the
    predictor's x_t and û between the two calls (reset by :meth:`set_timesteps`), so one scheduler runs one
    chain at a time; the N-sample inferer's rows (and its ``max_rows`` chunks) are one chain each in turn.
    """

    def _evaluation_indices(self) -> list[int]:
        return [0] + [i for i in range(1, self.num_inference_steps) for _ in (0, 1)]

    def step(self, model_output, timestep, sample, generator=None, noise=None):
        output = self._check_output(model_output, sample)
        index = self.grid_index(timestep)
        pending = self._pending
        if pending is not None and pending["to"] == index and pending["x"].shape == sample.shape:
            self._pending = None  # corrector: average the velocities at both ends of the step
            u, x0 = self.velocity(output, sample, self._grid[index])
            h = pending["t"] - self._grid[index]
            return pending["x"] + h * 0.5 * (pending["u"] + u), x0
        self._pending = None
        t, s = self._grid[index], self._grid[index + 1]
        u, x0 = self.velocity(output, sample, t)
        if s == 0.0:
            return x0, x0
        self._pending = {"x": sample, "u": u, "t": t, "to": index + 1}
        return sample + (t - s) * u, x0


class RectifiedFlowSDEScheduler(RectifiedFlowScheduler):
    """Euler–Maruyama on the reverse SDE with the flow's marginals: ``x_s = x_t + h (û - η ε̂) + √(2 η t h) z``.

    Args:
        noise_scale: η >= 0 (the diffusion ``g(t)² = 2 η t``; 0 is the Euler ODE). The last step returns x̂_0.
        other arguments: see :class:`RectifiedFlowScheduler`.
    """

    def __init__(self, *args, noise_scale: float = 1.0, **kwargs) -> None:
        if not float(noise_scale) >= 0:
            raise ValueError(f"noise_scale must be >= 0, got {noise_scale}.")
        self.noise_scale = float(noise_scale)
        super().__init__(*args, **kwargs)

    def transition(self, sample, u, x0, index, t, s, noise, generator) -> torch.Tensor:
        h = t - s
        eps = (sample - (1.0 - t) * x0) / t  # ε̂ consistent with x̂_0 (score -ε̂ / t)
        drift = sample + h * (u - self.noise_scale * eps)
        return drift + math.sqrt(2.0 * self.noise_scale * t * h) * standard_noise(sample, noise, generator)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", noise_scale={self.noise_scale})"
