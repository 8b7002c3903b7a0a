"""QUBIQ importer: layout, squeezing, channels, rater counts, splits and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _fixtures_preprocessing import make_qubiq_case, save_nifti
from ambiseg_monai.cli import main as cli_main
from ambiseg_monai.data.datalist import load_datalist, validate_datalist
from ambiseg_monai.data.nifti import load_channel_first_nifti
from ambiseg_monai.preprocessing.common import ImportFailedError
from ambiseg_monai.preprocessing.qubiq import prepare_qubiq


def prostate_source(root, fewer_raters_case: int | None = None):
    """Two training and one validation prostate case, 6 raters, 2 sub-tasks; images carry a singleton axis."""
    rng = np.random.default_rng(0)
    for split, case in (("Training", 1), ("Training", 2), ("Validation", 1)):
        image = rng.uniform(0, 1000, size=(10, 12, 1)).astype(np.float32)
        raters = 5 if case == fewer_raters_case and split == "Training" else 6
        segs = {}
        for subtask in (1, 2):
            for rater in range(1, raters + 1):
                seg = np.zeros((10, 12, 1), np.uint8)
                seg[2:5 + rater % 3, 3:7] = 255 if subtask == 2 else 1  # sub-task 2 stored as 0/255
                segs[(subtask, rater)] = seg
        make_qubiq_case(root, "prostate", split, case, image, segs)
    return root


def test_prostate_subtask_with_squeezed_axes_and_splits_as_given(tmp_path):
    source = prostate_source(tmp_path / "qubiq")
    summary = prepare_qubiq(source, tmp_path / "out", "prostate", subtask=2, progress=False)
    stats = validate_datalist(tmp_path / "out", required_splits=("training", "validation"))
    assert stats["num_items"] == {"training": 2, "validation": 1, "test": 0}
    datalist = load_datalist(tmp_path / "out")
    assert datalist["num_raters"] == 6 and datalist["image_channels"] == 1
    item = datalist["training"][1]
    assert item["case_id"] == "prostate_t2_training_case02" and item["raters"] == [1, 2, 3, 4, 5, 6]
    label, _ = load_channel_first_nifti(tmp_path / "out" / item["label"])
    assert label.shape == (6, 10, 12)
    expected = np.zeros((10, 12), np.uint8)
    expected[2:6, 3:7] = 1  # rater 1: rows 2 .. 5 + 1 % 3 - 1
    np.testing.assert_array_equal(label[0], expected)  # 0/255 binarised at half the maximum
    image, _ = load_channel_first_nifti(tmp_path / "out" / item["image"])
    assert image.shape == (1, 10, 12) and image.min() == 0.0 and image.max() == 1.0
    assert summary.to_dict()["empty_mask_fraction"]["all"] == 0.0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["samples"]["validation"] == 1


def test_rater_count_mismatch_is_recorded_or_refused(tmp_path):
    source = prostate_source(tmp_path / "qubiq", fewer_raters_case=2)
    summary = prepare_qubiq(source, tmp_path / "out", "prostate", progress=False)
    datalist = load_datalist(tmp_path / "out")
    assert datalist["training"][1]["num_raters"] == 5 and "num_raters" not in datalist["training"][0]
    assert validate_datalist(tmp_path / "out")["raters"] == {5: 1, 6: 2}
    assert any("case02: 5 raters instead of 6" in w for w in summary.warnings)

    refused = prepare_qubiq(source, tmp_path / "refused", "prostate", require_raters=True, progress=False)
    (skip,) = refused.skipped
    assert "case02: 5 rater masks for sub-task 1, task prostate has 6" in skip["reason"]
    with pytest.raises(ImportFailedError, match="case02.*5 rater masks"):
        prepare_qubiq(source, tmp_path / "strict", "prostate", require_raters=True, strict=True, progress=False)
    assert not (tmp_path / "strict").exists()


def test_brain_tumor_channels_and_resize(tmp_path):
    image = np.random.default_rng(1).uniform(0, 1, (16, 20, 4)).astype(np.float32)
    seg = np.zeros((16, 20), np.uint8)
    seg[4:12, 4:14] = 1
    segs = {(subtask, rater): seg for subtask in (1, 2, 3) for rater in (1, 2, 3)}
    make_qubiq_case(tmp_path / "src", "brain-tumor", "Training", 1, image, segs)
    prepare_qubiq(tmp_path / "src" / "brain-tumor", tmp_path / "out", "brain-tumor", subtask=3, size=(8, 10),
                  progress=False)
    datalist = load_datalist(tmp_path / "out")
    assert datalist["image_channels"] == 4
    item = datalist["training"][0]
    image_out, _ = load_channel_first_nifti(tmp_path / "out" / item["image"])
    label, _ = load_channel_first_nifti(tmp_path / "out" / item["label"])
    assert image_out.shape == (4, 8, 10) and label.shape == (3, 8, 10)
    expected = np.zeros((8, 10), np.uint8)
    expected[2:6, 2:7] = 1  # the box halves exactly
    np.testing.assert_array_equal(label[1], expected)


def test_bad_cases_name_the_file(tmp_path):
    source = prostate_source(tmp_path / "qubiq")
    case = source / "prostate" / "Training" / "case01"
    save_nifti(case / "task01_seg03.nii.gz", np.zeros((9, 12), np.uint8))  # wrong size
    (source / "prostate" / "Validation" / "case01" / "image.nii.gz").write_bytes(b"not gzip")
    summary = prepare_qubiq(source, tmp_path / "out", "prostate", progress=False)
    reasons = sorted(entry["reason"] for entry in summary.skipped)
    assert len(reasons) == 2
    assert "task01_seg03.nii.gz: mask is (9, 12), the image image.nii.gz is (10, 12)" in reasons[0]
    assert "Validation/case01/image.nii.gz: cannot read NIfTI file" in reasons[1]
    assert validate_datalist(tmp_path / "out")["num_items"] == {"training": 1, "validation": 0, "test": 0}
    with pytest.raises(ValueError, match="sub-tasks 1..2"):
        prepare_qubiq(source, tmp_path / "x", "prostate", subtask=3, progress=False)
    with pytest.raises(FileNotFoundError, match="no case folders"):
        prepare_qubiq(tmp_path, tmp_path / "y", "kidney", progress=False)


def test_cli_prepare_qubiq(tmp_path, capsys):
    source = prostate_source(tmp_path / "qubiq")
    assert cli_main(["prepare", "qubiq", "--source", str(source), "--task", "prostate", "--out",
                     str(tmp_path / "cli"), "--no-progress"]) == 0
    assert "validation" in capsys.readouterr().out
    assert cli_main(["prepare", "qubiq", "--source", str(tmp_path / "nothing"), "--task", "kidney", "--out",
                     str(tmp_path / "cli2")]) == 1
    assert "QUBIQ folder not found" in capsys.readouterr().err
