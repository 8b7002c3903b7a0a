"""Noise schedulers, following the protocols of :mod:`ambiseg_monai.diffusion.protocols`: the
discrete-time respaced DDPM / DDIM schedulers (built on ``monai.networks.schedulers``), the
continuous-time VP schedule with its DDPM / DDIM samplers, and rectified flow (flow matching) with its
Euler, Heun and Euler–Maruyama solvers.
"""

import ambiseg_monai.schedulers.continuous as _continuous
import ambiseg_monai.schedulers.flow as _flow
import ambiseg_monai.schedulers.respaced as _respaced
from ambiseg_monai.schedulers.continuous import *  # noqa: F403
from ambiseg_monai.schedulers.flow import *  # noqa: F403
from ambiseg_monai.schedulers.respaced import *  # noqa: F403

__all__ = [*_continuous.__all__, *_flow.__all__, *_respaced.__all__]
