"""Generic folder + CSV importer: PNG and NIfTI inputs, empty mask cells, splits, bad rows."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from _fixtures_preprocessing import save_nifti
from ambiseg_monai.cli import main as cli_main
from ambiseg_monai.data.datalist import load_datalist, validate_datalist
from ambiseg_monai.data.nifti import load_channel_first_nifti
from ambiseg_monai.preprocessing.common import ImportFailedError, InputError
from ambiseg_monai.preprocessing.folder import prepare_folder, read_csv


def make_folder(root, rows=4, with_split=True):
    """Grey PNG images 12 x 10 with three raters' 0/255 PNG masks; the third rater leaves one cell empty."""
    rng = np.random.default_rng(0)
    lines = ["image,mask_1,mask_2,mask_3,patient_id" + (",split" if with_split else "")]
    for n in range(rows):
        image = rng.integers(0, 256, (12, 10), dtype=np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"c{n}.png")
        for rater in (1, 2, 3):
            mask = np.zeros((12, 10), np.uint8)
            mask[2:4 + rater, 3:6] = 255
            Image.fromarray(mask).save(root / "masks" / f"c{n}_r{rater}.png")
        third = "" if n == 0 else f"masks/c{n}_r3.png"
        split = ",training" if n < 2 else (",val" if n == 2 else ",test")
        lines.append(f"images/c{n}.png,masks/c{n}_r1.png,masks/c{n}_r2.png,{third},p{n // 2 if n < 2 else n}"
                     + (split if with_split else ""))
    (root / "cases.csv").write_text("\n".join(lines) + "\n")
    return root / "cases.csv"


def test_png_folder_with_splits_and_an_empty_cell(tmp_path):
    csv_path = make_folder(tmp_path / "bone_us")
    summary = prepare_folder(csv_path, tmp_path / "out", modality="US", progress=False)
    datalist = load_datalist(tmp_path / "out")
    assert (datalist["name"], datalist["modality"], datalist["num_raters"]) == ("cases", "US", 3)
    assert validate_datalist(tmp_path / "out")["num_items"] == {"training": 2, "validation": 1, "test": 1}
    item = datalist["training"][0]
    assert (item["case_id"], item["patient_id"]) == ("c0", "p0")
    label, _ = load_channel_first_nifti(tmp_path / "out" / item["label"])
    image, _ = load_channel_first_nifti(tmp_path / "out" / item["image"])
    source = np.asarray(Image.open(tmp_path / "bone_us" / "images" / "c0.png"))
    np.testing.assert_allclose(image[0], source / 255.0, atol=1e-6)
    assert label[:2].reshape(2, -1).sum(1).tolist() == [9, 12] and label[2].sum() == 0
    assert summary.to_dict()["empty_mask_fraction"]["all"] == pytest.approx(1 / 12)


def test_nifti_images_seeded_split_and_resize(tmp_path):
    root = tmp_path / "nii"
    lines = ["image,mask_a,mask_b"]
    for n in range(5):
        save_nifti(root / f"img{n}.nii.gz", np.full((8, 6, 1), 10.0 + n) + np.arange(6)[None, :, None])
        mask = np.zeros((8, 6), np.uint8)
        mask[2:6, 2:4] = 1
        save_nifti(root / f"seg{n}_a.nii.gz", mask)
        save_nifti(root / f"seg{n}_b.nii.gz", mask)
        lines.append(f"img{n}.nii.gz,seg{n}_a.nii.gz,seg{n}_b.nii.gz")
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    prepare_folder(root / "list.csv", tmp_path / "out", size=(4, 3), progress=False)
    stats = validate_datalist(tmp_path / "out")
    assert stats["num_patients"] == {"training": 3, "validation": 1, "test": 1}  # each image its own patient
    item = load_datalist(tmp_path / "out")["training"][0]
    image, _ = load_channel_first_nifti(tmp_path / "out" / item["image"])
    label, _ = load_channel_first_nifti(tmp_path / "out" / item["label"])
    assert image.shape == (1, 4, 3) and label.shape == (2, 4, 3)
    assert image.min() >= 0.0 and image.max() <= 1.0 and image[0, 0, 0] < image[0, 0, 2]  # min-max scaled
    np.testing.assert_array_equal(label[0], [[0, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 0]])


def test_bad_rows_are_named(tmp_path):
    csv_path = make_folder(tmp_path / "d", rows=5, with_split=False)
    (tmp_path / "d" / "masks" / "c2_r2.png").unlink()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "d" / "masks" / "c3_r1.png")
    summary = prepare_folder(csv_path, tmp_path / "out", progress=False)
    reasons = [entry["reason"] for entry in summary.skipped]
    assert len(reasons) == 2
    assert "cases.csv line 4: " in reasons[0] and "c2_r2.png: file not found" in reasons[0]
    assert "cases.csv line 5: " in reasons[1] and "c3_r1.png: mask is (5, 5), image c3.png is (12, 10)" in reasons[1]
    with pytest.raises(ImportFailedError, match="line 4.*c2_r2.png"):
        prepare_folder(csv_path, tmp_path / "strict", strict=True, progress=False)

    (tmp_path / "bad.csv").write_text("picture,mask_1\na.png,b.png\n")
    with pytest.raises(InputError, match="bad.csv: no 'image' column"):
        read_csv(tmp_path / "bad.csv")
    (tmp_path / "dup.csv").write_text("image,mask_1\na.png,b.png\nx/a.png,c.png\n")
    with pytest.raises(InputError, match="dup.csv line 3: case id 'a' already used on line 2"):
        read_csv(tmp_path / "dup.csv")
    (tmp_path / "split.csv").write_text("image,mask_1,split\na.png,b.png,holdout\n")
    with pytest.raises(InputError, match="unknown split 'holdout'"):
        read_csv(tmp_path / "split.csv")


def test_cli_prepare_folder(tmp_path):
    csv_path = make_folder(tmp_path / "d")
    assert cli_main(["prepare", "folder", "--csv", str(csv_path), "--out", str(tmp_path / "cli"), "--name",
                     "bone_us", "--no-progress"]) == 0
    assert load_datalist(tmp_path / "cli")["name"] == "bone_us"
    assert cli_main(["prepare", "folder", "--csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x")]) == 1
