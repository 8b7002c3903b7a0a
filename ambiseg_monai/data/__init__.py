"""Data: the datalist contract (read, validate, atomic write), contract NIfTI I/O and the demo dataset.

Nothing here imports torch or MONAI: importers (``preprocessing``) and ``ambiseg prepare`` use the
contract without paying for their import time (``tests/test_cli.py`` checks it).
"""

import ambiseg_monai.data.datalist as _datalist
import ambiseg_monai.data.demo as _demo
import ambiseg_monai.data.nifti as _nifti
from ambiseg_monai.data.datalist import *  # noqa: F403
from ambiseg_monai.data.demo import *  # noqa: F403
from ambiseg_monai.data.nifti import *  # noqa: F403

__all__ = [*_datalist.__all__, *_nifti.__all__, *_demo.__all__]
