"""The MONAI Deploy application: exported tiny bundle -> DICOM SEG + NIfTI maps, on real and generated DICOM.

The pure pieces (preprocessing, volumes, inputs, predictor) need only MONAI. The tests marked ``deploy_sdk``
need the ``deploy`` extra (monai-deploy-app-sdk, Holoscan, highdicom): without it they are skipped with the
reason (tests/conftest.py); ``bash .ci/run`` runs them in its second environment (``.[test,deploy]``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from ambiseg_monai.deploy.__main__ import main as deploy_main
from ambiseg_monai.deploy.export import export_bundle
from ambiseg_monai.deploy.inputs import describe_input, resolve_model_path
from ambiseg_monai.deploy.predictor import AmbiguousSlicePredictor
from ambiseg_monai.deploy.preprocessing import (
    consensus_mask,
    normalise_intensity,
    parse_slice_selection,
    resample_to_grid,
)
from ambiseg_monai.deploy.volumes import read_nifti_volume, series_affine, write_nifti_volume
from test_export import DIFFUSION_CONFIG, METADATA, export_tiny_cimd, write_bundle

NUM_SAMPLES = 3
CT_SMALL = get_testdata_file("CT_small.dcm")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A tiny CIMD-style denoiser bundle (16 x 16, CT, 3 sampling steps) exported to model.ts."""
    root = tmp_path_factory.mktemp("deploy_model")
    bundle = write_bundle(root / "bundle", DIFFUSION_CONFIG, METADATA)
    out = root / "models" / "model.ts"
    export_bundle(bundle, out, overrides={"num_samples": NUM_SAMPLES})
    return out


@pytest.fixture(scope="module")
def multi_slice_series(tmp_path_factory) -> Path:
    """3 CT slices made from CT_small (z = -75.7, -73.2, -70.7 mm; files in shuffled order) + one MR slice."""
    folder = tmp_path_factory.mktemp("series")
    source = pydicom.dcmread(CT_SMALL)
    series_uid = pydicom.uid.generate_uid()
    for k, name in zip(range(3), ("b.dcm", "c.dcm", "a.dcm"), strict=True):
        ds = source.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = 3 - k
        ds.ImagePositionPatient = [-158.135803, -179.035797, -75.699997 + 2.5 * k]
        pixels = ds.pixel_array.copy()
        pixels[:, : 40 * k] = pixels.min()  # different content per slice
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / name)
    mr = source.copy()
    mr.Modality = "MR"
    mr.SeriesInstanceUID = pydicom.uid.generate_uid()
    mr.SOPInstanceUID = mr.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    mr.save_as(folder / "mr.dcm")
    (folder / "README.txt").write_text("not DICOM: skipped")
    return folder


def _dicom_folder(tmp_path: Path, modality: str | None = None) -> Path:
    folder = tmp_path / "dicom"
    folder.mkdir(parents=True)
    if modality is None:
        shutil.copy(CT_SMALL, folder)
    else:
        ds = pydicom.dcmread(CT_SMALL)
        ds.Modality = modality
        ds.save_as(folder / "slice.dcm")
    return folder


# ------------------------------------------------------------------------------------- pure pieces


def test_normalise_intensity_hand_values():
    hu = np.array([[[-1200.0, -1000.0, -300.0, 400.0, 900.0]]])
    window = normalise_intensity(hu, {"mode": "window", "window": [-1000, 400]})
    np.testing.assert_allclose(window, [[[0.0, 0.0, 0.5, 1.0, 1.0]]])
    ramp = np.arange(101, dtype=np.float32).reshape(1, 1, 101)
    percentile = normalise_intensity(ramp, {"mode": "percentile", "percentiles": [10, 60]})
    np.testing.assert_allclose(percentile[0, 0, [0, 10, 35, 60, 100]], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert not normalise_intensity(np.full((1, 3, 3), 7.0), {"mode": "percentile", "percentiles": [1, 99]}).any()
    with pytest.raises(ValueError, match="low < high"):
        normalise_intensity(hu, {"mode": "window", "window": [400, -1000]})


def test_resampling_and_consensus():
    masks = torch.tensor([[[[0, 1], [1, 1]]]], dtype=torch.float32)  # 1 x 1 x 2 x 2
    up = resample_to_grid(masks, (4, 4), "nearest")
    assert torch.equal(up[0, 0], torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1.0]]))
    smooth = resample_to_grid(masks, (4, 4), "bilinear")
    assert 0 < float(smooth[0, 0, 1, 1]) < 1  # linear between 0 and 1
    votes = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.float32)  # 4 pixels x N = 3
    samples = votes.T.reshape(3, 1, 4)  # N x H x W
    assert consensus_mask(samples).flatten().tolist() == [0, 0, 1, 1]  # more than half
    assert consensus_mask(samples[:2]).flatten().tolist() == [0, 0, 1, 1]  # N = 2: a 1-1 tie is background


def test_parse_slice_selection():
    assert parse_slice_selection("all", 3) == [0, 1, 2]
    assert parse_slice_selection(None, 2) == [0, 1]
    assert parse_slice_selection("4, 0-2,1", 5) == [0, 1, 2, 4]
    with pytest.raises(ValueError, match=r"slice indices \[5\] are outside the volume, which has 3 slice"):
        parse_slice_selection("0,5", 3)
    with pytest.raises(ValueError, match="bad slice selection 'x'"):
        parse_slice_selection("x", 3)


def test_series_affine_and_nifti_orientation(tmp_path):
    source = pydicom.dcmread(CT_SMALL)
    affine = series_affine([source])
    spacing = 0.661468
    np.testing.assert_allclose(np.diag(affine), [-spacing, -spacing, 5.0, 1.0], atol=1e-6)  # LPS -> RAS flips x, y
    np.testing.assert_allclose(affine[:3, 3], [158.135803, 179.035797, -75.699997], atol=1e-5)
    # voxel (column 5, row 7) lies at IPP + 5 * column spacing * row cosine + 7 * row spacing * column cosine
    world = affine @ np.array([5, 7, 0, 1.0])
    np.testing.assert_allclose(world[:3], [158.135803 - 5 * spacing, 179.035797 - 7 * spacing, -75.699997], atol=1e-5)
    volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # D x H x W
    write_nifti_volume(tmp_path / "v.nii.gz", volume, affine)
    assert nib.load(tmp_path / "v.nii.gz").shape == (4, 3, 2)  # X x Y x Z
    back, back_affine = read_nifti_volume(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(back, volume)
    np.testing.assert_allclose(back_affine, affine)


# a deliberately malformed file: pydicom says it falls back to implicit VR before our error is raised
@pytest.mark.filterwarnings("ignore:Expected explicit VR, but found implicit VR:UserWarning")
def test_describe_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        describe_input(tmp_path / "missing", ["CT"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"no DICOM files found in .*empty \(1 file\(s\) looked at\)"):
        describe_input(empty, ["CT"])
    mr = _dicom_folder(tmp_path, modality="MR")
    with pytest.raises(ValueError, match=r"no CT image series in .*accepts \['CT'\], found .*\(modality MR, 1 instance"):
        describe_input(mr, ["CT"])
    with pytest.raises(ValueError, match="is a file but not NIfTI"):
        describe_input(empty / "notes.txt", ["CT"])
    description = describe_input(Path(CT_SMALL).parent, ["CT"])
    assert description.kind == "dicom" and description.accepted_series


def test_resolve_model_path(tmp_path, model_path):
    assert resolve_model_path(model_path.parent) == model_path
    with pytest.raises(FileNotFoundError, match="model file not found"):
        resolve_model_path(tmp_path / "nope.ts")
    with pytest.raises(FileNotFoundError, match="holds no .ts file"):
        resolve_model_path(tmp_path)


def test_predictor_statistics_on_the_model_grid(model_path):
    rng = np.random.default_rng(0)
    volume = rng.uniform(-1000, 400, size=(2, 16, 16)).astype(np.float32)  # HU, already the model's 16 x 16
    predictor = AmbiguousSlicePredictor(model_path, batch_size=2)
    prediction = predictor.predict(volume)
    assert prediction.samples.shape == (2, NUM_SAMPLES, 16, 16) and prediction.samples.dtype == np.uint8
    p = prediction.samples.mean(axis=1)
    np.testing.assert_allclose(prediction.mean, p, atol=1e-6)
    np.testing.assert_allclose(prediction.variance, p * (1 - p), atol=1e-6)
    np.testing.assert_array_equal(prediction.consensus, (prediction.samples.sum(axis=1) >= 2).astype(np.uint8))
    # per-slice seeds (slice index as the image id): batching and slice selection do not change a slice's masks
    one_by_one = AmbiguousSlicePredictor(model_path, batch_size=1).predict(volume, "1")
    assert one_by_one.slice_indices == [1]
    np.testing.assert_array_equal(one_by_one.samples[0], prediction.samples[1])
    resampled = AmbiguousSlicePredictor(model_path, num_samples=2).predict(volume[:1, :, :12].repeat(3, axis=1))
    assert resampled.samples.shape == (1, 2, 48, 12) and set(np.unique(resampled.samples)) <= {0, 1}
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 50\]"):
        AmbiguousSlicePredictor(model_path, num_inference_steps=10**6).predict(volume)
    with pytest.raises(ValueError, match="was traced on cpu and cannot run on cuda.*--device cuda"):
        AmbiguousSlicePredictor(model_path, device="cuda")


@pytest.mark.deploy_sdk
def test_build_segmentation_round_trip():
    from ambiseg_monai.deploy.dicom_seg import build_ambiguous_segmentation

    source = pydicom.dcmread(CT_SMALL)
    samples = np.zeros((1, 2, 128, 128), dtype=np.uint8)
    samples[0, 0, 10:20, 30:50] = 1
    samples[0, 1, 15:25, 30:40] = 1
    consensus = consensus_mask(torch.from_numpy(samples)).numpy()  # N = 2: only pixels both samples mark
    seg = build_ambiguous_segmentation([source], samples, consensus, algorithm_name="tiny", algorithm_version="1")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Sample 1", "Sample 2", "Consensus"]
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID])  # 1 x H x W x segments
    np.testing.assert_array_equal(pixels[0, ..., 0], samples[0, 0])
    np.testing.assert_array_equal(pixels[0, ..., 2], samples[0, 0] & samples[0, 1])
    with pytest.raises(ValueError, match="masks are .* but the source slices are 128 x 128"):
        build_ambiguous_segmentation([source], samples[..., :64], consensus[..., :64])


# ----------------------------------------------------------------------------------- the application


def _check_seg(seg_path: Path, sources: list[pydicom.Dataset]) -> np.ndarray:
    """Open the SEG with pydicom and highdicom, check references and geometry; return frames x H x W x segments."""
    import highdicom as hd

    raw = pydicom.dcmread(seg_path)
    assert raw.Modality == "SEG" and raw.SegmentationType == "BINARY"
    seg = hd.seg.segread(seg_path)
    first = sources[0]
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence] == [
        s.SOPInstanceUID for s in sources]
    labels = [f"Sample {n + 1}" for n in range(NUM_SAMPLES)] + ["Consensus"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == labels
    assert (seg.Rows, seg.Columns) == (first.Rows, first.Columns)
    assert seg.NumberOfFrames == len(sources) * len(labels)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    np.testing.assert_allclose([float(v) for v in measures.PixelSpacing], [float(v) for v in first.PixelSpacing])
    positions = {tuple(round(float(v), 3) for v in f.PlanePositionSequence[0].ImagePositionPatient)
                 for f in seg.PerFrameFunctionalGroupsSequence}
    assert positions == {tuple(round(float(v), 3) for v in s.ImagePositionPatient) for s in sources}
    pixels = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources])
    votes = pixels[..., :NUM_SAMPLES].sum(axis=-1)
    np.testing.assert_array_equal(pixels[..., NUM_SAMPLES], (votes >= 2).astype(pixels.dtype))  # majority of 3
    return pixels


@pytest.mark.deploy_sdk
def test_launcher_on_pydicom_ct(model_path, tmp_path):
    """The real CT shipped with pydicom (128 x 128, one slice) through `python -m ambiseg_monai.deploy`."""
    input_dir, out = _dicom_folder(tmp_path), tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "AMBISEG_DEPLOY_STACK_RAISED"}
    result = subprocess.run(
        ["bash", "-c", 'ulimit -S -s 8192 && exec "$@"', "launcher", sys.executable, "-m", "ambiseg_monai.deploy",
         "-i", str(input_dir), "-o", str(out), "-m", str(model_path.parent), "-l", "WARNING"],
        capture_output=True, text=True, cwd=REPO, env=env, check=False, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Current stack size (8.0 MB)" not in result.stderr  # the launcher re-executed with a 32 MiB stack
    source = pydicom.dcmread(CT_SMALL)
    pixels = _check_seg(out / "seg.dcm", [source])
    mean, variance = nib.load(out / "mean.nii.gz"), nib.load(out / "variance.nii.gz")
    assert mean.shape == variance.shape == (128, 128, 1)
    np.testing.assert_allclose(mean.affine, series_affine([source]), atol=1e-5)
    m, v = mean.get_fdata(), variance.get_fdata()
    assert 0 <= m.min() and m.max() <= 1 and 0 <= v.min() and v.max() <= 0.25 + 1e-6
    # the maps agree with the masks where all samples agree (bilinear maps can only blur at mask edges)
    unanimous = (pixels[0, ..., :NUM_SAMPLES].sum(-1) == NUM_SAMPLES).T  # rows x columns -> X x Y
    assert np.all(m[..., 0][unanimous] >= 0.25)  # the nearest model pixel (p = 1) weighs >= 1/2 per axis
    summary = json.loads((out / "prediction.json").read_text())
    assert summary["processed_slices"] == [0] and summary["num_samples"] == NUM_SAMPLES
    assert summary["model"] == {"name": "bundle", "version": "0.0.1"}
    assert pydicom.dcmread(out / "seg.dcm").SegmentSequence[0].SegmentAlgorithmName == "bundle"


@pytest.mark.deploy_sdk
@pytest.mark.skipif(not (REPO / "bundles/cimd/configs/inference.json").is_file(), reason="CIMD bundle not present")
def test_application_with_the_cimd_bundle_on_pydicom_ct(tmp_path):
    """The real CIMD bundle's configs (tiny), exported, in the application on the pydicom CT."""
    from ambiseg_monai.deploy.app import DeploySettings, run_application

    model, _ = export_tiny_cimd(tmp_path / "cimd")
    out = tmp_path / "out"
    run_application(DeploySettings(input=_dicom_folder(tmp_path), output=out, model=model.parent))
    _check_seg(out / "seg.dcm", [pydicom.dcmread(CT_SMALL)])
    assert json.loads((out / "prediction.json").read_text())["model"]["name"] == "cimd"


# the SDK's DICOM loader logs skipped files with the deprecated Logger.warn (its code, not ours)
@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")
@pytest.mark.deploy_sdk
def test_application_on_generated_series_with_slice_selection(model_path, multi_slice_series, tmp_path):
    from ambiseg_monai.deploy.app import DeploySettings, run_application

    out = tmp_path / "out"
    run_application(DeploySettings(input=multi_slice_series, output=out, model=model_path, slices="0,2"))
    ct = sorted(
        (pydicom.dcmread(p) for p in multi_slice_series.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2])
    )
    ct = [d for d in ct if d.Modality == "CT"]  # the MR slice is not selected: the model accepts CT only
    _check_seg(out / "seg.dcm", [ct[0], ct[2]])  # volume order is by position, not by file name or number
    mean = nib.load(out / "mean.nii.gz")
    assert mean.shape == (128, 128, 3)
    np.testing.assert_allclose(mean.affine[:3, 2], [0, 0, 2.5], atol=1e-5)  # slice step along z
    assert not mean.get_fdata()[..., 1].any()  # slice 1 was not processed
    assert json.loads((out / "prediction.json").read_text())["processed_slices"] == [0, 2]


@pytest.mark.deploy_sdk
def test_application_on_nifti(model_path, tmp_path):
    from ambiseg_monai.deploy.app import DeploySettings, run_application

    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    volume = np.random.default_rng(1).uniform(-1000, 400, size=(2, 20, 24)).astype(np.float32)  # D x H x W
    write_nifti_volume(tmp_path / "ct.nii.gz", volume, affine)
    out = tmp_path / "out"
    run_application(DeploySettings(input=tmp_path / "ct.nii.gz", output=out, model=model_path, num_samples=2))
    samples, consensus = nib.load(out / "samples.nii.gz"), nib.load(out / "consensus.nii.gz")
    assert samples.shape == (24, 20, 2, 2) and consensus.shape == (24, 20, 2)
    np.testing.assert_allclose(samples.affine, affine)
    s = np.asarray(samples.dataobj)
    np.testing.assert_array_equal(np.asarray(consensus.dataobj), (s.sum(-1) > 1).astype(np.uint8))  # N = 2: both
    assert not (out / "seg.dcm").exists()
    with pytest.raises(ValueError, match=r"slice indices \[7\] are outside the volume"):
        run_application(DeploySettings(input=tmp_path / "ct.nii.gz", output=out, model=model_path, slices="7"))


@pytest.mark.deploy_sdk
@pytest.mark.parametrize("case", ["no_dicom", "wrong_modality", "missing_model", "not_a_model"])
def test_launcher_bad_inputs(case, model_path, tmp_path, capsys):
    input_dir, model = _dicom_folder(tmp_path), model_path
    if case == "no_dicom":
        input_dir = tmp_path / "empty"
        input_dir.mkdir()
        expected = "no DICOM files found in"
    elif case == "wrong_modality":
        input_dir = _dicom_folder(tmp_path / "mr", modality="MR")
        expected = "no CT image series in"
    elif case == "missing_model":
        model = tmp_path / "models" / "model.ts"
        expected = "model file not found"
    else:
        model = tmp_path / "weights.ts"
        torch.save({"w": torch.zeros(1)}, model)
        expected = "is not a TorchScript model file"
    status = deploy_main(["-i", str(input_dir), "-o", str(tmp_path / "out"), "-m", str(model)])
    assert status == 1
    error = capsys.readouterr().err
    assert error.startswith("ambiseg-deploy: error: ") and expected in error and "Traceback" not in error
    assert not (tmp_path / "out" / "seg.dcm").exists()
