"""The DICOM SEG of an ambiguous segmentation: N plausible masks plus their consensus, as segments.

One BINARY Segmentation instance (highdicom) references the processed source slices. Segments
1..N are the N sampled masks ("Sample 1".."Sample N"); segment N + 1 is the majority-vote consensus
("Consensus"). Segments overlap (several samples mark the same pixel), which a BINARY SEG allows:
every segment has its own frame for every referenced slice, on the source slices' grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from ambiseg_monai import __version__

__all__ = ["build_ambiguous_segmentation", "segment_labels"]


def segment_labels(num_samples: int) -> list[str]:
    """Labels of the N + 1 segments, in segment-number order."""
    return [f"Sample {n + 1}" for n in range(num_samples)] + ["Consensus"]


def build_ambiguous_segmentation(
    source_datasets: Sequence[pydicom.Dataset],
    samples: np.ndarray,
    consensus: np.ndarray,
    algorithm_name: str = "ambiseg",
    algorithm_version: str = __version__,
    segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
    segmented_property_type=codes.SCT.Lesion,
    series_number: int = 901,
    series_description: str = "ambiseg plausible masks",
) -> hd.seg.Segmentation:
    """A BINARY SEG for the slices ``source_datasets`` (one per processed slice, in the same order).

    Args:
        source_datasets: S single-frame source images (pydicom datasets with pixel data).
        samples: S x N x H x W {0, 1}, H x W the source slices' grid.
        consensus: S x H x W {0, 1}.
        algorithm_name, algorithm_version: recorded as the segments' algorithm identification
            (the bundle name and version).
        segmented_property_category, segmented_property_type: codes of what is segmented
            (default: morphologically abnormal structure / lesion).
        series_number, series_description: of the new SEG series.
    """
    samples = np.asarray(samples)
    consensus = np.asarray(consensus)
    if samples.ndim != 4 or consensus.shape != (samples.shape[0], *samples.shape[2:]):
        raise ValueError(
            f"samples must be S x N x H x W and consensus S x H x W; got {samples.shape}, {consensus.shape}."
        )
    if len(source_datasets) != samples.shape[0]:
        raise ValueError(f"{len(source_datasets)} source slices for {samples.shape[0]} predicted slices.")
    rows, columns = int(source_datasets[0].Rows), int(source_datasets[0].Columns)
    if samples.shape[2:] != (rows, columns):
        raise ValueError(f"masks are {samples.shape[2:]} but the source slices are {rows} x {columns}.")
    num_samples = samples.shape[1]
    # frames x rows x columns x segments: the N samples, then the consensus
    pixel_array = np.concatenate([samples.transpose(0, 2, 3, 1), consensus[..., None]], axis=-1).astype(bool)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=algorithm_version, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=segmented_property_category,
            segmented_property_type=segmented_property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, label in enumerate(segment_labels(num_samples), start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=list(source_datasets),
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ambiseg-monai",
        manufacturer_model_name=algorithm_name,
        software_versions=f"ambiseg-monai {__version__}",
        device_serial_number="0",
        content_description=f"{num_samples} plausible masks and their majority-vote consensus",
        content_label="AMBISEG",
        omit_empty_frames=False,  # every segment keeps a frame per slice: an empty sample is a valid answer
    )
    seg.SeriesDescription = series_description
    return seg
