"""The demo dataset: contract-valid, deterministic, with a consistent stored truth."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from ambiseg_monai.data.datalist import load_datalist, load_split, validate_datalist
from ambiseg_monai.data.demo import DemoConfig, ensure_demo_dataset, generate_demo_dataset, make_demo_case
from ambiseg_monai.data.nifti import load_channel_first_nifti

CONFIG = DemoConfig(image_size=16, num_training=4, num_validation=2, num_test=2, seed=5)


def _digest(folder: Path) -> dict[str, str]:
    """Hash of the decoded arrays and the datalist (gzip headers may carry timestamps)."""
    digests = {"datalist.json": hashlib.sha256((folder / "datalist.json").read_bytes()).hexdigest()}
    for path in sorted(folder.rglob("*.nii.gz")):
        array, affine = load_channel_first_nifti(path)
        digests[str(path.relative_to(folder))] = hashlib.sha256(array.tobytes() + affine.tobytes()).hexdigest()
    return digests


def test_same_seed_identical_different_seed_different(tmp_path):
    generate_demo_dataset(tmp_path / "a", CONFIG)
    generate_demo_dataset(tmp_path / "b", CONFIG)
    generate_demo_dataset(tmp_path / "c", DemoConfig(**{**CONFIG.__dict__, "seed": 6}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    digest_a, digest_c = _digest(tmp_path / "a"), _digest(tmp_path / "c")
    assert digest_a.keys() == digest_c.keys()
    assert sum(digest_a[k] != digest_c[k] for k in digest_a) > len(digest_a) // 2


def test_dataset_follows_contract_and_truth_is_consistent(small_demo_dataset):
    summary = validate_datalist(small_demo_dataset, required_splits=("training", "validation", "test"))
    assert summary["num_items"] == {"training": 8, "validation": 4, "test": 4}
    datalist = load_datalist(small_demo_dataset)
    assert datalist["generator"]["seed"] == 3
    for item in load_split(small_demo_dataset, "training"):
        modes, _ = load_channel_first_nifti(item["truth"]["masks"])
        raters, _ = load_channel_first_nifti(item["label"])
        probabilities = np.asarray(item["truth"]["probabilities"])
        assert modes.shape[0] == len(probabilities) == len(item["truth"]["modes"])
        assert probabilities.sum() == pytest.approx(1.0)
        flat_modes = modes.reshape(len(modes), -1)
        assert len({m.tobytes() for m in flat_modes}) == len(modes)  # modes are distinct masks
        for rater in raters:  # every rater mask is one of the true modes
            assert any(np.array_equal(rater.ravel(), mode) for mode in flat_modes)
        empty = [name == "empty" for name in item["truth"]["modes"]]
        assert item["truth"]["empty_probability"] == pytest.approx(probabilities[empty].sum())


def test_truth_probabilities_match_rater_frequencies():
    """Raters are draws from the stored distribution: with many raters frequencies converge."""
    config = DemoConfig(image_size=24, num_raters=4000, faint_fraction=1.0)
    case = make_demo_case(np.random.default_rng(11), config)
    flat_modes = case.modes.reshape(len(case.modes), -1)
    indices = [next(k for k, mode in enumerate(flat_modes) if np.array_equal(r.ravel(), mode)) for r in case.raters]
    frequencies = np.bincount(indices, minlength=len(case.modes)) / len(indices)
    np.testing.assert_allclose(frequencies, case.probabilities, atol=0.03)
    assert case.empty_probability == 0.25 and "empty" in case.mode_names


def test_lobe_intensity_encodes_its_probability():
    case = make_demo_case(np.random.default_rng(2), DemoConfig(image_size=48, noise_std=0.0, faint_fraction=0.0))
    core = case.modes[case.mode_names.index("core")].astype(bool)
    core_level = case.image[0][core].mean()
    for index, probability in enumerate(case.lobe_probabilities):
        with_lobe = case.modes[case.mode_names.index(f"core+lobe{index + 1}")].astype(bool)
        lobe = with_lobe & ~core
        lobe_level = case.image[0][lobe].mean()
        assert lobe_level < core_level
        # brighter lobes (higher probability) stand out more from the background
        assert (lobe_level - 0.15) / (core_level - 0.15) == pytest.approx(probability, abs=0.2)


def test_ensure_demo_dataset_generates_once(tmp_path):
    target = tmp_path / "demo"
    assert ensure_demo_dataset(target, image_size=16, num_training=2, num_validation=1, num_test=1) == str(target)
    stamp = (target / "datalist.json").stat().st_mtime_ns
    ensure_demo_dataset(target, image_size=16, num_training=2, num_validation=1, num_test=1)
    assert (target / "datalist.json").stat().st_mtime_ns == stamp  # not regenerated
    # a demo generated with other settings (an older default) is kept, with a warning saying how to refresh it
    with pytest.warns(UserWarning, match=r"num_training=2 \(wanted 1024\).*ambiseg prepare demo --out .* --overwrite"):
        ensure_demo_dataset(target, warn_if_different=True, image_size=16)
    assert (target / "datalist.json").stat().st_mtime_ns == stamp
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("user files")
    with pytest.raises(FileExistsError, match="already holds files"):
        ensure_demo_dataset(tmp_path / "other")


def test_config_is_validated():
    with pytest.raises(ValueError, match="image_size must be at least 16"):
        DemoConfig(image_size=8)
    with pytest.raises(ValueError, match="num_raters must be at least 1"):
        DemoConfig(num_raters=0)
