"""Consensus diffusion: consensus targets, averaging rules, the consensus inferer and the generation curve."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from ambiseg_monai.handlers.generation_curve import GenerationCurveHandler, soft_dice_by_generations
from ambiseg_monai.inferers.consensus import ConsensusSamplingInferer
from ambiseg_monai.inferers.diffusion import DiffusionSamplingInferer
from ambiseg_monai.networks.consensus import ConsensusDenoiser
from ambiseg_monai.networks.denoisers import ConditionalDenoiser
from ambiseg_monai.schedulers.respaced import RespacedDDPMScheduler
from ambiseg_monai.transforms.consensus import (
    CombineConsensusSamples,
    average_generations,
    combine_consensus_samples,
    consensus_sample_labels,
    consensus_soft_map,
)
from ambiseg_monai.transforms.raters import ConsensusLevel, MeanRaters, PadRatersd, RandomConsensusLeveld

# three raters on a 1 x 4 strip: pixel k is marked by 3, 2, 1, 0 raters
RATERS = np.array([[[1, 1, 1, 0]], [[1, 1, 0, 0]], [[1, 0, 0, 0]]], dtype=np.float32)


# --------------------------------------------------------------------------- training targets
def test_consensus_maps_of_a_hand_made_stack():
    expected = {1: [1, 1, 1, 0], 2: [1, 1, 0, 0], 3: [1, 0, 0, 0]}
    for level, row in expected.items():
        np.testing.assert_array_equal(ConsensusLevel(level)(RATERS)[0, 0], row)
    # the mean of all level maps is the rater fraction (what the inferer relies on)
    levels = np.stack([ConsensusLevel(c)(RATERS)[0] for c in (1, 2, 3)])
    np.testing.assert_allclose(levels.mean(0), MeanRaters()(RATERS)[0])


def test_random_level_with_fewer_raters_than_the_dataset_maximum():
    """3 real raters padded to 5: levels are drawn from 1..3 only, padding never counts as a vote."""
    item = PadRatersd(keys="label", num_raters=5)({"label": torch.as_tensor(RATERS)})
    assert item["label"].shape == (5, 1, 4) and item["rater_mask"].tolist() == [True] * 3 + [False] * 2
    transform = RandomConsensusLeveld(keys="label")
    transform.set_random_state(seed=0)
    expected = {0: [1, 1, 1, 0], 1: [1, 1, 0, 0], 2: [1, 0, 0, 0]}
    seen = set()
    for _ in range(60):
        out = transform(item)
        seen.add(out["class_label"])
        assert out["target"].shape == (1, 1, 4)
        assert out["target"][0, 0].tolist() == expected[out["class_label"]]
    assert seen == {0, 1, 2}


# ------------------------------------------------------------------------------ averaging rules
def _hand_made_samples() -> torch.Tensor:
    """B=1, C=2 levels, G=4 generations, 1 x 3 pixels; per-level vote fractions 3/4, 1/2, 1/4 and 1, 1/4, 0."""
    level1 = [[1, 1, 0], [1, 0, 1], [1, 1, 0], [0, 0, 0]]
    level2 = [[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]]
    return torch.tensor([level1, level2], dtype=torch.float32)[None, :, :, None, :]


def test_average_generations_plain_and_majority_vote():
    samples = _hand_made_samples()
    torch.testing.assert_close(average_generations(samples)[0, :, 0], torch.tensor([[0.75, 0.5, 0.25], [1.0, 0.25, 0.0]]))
    # rounding: 0.75 -> 1, a tie 0.5 -> 0 (torch.round / the authors' code), 0.25 -> 0
    torch.testing.assert_close(
        average_generations(samples, majority_vote=True)[0, :, 0], torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    )
    assert torch.equal(torch.tensor([0.75, 0.5, 0.25]).round(), torch.tensor([1.0, 0.0, 0.0]))


def test_combine_consensus_samples_soft_map_and_level_masks():
    samples = _hand_made_samples()
    plain = combine_consensus_samples(samples, majority_vote=False)
    torch.testing.assert_close(plain["pred_soft"][0, 0], torch.tensor([0.875, 0.375, 0.125]))
    voted = combine_consensus_samples(samples, majority_vote=True)
    torch.testing.assert_close(voted["pred_soft"][0, 0], torch.tensor([1.0, 0.0, 0.0]))
    for out in (plain, voted):  # the per-level binary masks do not depend on the rule
        torch.testing.assert_close(out["pred"][0, :, 0], torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
        assert out["pred"].shape == (1, 2, 1, 3) and out["pred_soft"].shape == (1, 1, 3)
    torch.testing.assert_close(consensus_soft_map(torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]]])), torch.tensor([[[0.5, 1.0]]]))


def test_perfect_level_maps_give_the_rater_fraction():
    levels = torch.stack([torch.as_tensor(ConsensusLevel(c)(RATERS)) for c in (1, 2, 3)])  # 3 x 1 x 1 x 4
    samples = levels.permute(1, 0, 2, 3)[:, :, None].expand(1, 3, 5, 1, 4)  # every generation perfect
    for majority_vote in (False, True):
        soft = combine_consensus_samples(samples, majority_vote)["pred_soft"]
        torch.testing.assert_close(soft[0, 0], torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))


def test_averaging_rejects_bad_samples():
    with pytest.raises(ValueError, match="B x C x G x H x W"):
        combine_consensus_samples(torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        combine_consensus_samples(torch.full((1, 2, 2, 2, 2), 2.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        average_generations(torch.full((1, 2, 2, 2, 2), float("nan")))


# ------------------------------------------------------------------------------------- the inferer
class _StripDenoiser(ConditionalDenoiser):
    """Predicts x0 directly: slot label l marks the first l + 1 columns; no label -> x0 = 0 everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded = 0

    def encode_condition(self, image):
        self.encoded += 1
        return image

    def denoise(self, x_t, timesteps, cond, class_labels=None):
        if class_labels is None:
            return torch.zeros_like(x_t)
        columns = torch.arange(x_t.shape[-1], device=x_t.device)
        mask = columns[None, :] <= class_labels[:, None]  # rows x W
        return (mask.float() * 2 - 1)[:, None, None, :].expand_as(x_t).contiguous()


def _x0_scheduler() -> RespacedDDPMScheduler:
    # x0 prediction: the last step returns the prediction itself, so samples are the stub's masks
    return RespacedDDPMScheduler(
        num_train_timesteps=100, schedule="linear_beta", beta_start=1e-3, beta_end=0.2, prediction_type="sample"
    )


def test_inferer_assigns_levels_and_generations_to_the_right_rows():
    net = _StripDenoiser()
    inferer = ConsensusSamplingInferer(_x0_scheduler(), num_levels=3, num_generations=2, num_inference_steps=3)
    out = inferer(torch.zeros(2, 1, 2, 4), net, image_ids=["a", "b"])
    assert net.encoded == 1
    assert out["samples"].shape == (2, 3, 2, 2, 4)
    for level in range(3):
        expected = (torch.arange(4) <= level).float().expand(2, 2, 2, 4)  # B x G x H x W
        torch.testing.assert_close(out["samples"][:, level], expected)
        torch.testing.assert_close(out["pred"][:, level], expected[:, 0])
    torch.testing.assert_close(out["pred_soft"][0, 0], torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))


def test_unconditioned_continuous_samples_for_the_soft_label_ablation():
    inferer = ConsensusSamplingInferer(
        _x0_scheduler(), num_levels=2, num_generations=3, num_inference_steps=2,
        conditioned=False, majority_vote=False, sample_values="continuous",
    )  # fmt: skip
    out = inferer(torch.zeros(1, 1, 2, 2), _StripDenoiser())
    torch.testing.assert_close(out["pred_soft"], torch.full((1, 2, 2), 0.5))  # x0 = 0 -> 0.5


def _random_consensus_network(num_levels: int) -> ConsensusDenoiser:
    torch.manual_seed(0)
    net = ConsensusDenoiser(
        num_levels=num_levels, channels=(8, 16), norm_num_groups=4, num_head_channels=4,
        rrdb_features=4, rrdb_blocks=1, rrdb_growth_channels=2,
    ).eval()  # fmt: skip
    with torch.no_grad():  # MONAI zero-initialises the output conv: give it weights so samples vary
        net.unet.out[2].conv.weight.normal_(std=0.5)
    return net


def _learned_range_scheduler() -> RespacedDDPMScheduler:
    return RespacedDDPMScheduler(
        num_train_timesteps=100, schedule="linear_beta", beta_start=1e-3, beta_end=0.2, variance_type="learned_range"
    )


def test_inferer_is_independent_of_batching_and_of_the_number_of_generations():
    net, scheduler = _random_consensus_network(2), _learned_range_scheduler()
    images = torch.randn(2, 1, 8, 8)
    full = ConsensusSamplingInferer(scheduler, num_levels=2, num_generations=3, num_inference_steps=3, seed=7)
    chunked = ConsensusSamplingInferer(
        scheduler, num_levels=2, num_generations=3, num_inference_steps=3, seed=7, max_rows=5
    )
    fewer = ConsensusSamplingInferer(scheduler, num_levels=2, num_generations=2, num_inference_steps=3, seed=7)
    a = full(images, net, image_ids=["x", "y"])["samples"]
    b = chunked(images, net, image_ids=["x", "y"])["samples"]
    c = fewer(images, net, image_ids=["x", "y"])["samples"]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:, :, :2], c)
    assert not torch.equal(a[:, :, 0], a[:, :, 1])  # generations differ


def test_consensus_sampling_is_the_n_sample_inferer_with_level_labels_and_combination():
    net, scheduler = _random_consensus_network(3), _learned_range_scheduler()
    images = torch.randn(2, 1, 8, 8)
    preset = ConsensusSamplingInferer(scheduler, num_levels=3, num_generations=2, num_inference_steps=3, seed=5, max_rows=4)
    generic = DiffusionSamplingInferer(
        scheduler, num_samples=6, num_inference_steps=3, seed=5, sample_labels=consensus_sample_labels(3, 2),
        postprocess=CombineConsensusSamples(num_levels=3),
    )  # fmt: skip
    a = preset(images, net, image_ids=["u", "v"])
    b = generic(images, net, image_ids=["u", "v"])
    assert set(a) == set(b) == {"pred", "pred_soft", "level_maps", "samples"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the samples are the plain N-sample inferer's, regrouped: sample n = g * C + c is generation g of level c
    plain = DiffusionSamplingInferer(scheduler, num_samples=6, num_inference_steps=3, seed=5, sample_labels=[0, 1, 2] * 2)
    flat = plain(images, net, image_ids=["u", "v"])
    assert torch.equal(a["samples"][:, 1, 0], flat[:, 1]) and torch.equal(a["samples"][:, 2, 1], flat[:, 5])


def test_combine_consensus_samples_checks_the_sample_count():
    with pytest.raises(ValueError, match="whole number of generations"):
        CombineConsensusSamples(num_levels=3)(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="num_levels"):
        CombineConsensusSamples(num_levels=0)


def test_inferer_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_levels"):
        ConsensusSamplingInferer(_x0_scheduler(), num_levels=0)
    with pytest.raises(ValueError, match="sample_values"):
        ConsensusSamplingInferer(_x0_scheduler(), num_levels=2, sample_values="soft")
    with pytest.raises(ValueError, match="image_ids"):
        ConsensusSamplingInferer(_x0_scheduler(), num_levels=2, num_generations=1)(
            torch.zeros(2, 1, 2, 2), _StripDenoiser(), image_ids=["only-one"]
        )
    with pytest.raises(ValueError, match="'int8'"):
        ConsensusSamplingInferer(_x0_scheduler(), num_levels=2, autocast_dtype="int8")


def test_inferer_autocast_gives_the_same_level_masks():
    # the stub's exact +-1 masks survive bf16, so mixed precision must not change any row's mask
    inferer = ConsensusSamplingInferer(
        _x0_scheduler(), num_levels=3, num_generations=2, num_inference_steps=3, autocast_dtype="bfloat16"
    )
    out = inferer(torch.zeros(1, 1, 2, 4), _StripDenoiser(), image_ids=["a"])
    for level in range(3):
        torch.testing.assert_close(out["pred"][0, level], (torch.arange(4) <= level).float().expand(2, 4))


# ------------------------------------------------------------------------------ generation curve
def _curve_case() -> tuple[torch.Tensor, torch.Tensor]:
    """C=2, G=3 on 1 x 4 pixels; generation 1 is wrong at both levels, generations 2 and 3 are right."""
    raters = torch.tensor([[[[1, 1, 0, 0]], [[1, 0, 0, 0]]]], dtype=torch.float32)  # soft GT 1, .5, 0, 0
    level1 = [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    level2 = [[1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]
    samples = torch.tensor([level1, level2], dtype=torch.float32)[None, :, :, None, :]
    return samples, raters


def test_soft_dice_by_generations_hand_computed():
    samples, raters = _curve_case()
    # g=1: soft .5 .5 .5 .5 -> Dice(1111, 1100) = 4/6; g=2: levels 0000 and 1000 -> soft .5 0 0 0 -> 2/3;
    # g=3: levels 1100 and 1100 -> soft 1 1 0 0 -> 1
    curve = soft_dice_by_generations(samples, raters, thresholds=(0.5,), majority_vote=True)
    torch.testing.assert_close(curve, torch.tensor([[2 / 3, 2 / 3, 1.0]], dtype=torch.float64))
    subset = soft_dice_by_generations(samples, raters, generations=[3], thresholds=(0.5,))
    torch.testing.assert_close(subset, torch.tensor([[1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="1..3"):
        soft_dice_by_generations(samples, raters, generations=[4])


def test_generation_curve_handler_writes_png_csv_and_logs_to_mlflow(tmp_path):
    samples, raters = _curve_case()
    calls = {"metrics": [], "artifacts": []}
    client = SimpleNamespace(
        log_metric=lambda run_id, key, value, step: calls["metrics"].append((run_id, key, round(value, 6), step)),
        log_artifact=lambda run_id, path, artifact_path=None: calls["artifacts"].append((run_id, path, artifact_path)),
    )
    mlflow_handler = SimpleNamespace(client=client, cur_run=SimpleNamespace(info=SimpleNamespace(run_id="run-1")))
    handler = GenerationCurveHandler(
        output_dir=str(tmp_path / "curve"), threshold_sets={"soft_dice_05": (0.5,)}, mlflow_handler=mlflow_handler
    )
    engine = Engine(lambda engine, batch: {"samples": samples, "label": raters})
    handler.attach(engine)
    engine.run([{"rater_mask": torch.tensor([[True, True]])}] * 2, max_epochs=1)
    assert handler.curves == {"soft_dice_05": pytest.approx([2 / 3, 2 / 3, 1.0])}
    assert (tmp_path / "curve" / "generation_curve.png").stat().st_size > 0
    lines = (tmp_path / "curve" / "generation_curve.csv").read_text().splitlines()
    assert lines[0] == "generations,soft_dice_05" and lines[3] == "3,1.000000"
    assert [m[3] for m in calls["metrics"]] == [1, 2, 3]
    assert calls["metrics"][2] == ("run-1", "soft_dice_05_vs_generations", 1.0, 3)
    assert sorted(a[1].rsplit(".", 1)[1] for a in calls["artifacts"]) == ["csv", "png"]


def test_generation_curve_handler_names_missing_outputs(tmp_path):
    handler = GenerationCurveHandler(output_dir=str(tmp_path))
    engine = Engine(lambda engine, batch: {"pred": torch.zeros(1, 2, 2, 2)})
    handler.attach(engine)
    with pytest.raises(KeyError, match="samples"):
        engine.run([{}], max_epochs=1)


# ----------------------------------------------------------------------- evaluator post-processing
def test_unpack_prediction_moves_the_inferer_dict_to_the_output():
    from ambiseg_monai.transforms.consensus import UnpackPredictiond

    masks, soft = torch.ones(1, 3, 2, 2), torch.full((1, 2, 2), 0.5)
    out = UnpackPredictiond()({"image": torch.zeros(1, 1, 2, 2), "pred": {"pred": masks, "pred_soft": soft}})
    assert out["pred"] is masks and out["pred_soft"] is soft and set(out) == {"image", "pred", "pred_soft"}
    assert UnpackPredictiond()({"pred": masks})["pred"] is masks  # a tensor prediction is left alone
    with pytest.raises(KeyError, match="would overwrite the existing output key 'image'"):
        UnpackPredictiond()({"image": 1, "pred": {"pred": masks, "image": 2}})
    with pytest.raises(KeyError, match="has no 'pred' entry"):
        UnpackPredictiond()({"pred": {"pred_soft": soft}})
