"""UntrackedCompose: the training pipelines without MetaTensor bookkeeping give the same items, faster."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from _bundle_runner import REPO, bundle_parser
from monai.data import CacheDataset, MetaTensor, get_track_meta, set_track_meta
from monai.transforms import Compose, RandFlipd, RandRotate90d, ScaleIntensityd

from ambiseg_monai.bundle.config import resolve_macros
from ambiseg_monai.transforms import UntrackedCompose

KEYS = ["image", "label"]


def _item(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": MetaTensor(torch.as_tensor(rng.random((1, 8, 8), dtype=np.float32))),
            "label": MetaTensor(torch.as_tensor(rng.random((4, 8, 8)) > 0.5).float())}  # fmt: skip


def _transforms() -> list:
    return [RandFlipd(KEYS, prob=0.5, spatial_axis=0), RandRotate90d(KEYS, prob=0.75, max_k=3)]


def test_same_values_and_random_draws_as_compose_without_metadata():
    tracked, untracked = Compose(_transforms()), UntrackedCompose(_transforms())
    tracked.set_random_state(seed=3)
    untracked.set_random_state(seed=3)
    changed = 0
    for seed in range(12):
        item = _item(seed)
        expected, result = tracked(dict(item)), untracked(dict(item))
        for key in KEYS:
            assert isinstance(expected[key], MetaTensor)
            assert type(result[key]) is torch.Tensor  # no MetaTensor, no applied_operations
            assert torch.equal(result[key], expected[key].as_tensor())
        changed += not torch.equal(result["image"], item["image"])
    assert changed >= 6  # the flips and rotations did run
    assert get_track_meta() is True  # restored


def test_tracking_is_restored_after_an_error_and_kept_off_if_it_was_off():
    def fail(_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="applying transform"):  # MONAI wraps the transform's error
        UntrackedCompose([fail])(_item())
    assert get_track_meta() is True
    set_track_meta(False)
    try:
        UntrackedCompose(_transforms())(_item())
        assert get_track_meta() is False
    finally:
        set_track_meta(True)


def test_concurrent_calls_leave_tracking_on():
    """CacheDataset fills its cache from a thread pool: overlapping calls must not leave tracking off."""
    compose = UntrackedCompose(_transforms())
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda seed: compose(_item(seed)), range(64)))
    assert all(type(r["image"]) is torch.Tensor for r in results)
    assert get_track_meta() is True


def test_cache_dataset_caches_plain_tensors():
    pipeline = UntrackedCompose([ScaleIntensityd(KEYS), *_transforms()])  # the first one is cached
    dataset = CacheDataset([_item(s) for s in range(4)], pipeline, progress=False, num_workers=2)
    assert all(type(cached["image"]) is torch.Tensor for cached in dataset._cache)
    assert type(dataset[0]["label"]) is torch.Tensor
    assert get_track_meta() is True


@pytest.mark.parametrize("bundle", ["cimd", "ambdiffseg", "consensus_diffusion", "prob_unet"])
def test_bundle_training_items_match_the_tracked_pipeline(bundle, small_demo_dataset):
    """Each bundle's training preprocessing gives the same tensors as a plain Compose of the same transforms."""
    parser = bundle_parser(REPO / "bundles" / bundle / "configs")
    parser.update({"dataset_dir": small_demo_dataset, "demo_dir": None})
    resolve_macros(parser, REPO)
    untracked = parser.get_parsed_content("train#preprocessing")
    assert isinstance(untracked, UntrackedCompose)
    tracked = Compose(untracked.transforms)
    item = parser.get_parsed_content("train#dataset").data[0]
    for seed in range(6):
        untracked.set_random_state(seed=seed)
        result = untracked(dict(item))
        tracked.set_random_state(seed=seed)
        expected = tracked(dict(item))
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(result[key], value), (bundle, key, seed)
            else:
                assert result[key] == value
