"""Training losses: the diffusion losses (weighted per-sample terms, the Improved-DDPM hybrid loss with
its variational-bound term) and the ELBO losses of the latent-variable baselines.
"""

import ambiseg_monai.losses.diffusion as _diffusion
import ambiseg_monai.losses.elbo as _elbo
from ambiseg_monai.losses.diffusion import *  # noqa: F403
from ambiseg_monai.losses.elbo import *  # noqa: F403

__all__ = [*_diffusion.__all__, *_elbo.__all__]
