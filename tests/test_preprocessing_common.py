"""Shared importer machinery: ordered parallel tasks with the skip-or-fail policy, the summary,
resizing and normalisation helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ambiseg_monai.data.datalist import DatasetWriter
from ambiseg_monai.preprocessing.common import (
    ImportFailedError,
    ImportSummary,
    InputError,
    Sample,
    WriteInWorker,
    check_binary_mask,
    check_finite,
    finish_import,
    normalise_minmax,
    register_written_samples,
    resize_masks,
    run_tasks,
    write_samples,
)


def square_or_fail(task: int) -> int:
    """A picklable task function: negative numbers are 'broken inputs', 13 is a bug."""
    if task < 0:
        raise InputError(f"file{task}.dcm: corrupt")
    if task == 13:
        raise KeyError("boom")
    return task * task


@pytest.mark.parametrize("workers", [1, 2])
def test_run_tasks_keeps_order_and_skips_failures(workers):
    failures = []
    results = list(run_tasks(square_or_fail, [3, -1, 2, 13, 5, 4, 1], describe=lambda t: f"scan{t}",
                             workers=workers, progress=False, on_failure=failures.append))
    assert results == [(3, 9), (2, 4), (5, 25), (4, 16), (1, 1)]
    assert [f.message for f in failures] == ["scan-1: file-1.dcm: corrupt", "scan13: unexpected KeyError: 'boom'"]


def test_run_tasks_strict_stops_at_the_first_failure():
    with pytest.raises(ImportFailedError, match="scan-1: file-1.dcm: corrupt .stopped because of --strict"):
        list(run_tasks(square_or_fail, [1, -1, 2], describe=lambda t: f"scan{t}", strict=True, progress=False))
    with pytest.raises(ValueError, match="at least 1"):
        list(run_tasks(square_or_fail, [1], describe=str, workers=0))


def test_summary_counts_and_file(tmp_path):
    summary = ImportSummary("toy", {"crop": 8})
    masks = np.zeros((4, 3, 3), np.uint8)
    masks[0, 1, 1] = 1
    with DatasetWriter(tmp_path / "ds", "toy", "CT", 4, 1, required_splits=()) as writer:
        samples = [Sample(f"c{n}", f"p{n % 2}", np.zeros((1, 3, 3)), masks) for n in range(3)]
        assert write_samples(writer, summary, samples, {"p0": "training", "p1": "test"}) == 3
        write_samples(writer, summary, [Sample("c9", "p9", np.zeros((1, 3, 3)), masks[:3], split="validation")])
        summary.count("nodules", 2)
        finish_import(writer, summary, "src")
    data = json.loads((tmp_path / "ds" / "summary.json").read_text())
    assert data["samples"] == {"training": 2, "validation": 1, "test": 1}
    assert data["patients"] == {"training": 1, "validation": 1, "test": 1}
    assert data["raters_per_sample"] == {"3": 1, "4": 3}
    assert data["empty_mask_fraction"]["training"] == 0.75
    assert data["empty_mask_fraction"]["all"] == pytest.approx(11 / 15)
    assert data["counts"] == {"nodules": 2} and data["options"] == {"crop": 8}
    assert "training" in summary.format() and "75.0%" in summary.format()


def test_finish_import_refuses_an_empty_import(tmp_path):
    summary = ImportSummary("toy")
    summary.skipped.append({"source": "a.dcm", "reason": "a.dcm: corrupt"})
    with pytest.raises(ImportFailedError, match="src: no sample could be produced .1 inputs skipped: a.dcm: corrupt"):
        with DatasetWriter(tmp_path / "ds", "toy", "CT", 4, 1) as writer:
            finish_import(writer, summary, "src")
    assert list(tmp_path.iterdir()) == []


def test_mask_and_intensity_helpers():
    # binary masks in their three stored forms -> uint8 {0, 1}
    np.testing.assert_array_equal(check_binary_mask(np.array([0, 255, 255, 0], np.uint8), "m.png"), [0, 1, 1, 0])
    np.testing.assert_array_equal(check_binary_mask(np.array([0.0, 1.0, 0.0]), "m.nii"), [0, 1, 0])
    result = check_binary_mask(np.array([True, False]), "m")
    assert result.dtype == np.uint8 and result.tolist() == [1, 0]
    assert check_binary_mask(np.full(3, 255, np.uint8), "m").tolist() == [1, 1, 1]  # all foreground
    # anything else is refused with the file and the values found
    with pytest.raises(InputError, match=r"m.nii: mask is not binary \(values 0, 0.5\); expected 0/1, 0/255"):
        check_binary_mask(np.array([0.0, 0.5, 0.5]), "m.nii")
    with pytest.raises(InputError, match=r"m.png: mask is not binary \(values 0, 1, 255\)"):
        check_binary_mask(np.array([0, 1, 1, 255], np.uint8), "m.png")
    with pytest.raises(InputError, match=r"m.nii: mask contains 1 NaN value"):
        check_binary_mask(np.array([0.0, np.nan, 1.0]), "m.nii")
    with pytest.raises(InputError, match=r"a.nii: image contains 2 NaN or infinite value"):
        check_finite(np.array([0.0, np.nan, np.inf]), "a.nii")
    check_finite(np.array([1, 2], np.int16), "integers are always finite")
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, 2:6, 2:6] = 1
    expected = [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(resize_masks(mask, (4, 4))[0], expected)
    image = np.arange(101, dtype=np.float32)
    np.testing.assert_allclose(normalise_minmax(image, 10, 90)[[0, 10, 50, 90, 100]], [0, 0, 0.5, 1, 1])
    assert not normalise_minmax(np.full(5, 3.0)).any()


def two_samples(bad: bool) -> list[Sample]:
    label = np.zeros((2, 3, 3), np.uint8)
    return [Sample("a", "p", np.zeros((1, 3, 3)), label), Sample("b", "p", np.zeros((1, 3, 3)), label + 2 * bad)]


def test_write_in_worker_writes_files_and_leaves_no_orphans(tmp_path):
    summary = ImportSummary("toy")
    with DatasetWriter(tmp_path / "ds", "toy", "CT", 2, 1) as writer:
        worker = WriteInWorker(two_samples, str(writer.root), num_raters=2, image_channels=1)
        with pytest.raises(InputError, match="case 'b': label is not binary"):
            worker(True)
        assert not list(writer.root.rglob("*.nii.gz"))
        written = worker(False)
        assert written[0].item == {"image": "images/a.nii.gz", "label": "labels/a.nii.gz", "case_id": "a",
                                   "patient_id": "p"}
        assert register_written_samples(writer, summary, written, {"p": "training"}) == 2
        finish_import(writer, summary, "src")
    assert sorted(p.name for p in (tmp_path / "ds" / "labels").iterdir()) == ["a.nii.gz", "b.nii.gz"]
    assert summary.to_dict()["empty_mask_fraction"]["all"] == 1.0


def test_mixed_sizes_in_a_split_are_reported(tmp_path):
    summary = ImportSummary("toy")
    with DatasetWriter(tmp_path / "ds", "toy", "CT", 1, 1) as writer:
        samples = [Sample("a", "p", np.zeros((1, 4, 4)), np.zeros((1, 4, 4))),
                   Sample("b", "q", np.zeros((1, 6, 5)), np.zeros((1, 6, 5)))]
        write_samples(writer, summary, samples, {"p": "training", "q": "training"})
        finish_import(writer, summary, "src")
    assert summary.warnings == [
        "split 'training' mixes 2 image sizes, e.g. 4 x 4 (a), 6 x 5 (b); bundles batch whole images: prepare again "
        "with --size H W unless the bundle resizes its inputs"
    ]
    assert summary.warnings[0] in summary.format()
