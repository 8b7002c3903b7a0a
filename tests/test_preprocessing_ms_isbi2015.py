"""ISBI 2015 MS importer: orientation, channels, normalisation, slice selection, subject split."""

from __future__ import annotations

import numpy as np
import pytest

from _fixtures_preprocessing import make_isbi_subject, save_nifti
from ambiseg_monai.cli import main as cli_main
from ambiseg_monai.data.datalist import load_datalist, validate_datalist
from ambiseg_monai.data.nifti import load_channel_first_nifti
from ambiseg_monai.preprocessing.ms_isbi2015 import prepare_ms_isbi2015

SHAPE = (20, 24, 6)  # x, y, z of the fixture volumes


@pytest.fixture
def isbi(tmp_path):
    root = tmp_path / "isbi"
    written = {s: make_isbi_subject(root, s, shape=SHAPE) for s in (1, 2, 3)}
    return root, written


def test_native_size_slices_orientation_and_normalisation(isbi, tmp_path):
    root, written = isbi
    prepare_ms_isbi2015(root, tmp_path / "out", size=(24, 20), test_subjects=("training03",),
                        validation_subjects=("training02",), progress=False)
    datalist = load_datalist(tmp_path / "out")
    stats = validate_datalist(tmp_path / "out", required_splits=("training", "validation", "test"))
    # 2 time points x 5 brain slices (slice 0 is empty) per subject
    assert stats["num_items"] == {"training": 10, "validation": 10, "test": 10}
    assert {i["patient_id"] for i in datalist["test"]} == {"training03"}
    item = next(i for i in datalist["training"] if i["case_id"] == "training01_02_z002")
    assert item["lesion"] and item["timepoint"] == 2 and datalist["image_channels"] == 4
    label, _ = load_channel_first_nifti(tmp_path / "out" / item["label"])
    image, _ = load_channel_first_nifti(tmp_path / "out" / item["image"])
    # rows = y reversed (anterior on top), columns = x reversed: x 5:9, y 6:10 -> rows 14:18, columns 11:15
    expected = np.zeros((24, 20), np.uint8)
    expected[14:18, 11:15] = 1
    np.testing.assert_array_equal(label[0], expected)
    assert label[1].sum() == 36
    volumes, _ = written[1][2]
    flair = volumes["flair"]
    brain = flair != 0
    low, high = np.percentile(flair[brain], (0.5, 99.5))
    expected_flair = np.clip((flair[:, :, 2] - low) / (high - low), 0, 1).T[::-1, ::-1]
    np.testing.assert_allclose(image[0], expected_flair, atol=1e-5)
    assert image.shape == (4, 24, 20) and 0.0 <= image.min() and image.max() <= 1.0


def test_lesion_slices_resize_and_seeded_subject_split(isbi, tmp_path):
    root, _ = isbi
    prepare_ms_isbi2015(root, tmp_path / "out", size=(8, 8), keep_aspect=True, lesion_slices_only=True,
                        empty_fraction=1 / 3, workers=2, progress=False)
    datalist = load_datalist(tmp_path / "out")
    items = [i for split in ("training", "validation", "test") for i in datalist[split]]
    # per time point: the 2 lesion slices + round(3 * 1/3) = 1 of the 3 lesion-free brain slices
    assert len(items) == 3 * 2 * 3
    assert sum(i["lesion"] for i in items) == 12
    assert validate_datalist(tmp_path / "out")["num_patients"] == {"training": 1, "validation": 1, "test": 1}
    label, _ = load_channel_first_nifti(tmp_path / "out" / items[0]["label"])
    assert label.shape == (2, 8, 8)


def test_missing_and_mismatched_files_are_named(isbi, tmp_path):
    root, _ = isbi
    (root / "training" / "training02" / "masks" / "training02_01_mask2.nii").unlink()
    save_nifti(root / "training" / "training03" / "preprocessed" / "training03_02_t2_pp.nii", np.zeros((5, 5, 5)))
    summary = prepare_ms_isbi2015(root, tmp_path / "out", size=(8, 8), split_fractions=(1, 0, 0), progress=False)
    reasons = sorted(entry["reason"] for entry in summary.skipped)
    assert "training02_01_mask2.nii: file not found" in reasons[0]
    assert "training03_02_t2_pp.nii: volume is (5, 5, 5), the time point's FLAIR is (20, 24, 6)" in reasons[1]
    assert summary.counts["timepoints_converted"] == 4
    with pytest.raises(ValueError, match="mask2.nii: file not found.*--strict"):
        prepare_ms_isbi2015(root, tmp_path / "strict", strict=True, progress=False)
    with pytest.raises(ValueError, match=r"subjects \['training09'\] not found"):
        prepare_ms_isbi2015(root, tmp_path / "x", test_subjects=("training09",), progress=False)
    assert not (tmp_path / "strict").exists() and not (tmp_path / "x").exists()


def test_cli_prepare_ms(isbi, tmp_path):
    root, _ = isbi
    assert cli_main(["prepare", "ms-isbi2015", "--source", str(root), "--out", str(tmp_path / "cli"), "--size",
                     "16", "16", "--test-subjects", "training03", "--split-fractions", "1", "0", "0",
                     "--no-progress"]) == 0
    stats = validate_datalist(tmp_path / "cli")
    assert stats["num_patients"] == {"training": 2, "validation": 0, "test": 1}
