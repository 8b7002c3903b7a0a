"""Multi-rater transforms: array and dict versions, Compose + CacheDataset, variable rater counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose, EnsureTyped

from ambiseg_monai.data.datalist import load_split
from ambiseg_monai.transforms.diffusion_range import (
    MaskToSymmetric,
    MaskToSymmetricd,
    SymmetricToMask,
    SymmetricToMaskd,
)
from ambiseg_monai.transforms.loading import LoadImage2D, LoadImage2Dd
from ambiseg_monai.transforms.raters import (
    ConsensusLevel,
    MeanRaters,
    MeanRatersd,
    PadRaters,
    PadRatersd,
    RandomConsensusLevel,
    RandomConsensusLeveld,
    SelectRandomRater,
    SelectRandomRaterd,
    SelectRater,
    SelectRaterd,
)

# Three raters on a 1 x 4 image: pixel j is marked by j raters (0, 1, 2, 3).
STACK = torch.tensor([[[0, 0, 0, 1]], [[0, 0, 1, 1]], [[0, 1, 1, 1]]], dtype=torch.float32)


def test_load_image_2d_yields_channel_first(small_demo_dataset):
    item = load_split(small_demo_dataset, "training")[0]
    image = LoadImage2D()(item["image"])
    raters = LoadImage2D()(item["label"])
    assert tuple(image.shape) == (1, 16, 16) and tuple(raters.shape) == (4, 16, 16)
    assert image.dtype == torch.float32 and set(raters.unique().tolist()) <= {0.0, 1.0}
    assert image.meta["filename_or_obj"].endswith(".nii.gz")


def test_load_image_2d_names_bad_file(tmp_path):
    with pytest.raises(ValueError, match="missing.nii.gz: cannot load image"):
        LoadImage2D()(str(tmp_path / "missing.nii.gz"))


def test_select_rater_and_random_rater_cover_all_raters():
    assert torch.equal(SelectRater(1)(STACK), STACK[1:2])
    with pytest.raises(ValueError, match="rater id 3 out of range"):
        SelectRater(3)(STACK)
    selector = SelectRandomRater()
    selector.set_random_state(0)
    seen = {int(selector(STACK).sum()) for _ in range(60)}
    assert seen == {1, 2, 3}  # each rater's mask (areas 1, 2, 3) is drawn
    # with a padding mask only real raters are drawn
    seen = {int(selector(STACK, rater_mask=torch.tensor([True, False, True])).sum()) for _ in range(60)}
    assert seen == {1, 3}
    assert selector(STACK.numpy()).shape == (1, 1, 4)


def test_mean_and_consensus_on_hand_made_stack():
    np.testing.assert_allclose(MeanRaters()(STACK)[0, 0].numpy(), [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(MeanRaters()(STACK, torch.tensor([True, True, False]))[0, 0].numpy(), [0, 0, .5, 1])
    assert ConsensusLevel(1)(STACK)[0, 0].tolist() == [0, 1, 1, 1]  # union
    assert ConsensusLevel(2)(STACK)[0, 0].tolist() == [0, 0, 1, 1]
    assert ConsensusLevel(3)(STACK)[0, 0].tolist() == [0, 0, 0, 1]  # intersection
    assert ConsensusLevel()(STACK.numpy(), level=2)[0, 0].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="consensus level 4 out of range 1..3"):
        ConsensusLevel(4)(STACK)
    random_level = RandomConsensusLevel()
    random_level.set_random_state(0)
    levels = set()
    for _ in range(60):
        out = random_level(STACK)
        levels.add(random_level.last_level)
        assert out[0, 0].tolist() == ConsensusLevel(random_level.last_level)(STACK)[0, 0].tolist()
    assert levels == {1, 2, 3}


def test_symmetric_scaling_round_trip():
    mask = torch.tensor([[[0.0, 1.0, 1.0, 0.0]]])
    scaled = MaskToSymmetric()(mask)
    assert scaled.tolist() == [[[-1.0, 1.0, 1.0, -1.0]]]
    assert torch.equal(SymmetricToMask()(scaled), mask)
    assert SymmetricToMask()(torch.tensor([-0.2, 0.0, 0.3])).tolist() == [0.0, 0.0, 1.0]  # x > 0
    assert SymmetricToMask(threshold=0.5)(np.array([0.4, 0.6])).tolist() == [0.0, 1.0]


def test_pad_raters():
    padded, mask = PadRaters(5)(STACK[:2])
    assert padded.shape == (5, 1, 4) and mask.tolist() == [True, True, False, False, False]
    assert padded[2:].sum() == 0 and torch.equal(padded[:2], STACK[:2])
    padded_np, _ = PadRaters(3)(STACK.numpy())
    assert padded_np.shape == (3, 1, 4)
    with pytest.raises(ValueError, match="more than the padded size"):
        PadRaters(2)(STACK)


def test_dict_label_strategies():
    data = {"label": STACK, "num_raters": 3}
    out = SelectRandomRaterd(rater_id_key="rater").set_random_state(1)(data)
    assert torch.equal(out["target"], STACK[out["rater"] : out["rater"] + 1])
    assert "target" not in data  # input not modified
    out = SelectRaterd(rater=2)(data)
    assert torch.equal(out["target"], STACK[2:3]) and out["class_label"] == 2
    out = SelectRaterd().set_random_state(0)(data)
    assert torch.equal(out["target"], STACK[out["class_label"] : out["class_label"] + 1])
    out = MeanRatersd()(data)
    np.testing.assert_allclose(out["target"][0, 0].numpy(), [0, 1 / 3, 2 / 3, 1])
    out = RandomConsensusLeveld().set_random_state(0)(data)
    level = out["class_label"] + 1  # 0-based embedding index
    assert out["target"][0, 0].tolist() == ConsensusLevel(level)(STACK)[0, 0].tolist()
    out = MaskToSymmetricd()(MeanRatersd()(data))
    np.testing.assert_allclose(out["target"][0, 0].numpy(), [-1, -1 / 3, 1 / 3, 1], atol=1e-6)
    out = SymmetricToMaskd(keys="target")(out)
    assert out["target"][0, 0].tolist() == [0, 0, 1, 1]
    out = PadRatersd(num_raters=4)(data)
    assert out["label"].shape == (4, 1, 4) and out["rater_mask"].tolist() == [True, True, True, False]


def test_consensus_levels_follow_each_items_rater_count():
    """A 2-rater item padded to 4 only draws levels 1..2 (its own raters)."""
    two = STACK[1:]  # raters marking pixels [0,0,1,1] and [0,1,1,1]
    padded = PadRatersd(num_raters=4)({"label": two})
    transform = RandomConsensusLeveld().set_random_state(0)
    levels = set()
    for _ in range(50):
        out = transform(padded)
        levels.add(out["class_label"] + 1)
        assert out["target"][0, 0].tolist() == ConsensusLevel(out["class_label"] + 1)(two)[0, 0].tolist()
    assert levels == {1, 2}
    transform = RandomConsensusLeveld().set_random_state(0)
    assert {transform({"label": two, "num_raters": 2})["class_label"] for _ in range(50)} == {0, 1}


def test_pipeline_in_compose_with_cache_dataset_and_variable_raters(tmp_path):
    """Variable rater counts (4 and 2) load, select, pad and batch through CacheDataset."""
    from ambiseg_monai.data.datalist import DatasetWriter

    rng = np.random.default_rng(0)
    with DatasetWriter(tmp_path / "ds", name="var", modality="CT", num_raters=4, image_channels=2) as writer:
        for index, raters in enumerate([4, 2, 4, 2]):
            writer.add_item("training", f"c{index}", f"p{index}", rng.random((2, 8, 8)),
                            rng.random((raters, 8, 8)) > 0.5)
    items = load_split(tmp_path / "ds", "training")
    assert [item["num_raters"] for item in items] == [4, 2, 4, 2]
    transform = Compose([
        LoadImage2Dd(("image", "label")),
        SelectRandomRaterd("label", rater_id_key="rater"),
        RandomConsensusLeveld("label", output_key="consensus"),
        MeanRatersd("label", output_key="soft"),
        MaskToSymmetricd("target"),
        PadRatersd("label", num_raters=4),
        EnsureTyped(("image", "label", "target", "consensus", "soft")),
    ])
    transform.set_random_state(7)
    dataset = CacheDataset(items, transform, cache_rate=1.0, num_workers=0, progress=False)
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 2, 8, 8)
    assert batch["label"].shape == (4, 4, 8, 8)
    assert batch["target"].shape == (4, 1, 8, 8) and set(batch["target"].unique().tolist()) <= {-1.0, 1.0}
    assert batch["rater_mask"].tolist() == [[True] * 4, [True, True, False, False]] * 2
    assert (batch["rater"][1::2] < 2).all()  # 2-rater items only pick their own raters
    assert batch["soft"].shape == (4, 1, 8, 8)
    # the cached part (loading) is deterministic; the random part differs between epochs
    targets = [torch.stack([dataset[i]["rater"] if torch.is_tensor(dataset[i]["rater"]) else torch.tensor(
        dataset[i]["rater"]) for i in range(4)]) for _ in range(8)]
    assert len({tuple(t.tolist()) for t in targets}) > 1
