"""Community LIDC pickle importer: AmbDiffSeg split, seeded split, safe loading, bad entries."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from _fixtures_preprocessing import make_lidc_pickle
from ambiseg_monai.cli import main as cli_main
from ambiseg_monai.data.datalist import load_datalist, validate_datalist
from ambiseg_monai.data.nifti import load_channel_first_nifti
from ambiseg_monai.preprocessing.common import ImportFailedError, InputError
from ambiseg_monai.preprocessing.lidc_pickle import ambdiffseg_split, load_pickle, prepare_lidc_pickle


def test_shipped_split_lists():
    validation, test = ambdiffseg_split()
    assert len(validation) == len(test) == 175 and not validation & test
    assert all(len(p) == 30 and p.isdigit() for p in validation | test)


def test_ambdiffseg_split_and_contents(tmp_path):
    validation, test = ambdiffseg_split()
    patients = [sorted(test)[0], sorted(validation)[0], "123456789012345678901234567890", "999"]
    data = make_lidc_pickle(tmp_path / "data_lidc.pickle", patients)
    summary = prepare_lidc_pickle(tmp_path / "data_lidc.pickle", tmp_path / "out", progress=False)
    datalist = load_datalist(tmp_path / "out")
    by_split = {s: sorted({item["patient_id"] for item in datalist[s]}) for s in ("training", "validation", "test")}
    assert by_split == {"training": sorted(patients[2:]), "validation": [patients[1]], "test": [patients[0]]}
    assert validate_datalist(tmp_path / "out")["num_items"] == {"training": 4, "validation": 2, "test": 2}
    key = f"{patients[2]}_slice1lesion2"
    item = next(i for i in datalist["training"] if i["source_key"] == key)
    assert item["case_id"] == key and item["series_uid"] == data[key]["series_uid"]
    image, _ = load_channel_first_nifti(tmp_path / "out" / item["image"])
    label, _ = load_channel_first_nifti(tmp_path / "out" / item["label"])
    np.testing.assert_array_equal(image[0], data[key]["image"])
    np.testing.assert_array_equal(label, np.stack(data[key]["masks"]))
    assert summary.to_dict()["empty_mask_fraction"]["all"] == pytest.approx(0.25)  # reader 4 never marks
    assert any("not in" in w for w in summary.warnings)  # most listed patients are absent from the tiny pickle


def test_seeded_split_is_by_patient_and_repeatable(tmp_path):
    patients = [f"{n:030d}" for n in range(10)]
    make_lidc_pickle(tmp_path / "p.pickle", patients, slices_per_patient=1)
    prepare_lidc_pickle(tmp_path / "p.pickle", tmp_path / "a", split="seeded", seed=3, progress=False)
    prepare_lidc_pickle(tmp_path / "p.pickle", tmp_path / "b", split="seeded", seed=3, progress=False)
    stats = validate_datalist(tmp_path / "a")
    assert stats["num_patients"] == {"training": 6, "validation": 2, "test": 2}
    assert load_datalist(tmp_path / "a") == load_datalist(tmp_path / "b")


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unsafe_truncated_and_malformed_pickles(tmp_path):
    with open(tmp_path / "evil.pickle", "wb") as handle:
        pickle.dump({"k": Exploit()}, handle)
    with pytest.raises(InputError, match="evil.pickle.*refusing to load posix.system"):
        load_pickle(tmp_path / "evil.pickle")
    make_lidc_pickle(tmp_path / "good.pickle", ["1", "2"])
    (tmp_path / "cut.pickle").write_bytes((tmp_path / "good.pickle").read_bytes()[:500])
    with pytest.raises(InputError, match="cut.pickle: not a readable LIDC pickle"):
        load_pickle(tmp_path / "cut.pickle")
    with pytest.raises(FileNotFoundError, match="missing.pickle"):
        load_pickle(tmp_path / "missing.pickle")

    data = make_lidc_pickle(tmp_path / "bad.pickle", ["111", "222", "333"])
    data["222_slice0"]["masks"] = [np.zeros((8, 8))] * 4  # wrong size
    with open(tmp_path / "bad.pickle", "wb") as handle:
        pickle.dump(data, handle)
    summary = prepare_lidc_pickle(tmp_path / "bad.pickle", tmp_path / "out", split="seeded", progress=False)
    (skip,) = summary.skipped
    assert "bad.pickle [222_slice0]: masks must be R x 16 x 16, got shape (4, 8, 8)" in skip["reason"]
    with pytest.raises(ImportFailedError, match=r"\[222_slice0\]"):
        prepare_lidc_pickle(tmp_path / "bad.pickle", tmp_path / "strict", split="seeded", strict=True,
                            progress=False)


def test_cli_prepare_lidc_pickle(tmp_path):
    make_lidc_pickle(tmp_path / "p.pickle", ["1", "2", "3"])
    assert cli_main(["prepare", "lidc-pickle", "--source", str(tmp_path / "p.pickle"), "--out",
                     str(tmp_path / "cli"), "--split", "seeded", "--no-progress"]) == 0
    assert validate_datalist(tmp_path / "cli")["num_items"] == {"training": 2, "validation": 2, "test": 2}


@pytest.mark.parametrize(
    "module, name",
    [
        ("numpy", "load"),
        ("numpy", "ndarray.tofile"),
        ("builtins", "eval"),
        ("posix", "system"),
        ("numpy.dtypes", "Float64DType"),  # was allowed by a module prefix (and led to the set_data attack)
        ("numpy", "ObjectDtype"),  # was allowed by a name suffix
    ],
)
def test_globals_outside_the_allowlist_are_refused(tmp_path, module, name):
    crafted = tmp_path / "crafted.pickle"
    crafted.write_bytes(pickle.PROTO + b"\x02" + pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.EMPTY_TUPLE
                        + pickle.REDUCE + pickle.STOP)
    with pytest.raises(InputError, match=rf"crafted.pickle: not a readable LIDC pickle \(refusing to load "
                                         rf"{module}.{name} "):
        load_pickle(crafted)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_genuine_pickles_of_every_protocol_still_load(tmp_path, protocol):
    data = {"k_1": {"image": np.arange(4, dtype=np.float32).reshape(2, 2),
                    "masks": [np.eye(2, dtype=np.uint8)] * 4, "series_uid": "1.2"}}
    (tmp_path / "p.pickle").write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = load_pickle(tmp_path / "p.pickle")
    np.testing.assert_array_equal(loaded["k_1"]["image"], data["k_1"]["image"])
    np.testing.assert_array_equal(loaded["k_1"]["masks"][2], np.eye(2))
