"""Taking a trained bundle to the clinic: TorchScript export and the MONAI Deploy application.

- :mod:`~ambiseg_monai.deploy.export`: ``ambiseg export``, the traced model with configs and metadata;
- :mod:`~ambiseg_monai.deploy.exported`: reading it back, adapters the samplers run on;
- :mod:`~ambiseg_monai.deploy.predictor`: a bundle's N-sample inferer on the slices of a volume;
- :mod:`~ambiseg_monai.deploy.app` / :mod:`~ambiseg_monai.deploy.operators` /
  :mod:`~ambiseg_monai.deploy.dicom_seg`: the MONAI Deploy application and its DICOM SEG writer; run with
  ``python -m ambiseg_monai.deploy``.

The modules that need the ``deploy`` extra (the MONAI Deploy SDK, highdicom: ``app``, ``operators``,
``dicom_seg``) are not re-exported here, so that the export works without it.
"""

import ambiseg_monai.deploy.export as _export
import ambiseg_monai.deploy.exported as _exported
import ambiseg_monai.deploy.inputs as _inputs
import ambiseg_monai.deploy.predictor as _predictor
import ambiseg_monai.deploy.preprocessing as _preprocessing
import ambiseg_monai.deploy.volumes as _volumes
from ambiseg_monai.deploy.export import *  # noqa: F403
from ambiseg_monai.deploy.exported import *  # noqa: F403
from ambiseg_monai.deploy.inputs import *  # noqa: F403
from ambiseg_monai.deploy.predictor import *  # noqa: F403
from ambiseg_monai.deploy.preprocessing import *  # noqa: F403
from ambiseg_monai.deploy.volumes import *  # noqa: F403

__all__ = [
    *_export.__all__,
    *_exported.__all__,
    *_inputs.__all__,
    *_predictor.__all__,
    *_preprocessing.__all__,
    *_volumes.__all__,
]
