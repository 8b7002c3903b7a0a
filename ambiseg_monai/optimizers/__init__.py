"""Learning-rate schedules (as ``LambdaLR`` factors)."""

import ambiseg_monai.optimizers.lr_scheduler as _lr_scheduler
from ambiseg_monai.optimizers.lr_scheduler import *  # noqa: F403

__all__ = [*_lr_scheduler.__all__]
