"""Data: the datalist contract, multi-rater MONAI transforms and the demo dataset.

Names are imported lazily: importers (``preprocessing``) and ``ambiseg prepare`` use the
contract without paying for MONAI's (and torch's) import time.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ambiseg_monai.data.datalist": (
        "DATALIST_FILENAME",
        "SPLITS",
        "DatalistError",
        "DatasetExistsError",
        "DatasetWriter",
        "item_num_raters",
        "load_datalist",
        "load_split",
        "max_num_raters",
        "split_patients",
        "validate_datalist",
    ),
    "ambiseg_monai.data.demo": ("DemoConfig", "ensure_demo_dataset", "generate_demo_dataset"),
    "ambiseg_monai.data.transforms": (
        "ConsensusLevel",
        "LoadImage2D",
        "LoadImage2Dd",
        "MaskToSymmetric",
        "MaskToSymmetricd",
        "MeanRaters",
        "MeanRatersd",
        "PadRaters",
        "PadRatersd",
        "RandomConsensusLevel",
        "RandomConsensusLeveld",
        "SelectRandomRater",
        "SelectRandomRaterd",
        "SelectRater",
        "SelectRaterd",
        "SymmetricToMask",
        "SymmetricToMaskd",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'ambiseg_monai.data' has no attribute '{name}'")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
