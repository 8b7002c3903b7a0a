"""Engine pieces for MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``: ``prepare_batch`` callables
turning a multi-rater batch into engine inputs. (Inferers: :mod:`ambiseg_monai.inferers`; losses:
:mod:`ambiseg_monai.losses`.)
"""

import ambiseg_monai.engines.prepare_batch as _prepare_batch
from ambiseg_monai.engines.prepare_batch import *  # noqa: F403

__all__ = [*_prepare_batch.__all__]
