"""Data: the datalist contract, multi-rater MONAI transforms and the demo dataset."""

from ambiseg_monai.data.datalist import (
    DATALIST_FILENAME,
    SPLITS,
    DatalistError,
    DatasetExistsError,
    DatasetWriter,
    item_num_raters,
    load_datalist,
    load_split,
    max_num_raters,
    split_patients,
    validate_datalist,
)
from ambiseg_monai.data.demo import DemoConfig, ensure_demo_dataset, generate_demo_dataset
from ambiseg_monai.data.transforms import (
    ConsensusLevel,
    LoadImage2D,
    LoadImage2Dd,
    MaskToSymmetric,
    MaskToSymmetricd,
    MeanRaters,
    MeanRatersd,
    PadRaters,
    PadRatersd,
    RandomConsensusLevel,
    RandomConsensusLeveld,
    SelectRandomRater,
    SelectRandomRaterd,
    SelectRater,
    SelectRaterd,
    SymmetricToMask,
    SymmetricToMaskd,
)
