"""Noise schedulers, following the protocols of :mod:`ambiseg_monai.diffusion.protocols`: the
discrete-time respaced DDPM / DDIM schedulers (built on ``monai.networks.schedulers``) and the
continuous-time VP schedule with its DDPM / DDIM samplers.
"""

import ambiseg_monai.schedulers.continuous as _continuous
import ambiseg_monai.schedulers.respaced as _respaced
from ambiseg_monai.schedulers.continuous import *  # noqa: F403
from ambiseg_monai.schedulers.respaced import *  # noqa: F403

__all__ = [*_continuous.__all__, *_respaced.__all__]
