"""Small helpers with no better home: device and precision choices (:mod:`.device`)."""

import ambiseg_monai.utils.device as _device
from ambiseg_monai.utils.device import *  # noqa: F403

__all__ = [*_device.__all__]
