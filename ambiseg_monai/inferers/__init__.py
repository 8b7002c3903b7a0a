"""Inferers for MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``: the diffusion training step and
the one N-sample inferer (``__call__(inputs, network) -> B x N x H x W``), its consensus-diffusion
configuration, and the latent-variable models' training step and sampler.
"""

import ambiseg_monai.inferers.consensus as _consensus
import ambiseg_monai.inferers.diffusion as _diffusion
import ambiseg_monai.inferers.latent as _latent
from ambiseg_monai.inferers.consensus import *  # noqa: F403
from ambiseg_monai.inferers.diffusion import *  # noqa: F403
from ambiseg_monai.inferers.latent import *  # noqa: F403

__all__ = [*_consensus.__all__, *_diffusion.__all__, *_latent.__all__]
