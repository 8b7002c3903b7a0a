"""Diffusion core: the scheduler protocol, discrete (respaced DDPM/DDIM) and continuous-time schedulers,
the parameterisation (x_0 / v / ε), the losses and the sampling loop."""

from ambiseg_monai.diffusion.continuous import (
    ContinuousDDIMScheduler,
    ContinuousDDPMScheduler,
    ContinuousTimeScheduler,
    ContinuousVPSchedule,
)
from ambiseg_monai.diffusion.gaussian import GaussianChain, discretized_gaussian_log_likelihood, normal_kl
from ambiseg_monai.diffusion.losses import DiffusionLoss, HybridDiffusionLoss, vlb_term
from ambiseg_monai.diffusion.mixture_posterior import mixture_posterior_mean, rater_posterior_target
from ambiseg_monai.diffusion.oracle import MixtureOracleDenoiser, signal_variance_of
from ambiseg_monai.diffusion.parameterization import DiffusionParameterization
from ambiseg_monai.diffusion.protocols import (
    LearnedVarianceScheduler,
    SamplingScheduler,
    TrainingScheduler,
    sample_training_times,
)
from ambiseg_monai.diffusion.sampler import make_generators, reverse_diffusion, sample_seed
from ambiseg_monai.diffusion.schedulers import (
    RespacedDDIMScheduler,
    RespacedDDPMScheduler,
    evenly_spaced_timesteps,
    split_model_output,
)
from ambiseg_monai.diffusion.weighting import LossWeighting

__all__ = [
    "ContinuousDDIMScheduler",
    "ContinuousDDPMScheduler",
    "ContinuousTimeScheduler",
    "ContinuousVPSchedule",
    "DiffusionLoss",
    "DiffusionParameterization",
    "LearnedVarianceScheduler",
    "LossWeighting",
    "GaussianChain",
    "HybridDiffusionLoss",
    "RespacedDDIMScheduler",
    "RespacedDDPMScheduler",
    "SamplingScheduler",
    "TrainingScheduler",
    "discretized_gaussian_log_likelihood",
    "evenly_spaced_timesteps",
    "make_generators",
    "mixture_posterior_mean",
    "MixtureOracleDenoiser",
    "normal_kl",
    "rater_posterior_target",
    "reverse_diffusion",
    "sample_seed",
    "sample_training_times",
    "signal_variance_of",
    "split_model_output",
    "vlb_term",
]
