"""What the bundle configs call and how they are merged: the dataset check and inference inputs
(:mod:`.dataset`), short input errors on the bundle command line (:mod:`.errors`), and the merging of
the shared base configs into standalone bundles with their canonical form (:mod:`.config`,
``ambiseg merge-configs``), and the configs' reading of switches given on the command line
(:func:`.config.as_flag`).
"""

import ambiseg_monai.bundle.config as _config
import ambiseg_monai.bundle.dataset as _dataset
import ambiseg_monai.bundle.errors as _errors
from ambiseg_monai.bundle.config import *  # noqa: F403
from ambiseg_monai.bundle.dataset import *  # noqa: F403
from ambiseg_monai.bundle.errors import *  # noqa: F403

__all__ = [*_config.__all__, *_dataset.__all__, *_errors.__all__]
