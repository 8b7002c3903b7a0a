"""Discrete-time DDPM / DDIM schedulers: MONAI's, with respacing and learned-range variance made exact.

MONAI's :class:`~monai.networks.schedulers.DDPMScheduler` and ``DDIMScheduler`` provide the
schedules, ``add_noise`` and the sampling-step API used by every diffusion method here. Three things
they get wrong or lack, checked against Improved DDPM (Nichol & Dhariwal 2021, the paper and the
``improved-diffusion`` code CIMD builds on):

1. **Respacing (DDPM).** ``set_timesteps(n)`` keeps n of the T training steps but ``step`` still
   uses ᾱ_{t-1} and β_t of the *training* chain, i.e. it performs one ordinary step from t to t-1
   and then jumps. The respaced chain must use ᾱ at the previous *kept* step and
   ``β'_t = 1 - ᾱ_t / ᾱ_prev`` for the posterior mean and variance.
2. **Learned range.** Improved DDPM interpolates the *log* variance between ``log β̃_t`` (clipped
   at t = 0) and ``log β_t``; MONAI interpolates the variances themselves.
3. **DDIM's previous step** is computed as ``t - T // n`` while the kept steps are
   ``round(linspace(T-1, 0, n))``: the two disagree whenever n does not divide T. Also a
   learned-variance model's second half of channels must be dropped before a DDIM step.

And for reproducible sampling every step accepts the standard-normal ``noise`` to add (the sampler
draws it per sample), instead of drawing one tensor for the whole batch from one generator.

Both follow the scheduler protocol of :mod:`ambiseg_monai.diffusion.protocols` (sampling:
``set_timesteps``, ``timesteps``, ``step(..., noise=...)``; training: ``parameterization``,
``sample_timesteps``, ``add_noise``, ``signal_variance``, ``coefficients``), as the continuous-time
schedulers do. The prediction type ("epsilon", "sample", "v_prediction", MONAI's names) is turned
into x̂_0 by :class:`~ambiseg_monai.diffusion.parameterization.DiffusionParameterization`.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai.networks.schedulers.ddpm import DDPMVarianceType

from ambiseg_monai.diffusion.gaussian import GaussianChain
from ambiseg_monai.diffusion.parameterization import DiffusionParameterization
from ambiseg_monai.diffusion.protocols import sample_training_times, standard_noise

__all__ = ["RespacedDDPMScheduler", "RespacedDDIMScheduler", "evenly_spaced_timesteps", "split_model_output"]


def evenly_spaced_timesteps(num_train_timesteps: int, num_inference_steps: int) -> torch.Tensor:
    """Kept training timesteps for a respaced chain, in sampling (descending) order.

    ``round(linspace(T-1, 0, n))``: always contains T-1 and 0; n distinct steps when n <= T.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, {num_train_timesteps}] (the training timesteps), "
            f"got {num_inference_steps}."
        )
    steps = torch.linspace(num_train_timesteps - 1, 0, num_inference_steps).round().long()
    return torch.unique_consecutive(steps)


def split_model_output(model_output: torch.Tensor, sample_channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a learned-variance output B x 2C x H x W into (mean part, variance values); else (output, None)."""
    if model_output.shape[1] == 2 * sample_channels:
        mean_part, var_values = torch.split(model_output, sample_channels, dim=1)
        return mean_part, var_values
    if model_output.shape[1] != sample_channels:
        raise ValueError(
            f"model output has {model_output.shape[1]} channels; expected {sample_channels} "
            f"(or {2 * sample_channels} with a learned variance) for a {sample_channels}-channel sample."
        )
    return model_output, None


class _RespacedMixin:
    """Shared part of the respaced schedulers: the training side of the protocol, the kept steps and their chain."""

    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    prediction_type: str
    clip_sample: bool
    clip_sample_values: list[float]  # [min, max], as MONAI's schedulers set it

    # ---------------------------------------------------------------- training side
    @property
    def parameterization(self) -> DiffusionParameterization:
        """What the network predicts (MONAI's ``prediction_type``; no output activation)."""
        return DiffusionParameterization(self.prediction_type, tanh_x_output=False)

    def sample_timesteps(
        self, batch: int, device: str | torch.device | None = None, stratified: bool = False
    ) -> torch.Tensor:
        """(B,) training steps, uniform in ``[0, num_train_timesteps)``; ``stratified``: one per stratum of
        the batch."""
        if stratified:
            steps = (sample_training_times(batch, True, device) * self.num_train_timesteps).long()
            return steps.clamp(max=self.num_train_timesteps - 1)
        return torch.randint(0, self.num_train_timesteps, (batch,), device=device, dtype=torch.long)

    def signal_variance(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) ᾱ_t of the training chain (float32, on ``timesteps``' device)."""
        return self.alphas_cumprod.to(timesteps.device)[timesteps.long()].float()

    def coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(ᾱ_t), sqrt(1 - ᾱ_t)) per row, B x 1 x ... x 1 in ``like``'s dtype and device (as ``add_noise``)."""
        abar = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device)]
        shape = (-1, *([1] * (like.ndim - 1)))
        return abar.sqrt().reshape(shape), (1 - abar).sqrt().reshape(shape)

    # ---------------------------------------------------------------- sampling side
    def _build_training_chain(self) -> None:
        self.train_chain = GaussianChain(self.alphas_cumprod.detach().cpu().double())

    def _respace(self, num_inference_steps: int, device: str | torch.device | None) -> int:
        """Set the kept timesteps and the respaced chain; returns the number of kept steps (the caller sets
        ``num_inference_steps``, typed differently by MONAI's DDPM and DDIM schedulers)."""
        kept = evenly_spaced_timesteps(self.num_train_timesteps, num_inference_steps)
        self.timesteps = kept.to(device) if device is not None else kept
        ascending = kept.flip(0)
        # the respaced chain: ᾱ at the kept steps; its betas are recomputed from them
        self.sampling_chain = GaussianChain(self.alphas_cumprod.detach().cpu().double()[ascending])
        self._chain_index = {int(t): i for i, t in enumerate(ascending.tolist())}
        return len(kept)

    def chain_index(self, timestep: int | torch.Tensor) -> int:
        """Position of a kept training timestep in the respaced chain (0 = the last sampling step)."""
        t = int(timestep)
        if t not in self._chain_index:
            raise ValueError(f"timestep {t} is not one of the scheduler's kept timesteps; call set_timesteps first.")
        return self._chain_index[t]

    def _predicted_x0(self, output: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
        """x̂_0 at position ``index`` of the sampling chain, clipped when ``clip_sample``."""
        alpha, sigma = self.sampling_chain.coefficients(index, sample)
        pred_x0 = self.parameterization.predict_x0(output, sample, alpha, sigma)
        if self.clip_sample:
            pred_x0 = pred_x0.clamp(self.clip_sample_values[0], self.clip_sample_values[1])
        return pred_x0


class RespacedDDPMScheduler(_RespacedMixin, DDPMScheduler):
    """Ancestral DDPM sampling over any subsequence of the training steps (Improved DDPM respacing).

    Same arguments as :class:`monai.networks.schedulers.DDPMScheduler`. ``variance_type``
    ``"learned_range"`` expects the network to output 2 x C channels (mean part, then v in [-1, 1]);
    ``"learned"`` expects the log variance in the second half.

    Training uses the inherited ``add_noise`` on the full chain (``train_chain``); sampling uses
    ``sampling_chain`` built by :meth:`set_timesteps` (all T steps until it is called).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._build_training_chain()
        self.set_timesteps(self.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Keep ``num_inference_steps`` evenly spaced training steps and build their respaced chain."""
        self.num_inference_steps = self._respace(num_inference_steps, device)

    def model_log_variance(
        self, var_values: torch.Tensor | None, index: int | torch.Tensor, chain: GaussianChain, like: torch.Tensor
    ) -> torch.Tensor:
        """Log variance of ``p(x_{i-1} | x_i)`` at chain position(s) ``index``, broadcastable to ``like``."""
        if self.variance_type == DDPMVarianceType.LEARNED_RANGE:
            if var_values is None:
                raise ValueError("variance_type 'learned_range' needs a model output with 2 x C channels.")
            return chain.learned_range_log_variance(var_values, index)
        if self.variance_type == DDPMVarianceType.LEARNED:
            if var_values is None:
                raise ValueError("variance_type 'learned' needs a model output with 2 x C channels.")
            return var_values
        if self.variance_type == DDPMVarianceType.FIXED_LARGE:
            # Improved DDPM: β̃_1 at the first step gives a better decoder likelihood than β_0
            large = torch.cat([chain.posterior_variance[1:2] if len(chain) > 1 else chain.betas[:1], chain.betas[1:]])
            return chain.gather(large.log(), index, like)
        return chain.gather(chain.posterior_log_variance_clipped, index, like)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step from kept step ``timestep`` to the previous kept step.

        Args:
            model_output: B x C x H x W, or B x 2C x H x W with a learned variance.
            timestep: a kept training timestep (from ``self.timesteps``).
            sample: x_t, B x C x H x W.
            generator: used only when ``noise`` is None.
            noise: standard-normal B x C x H x W added (scaled) unless this is the final step.

        Returns:
            (x_prev, predicted x_0), both B x C x H x W.
        """
        output, var_values = split_model_output(model_output, sample.shape[1])
        chain = self.sampling_chain
        index = self.chain_index(timestep)
        pred_x0 = self._predicted_x0(output, sample, index)
        mean = chain.posterior_mean(pred_x0, sample, index)
        if index == 0:  # the last step returns the mean (no noise), as in DDPM
            return mean, pred_x0
        log_variance = self.model_log_variance(var_values, index, chain, sample)
        std = torch.exp(0.5 * log_variance)
        return mean + std * standard_noise(sample, noise, generator), pred_x0


class RespacedDDIMScheduler(_RespacedMixin, DDIMScheduler):
    """DDIM sampling whose previous step is the next kept step (see the module docstring).

    Same arguments as :class:`monai.networks.schedulers.DDIMScheduler`, plus ``eta`` (0 = deterministic
    DDIM, 1 = DDPM-like stochasticity). A learned-variance model's extra channels are ignored.
    """

    def __init__(self, *args, eta: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eta = float(eta)
        self._build_training_chain()
        self.set_timesteps(self.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Keep ``num_inference_steps`` evenly spaced training steps (DDIM uses their ᾱ directly)."""
        if not hasattr(self, "train_chain"):  # called by DDIMScheduler.__init__ before our attributes exist
            super().set_timesteps(num_inference_steps, device)
            return
        self.num_inference_steps = self._respace(num_inference_steps, device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step (Song et al. eq. 12) from kept step ``timestep`` to the previous kept step.

        Args:
            model_output: B x C x H x W, or B x 2C x H x W (variance channels are dropped).
            timestep: a kept training timestep (from ``self.timesteps``).
            sample: x_t, B x C x H x W.
            eta: overrides the constructor's ``eta`` when given.
            generator, noise: as in :meth:`RespacedDDPMScheduler.step`; used only when eta > 0.
        """
        eta = self.eta if eta is None else float(eta)
        output, _ = split_model_output(model_output, sample.shape[1])
        chain = self.sampling_chain
        index = self.chain_index(timestep)
        abar_t = chain.gather(chain.alphas_cumprod, index, sample)
        abar_prev = chain.gather(chain.alphas_cumprod_prev, index, sample)
        pred_x0 = self._predicted_x0(output, sample, index)
        # ε consistent with the (possibly clipped) x0, as in improved-diffusion's ddim_sample
        eps = (sample - abar_t.sqrt() * pred_x0) / (1.0 - abar_t).sqrt()
        sigma = eta * ((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)).sqrt()
        prev = abar_prev.sqrt() * pred_x0 + (1.0 - abar_prev - sigma**2).clamp(min=0.0).sqrt() * eps
        if eta > 0 and index > 0:
            prev = prev + sigma * standard_noise(sample, noise, generator)
        return prev, pred_x0
