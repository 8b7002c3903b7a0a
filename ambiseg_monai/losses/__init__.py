"""Training losses: the diffusion losses (weighted per-sample terms, the Improved-DDPM hybrid loss with
its variational-bound term), the ELBO losses of the latent-variable baselines and the Monte Carlo
log-likelihood of the Stochastic Segmentation Network.
"""

import ambiseg_monai.losses.diffusion as _diffusion
import ambiseg_monai.losses.elbo as _elbo
import ambiseg_monai.losses.ssn as _ssn
from ambiseg_monai.losses.diffusion import *  # noqa: F403
from ambiseg_monai.losses.elbo import *  # noqa: F403
from ambiseg_monai.losses.ssn import *  # noqa: F403

__all__ = [*_diffusion.__all__, *_elbo.__all__, *_ssn.__all__]
