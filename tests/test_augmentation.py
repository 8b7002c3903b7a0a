"""The bundles' label-preserving augmentation (``augment``): one flip / 90-degree rotation applied alike to the
image, the training target and every rater's mask, switched per bundle (issue #15, docs/benchmarks.md)."""

from __future__ import annotations

import numpy as np
import pytest
from _bundle_runner import REPO, bundle_parser

from ambiseg_monai.bundle.config import resolve_macros
from ambiseg_monai.data.datalist import load_split
from ambiseg_monai.transforms.loading import LoadImage2Dd


def _train_preprocessing(bundle: str, dataset_dir: str, overrides: dict):
    parser = bundle_parser(REPO / "bundles" / bundle / "configs")
    parser.update({"dataset_dir": dataset_dir, "demo_dir": None, **overrides})
    resolve_macros(parser, REPO)
    return parser, parser.get_parsed_content("train#preprocessing")


def _dihedral(array: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of the last two axes of ``array``."""
    rotations = [np.rot90(array, k, axes=(-2, -1)) for k in range(4)]
    return rotations + [np.flip(r, axis=-2) for r in rotations]


def _first_case(dataset_dir: str) -> dict:
    return load_split(dataset_dir, "training")[0]


def _loaded(item: dict, key: str) -> np.ndarray:
    """The case's ``image`` (C x H x W) or rater masks ``label`` (R x H x W), loaded as the bundles load them."""
    return np.asarray(LoadImage2Dd(keys=[key])(dict(item))[key])


@pytest.mark.parametrize("bundle", ["cimd", "prob_unet"])
def test_augment_applies_one_dihedral_op_to_image_target_and_raters(bundle, small_demo_dataset):
    item = _first_case(small_demo_dataset)
    _, augmented = _train_preprocessing(bundle, small_demo_dataset, {"augment": True})
    image, raters = _loaded(item, "image"), _loaded(item, "label")
    ops_seen = set()
    for seed in range(24):
        augmented.set_random_state(seed=seed)
        out = augmented(dict(item))
        # the op that maps the plain image onto the augmented one ...
        matches = [i for i, view in enumerate(_dihedral(image)) if np.array_equal(view, np.asarray(out["image"]))]
        assert matches, "the image was changed by something other than a flip or a 90-degree rotation"
        op = matches[0]
        ops_seen.add(op)
        # ... maps the raters' masks alike (CIMD keeps them for its rater-posterior targets), and the
        # target is one of them
        moved_raters = _dihedral(raters)[op]
        if "label" in out:
            assert np.array_equal(np.asarray(out["label"]), moved_raters)
        target = np.asarray(out["target"])[0]
        assert any(np.array_equal(target, rater) for rater in moved_raters)
    assert len(ops_seen) >= 4, f"augment=true applied only {sorted(ops_seen)} of the 8 flips/rotations"


@pytest.mark.parametrize(
    "bundle, default", [("cimd", True), ("prob_unet", True), ("phiseg", True), ("ssn", True), ("ambdiffseg", True)]
)
def test_each_bundle_s_augment_default(bundle, default, small_demo_dataset):
    """On where the demo study measured it to stop memorisation (docs/benchmarks.md), off elsewhere."""
    parser, _ = _train_preprocessing(bundle, small_demo_dataset, {})
    assert parser.get_parsed_content("augment") is default


@pytest.mark.parametrize("bundle", ["cimd", "prob_unet", "phiseg", "ssn"])
def test_augment_off_leaves_the_training_items_alone(bundle, small_demo_dataset):
    item = _first_case(small_demo_dataset)
    _, plain = _train_preprocessing(bundle, small_demo_dataset, {"augment": False})
    first, second = plain(dict(item)), plain(dict(item))
    assert np.array_equal(np.asarray(first["image"]), np.asarray(second["image"]))
    assert np.array_equal(np.asarray(first["image"]), _loaded(item, "image"))


def _names(compose) -> list[str]:
    return [type(t).__name__ for t in compose.transforms]


def test_ambdiffseg_demo_trains_with_geometric_augmentation_only(small_demo_dataset):
    """The demo default: flips, rotations and the small affine on, the intensity transforms off (a demo lobe's
    intensity is what sets its probability); the paper's LIDC overlay trains without augmentation."""
    _, demo = _train_preprocessing("ambdiffseg", small_demo_dataset, {})
    names = _names(demo)
    assert {"RandFlipd", "RandRotate90d", "RandAffined"} <= set(names)
    assert not {"RandAdjustContrastd", "RandScaleIntensityd", "RandShiftIntensityd"} & set(names)
    _, intensity = _train_preprocessing("ambdiffseg", small_demo_dataset, {"augment_intensity": True})
    assert {"RandAdjustContrastd", "RandScaleIntensityd", "RandShiftIntensityd"} <= set(_names(intensity))
    parser = bundle_parser(REPO / "bundles" / "ambdiffseg" / "configs", "lidc.json")
    assert parser.get_parsed_content("augment") is False
