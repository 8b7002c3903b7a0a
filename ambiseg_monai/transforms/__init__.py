"""MONAI transforms for multi-rater data: loading contract files, the label strategies and rater padding,
the [0, 1] <-> [-1, 1] diffusion range, the post-processing of sampled masks (relative-area filter,
consensus-diffusion combination), and a ``Compose`` that runs training pipelines without metadata. Each array
transform ``X`` has a dictionary version ``Xd``.
"""

import ambiseg_monai.transforms.compose as _compose
import ambiseg_monai.transforms.consensus as _consensus
import ambiseg_monai.transforms.diffusion_range as _diffusion_range
import ambiseg_monai.transforms.keywise as _keywise
import ambiseg_monai.transforms.loading as _loading
import ambiseg_monai.transforms.postprocessing as _postprocessing
import ambiseg_monai.transforms.raters as _raters
from ambiseg_monai.transforms.compose import *  # noqa: F403
from ambiseg_monai.transforms.consensus import *  # noqa: F403
from ambiseg_monai.transforms.diffusion_range import *  # noqa: F403
from ambiseg_monai.transforms.keywise import *  # noqa: F403
from ambiseg_monai.transforms.loading import *  # noqa: F403
from ambiseg_monai.transforms.postprocessing import *  # noqa: F403
from ambiseg_monai.transforms.raters import *  # noqa: F403

__all__ = [
    *_compose.__all__,
    *_consensus.__all__,
    *_diffusion_range.__all__,
    *_keywise.__all__,
    *_loading.__all__,
    *_postprocessing.__all__,
    *_raters.__all__,
]
