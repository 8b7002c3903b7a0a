"""Diffusion core: discrete schedulers (respaced DDPM/DDIM), the Improved-DDPM VLB, the sampling loop."""

from ambiseg_monai.diffusion.continuous import ContinuousDDIMScheduler, ContinuousDDPMScheduler, ContinuousVPSchedule
from ambiseg_monai.diffusion.gaussian import GaussianChain, discretized_gaussian_log_likelihood, normal_kl
from ambiseg_monai.diffusion.losses import HybridDiffusionLoss, vlb_term
from ambiseg_monai.diffusion.parameterization import DiffusionParameterization
from ambiseg_monai.diffusion.sampler import make_generators, reverse_diffusion, sample_seed
from ambiseg_monai.diffusion.weighting import LossWeighting
from ambiseg_monai.diffusion.schedulers import (
    RespacedDDIMScheduler,
    RespacedDDPMScheduler,
    evenly_spaced_timesteps,
    split_model_output,
)

__all__ = [
    "ContinuousDDIMScheduler",
    "ContinuousDDPMScheduler",
    "ContinuousVPSchedule",
    "DiffusionParameterization",
    "LossWeighting",
    "GaussianChain",
    "HybridDiffusionLoss",
    "RespacedDDIMScheduler",
    "RespacedDDPMScheduler",
    "discretized_gaussian_log_likelihood",
    "evenly_spaced_timesteps",
    "make_generators",
    "normal_kl",
    "reverse_diffusion",
    "sample_seed",
    "split_model_output",
    "vlb_term",
]
