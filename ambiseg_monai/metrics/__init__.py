"""Ambiguous-segmentation metrics: pure PyTorch functions (B x N x H x W predictions, B x M x H x W raters,
per-image results), the whole suite in one pass (:func:`ambiguous_segmentation_metrics`) and its MONAI
``CumulativeIterationMetric`` (:class:`AmbiguousSegmentationMetrics`). See docs/metrics.md.

Metrics against a known (finite, weighted) true rater distribution, e.g. the demo dataset's stored truth, are
in :mod:`.truth`; the speckle measure in :mod:`.speckle`.
"""

import ambiseg_monai.metrics.collective_insight as _collective_insight
import ambiseg_monai.metrics.energy_distance as _energy_distance
import ambiseg_monai.metrics.inputs as _inputs
import ambiseg_monai.metrics.matching as _matching
import ambiseg_monai.metrics.ncc as _ncc
import ambiseg_monai.metrics.pairwise as _pairwise
import ambiseg_monai.metrics.soft_dice as _soft_dice
import ambiseg_monai.metrics.speckle as _speckle
import ambiseg_monai.metrics.suite as _suite
import ambiseg_monai.metrics.truth as _truth
from ambiseg_monai.metrics.collective_insight import *  # noqa: F403
from ambiseg_monai.metrics.energy_distance import *  # noqa: F403
from ambiseg_monai.metrics.inputs import *  # noqa: F403
from ambiseg_monai.metrics.matching import *  # noqa: F403
from ambiseg_monai.metrics.ncc import *  # noqa: F403
from ambiseg_monai.metrics.pairwise import *  # noqa: F403
from ambiseg_monai.metrics.soft_dice import *  # noqa: F403
from ambiseg_monai.metrics.speckle import *  # noqa: F403
from ambiseg_monai.metrics.suite import *  # noqa: F403
from ambiseg_monai.metrics.truth import *  # noqa: F403

__all__ = [
    *_collective_insight.__all__,
    *_energy_distance.__all__,
    *_inputs.__all__,
    *_matching.__all__,
    *_ncc.__all__,
    *_pairwise.__all__,
    *_soft_dice.__all__,
    *_speckle.__all__,
    *_suite.__all__,
    *_truth.__all__,
]
