"""Diffusion core (the math, no engine code): the scheduler protocols, the parameterisation
(x_0 / v / ε), the closed-form Gaussian chain, loss weightings w(t), the reverse-diffusion loop, and the
exact mixture denoiser and rater-posterior targets. Schedulers implementing the protocols:
:mod:`ambiseg_monai.schedulers`; losses: :mod:`ambiseg_monai.losses`.
"""

import ambiseg_monai.diffusion.gaussian as _gaussian
import ambiseg_monai.diffusion.mixture_posterior as _mixture_posterior
import ambiseg_monai.diffusion.oracle as _oracle
import ambiseg_monai.diffusion.parameterization as _parameterization
import ambiseg_monai.diffusion.protocols as _protocols
import ambiseg_monai.diffusion.sampler as _sampler
import ambiseg_monai.diffusion.weighting as _weighting
from ambiseg_monai.diffusion.gaussian import *  # noqa: F403
from ambiseg_monai.diffusion.mixture_posterior import *  # noqa: F403
from ambiseg_monai.diffusion.oracle import *  # noqa: F403
from ambiseg_monai.diffusion.parameterization import *  # noqa: F403
from ambiseg_monai.diffusion.protocols import *  # noqa: F403
from ambiseg_monai.diffusion.sampler import *  # noqa: F403
from ambiseg_monai.diffusion.weighting import *  # noqa: F403

__all__ = [
    *_gaussian.__all__,
    *_mixture_posterior.__all__,
    *_oracle.__all__,
    *_parameterization.__all__,
    *_protocols.__all__,
    *_sampler.__all__,
    *_weighting.__all__,
]
