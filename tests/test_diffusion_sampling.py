"""The N-sample inferer: shapes, binary output, per-sample seeding independent of batching."""

from __future__ import annotations

import pytest
import torch

from ambiseg_monai.diffusion.sampler import make_generators, repeat_rows, sample_seed, take_rows
from ambiseg_monai.inferers.diffusion import DiffusionSamplingInferer, sample_statistics
from ambiseg_monai.networks.denoisers import ConcatConditionedDenoiser
from ambiseg_monai.schedulers.respaced import RespacedDDIMScheduler, RespacedDDPMScheduler


@pytest.fixture(scope="module")
def tiny_denoiser():
    torch.manual_seed(0)
    net = ConcatConditionedDenoiser(
        image_channels=2, mask_channels=1, channels=(8, 8), norm_num_groups=4, num_head_channels=8
    )
    return net.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "case_a", 0) == sample_seed(0, "case_a", 0)
    seeds = {sample_seed(s, k, n) for s in (0, 1) for k in ("a", "b", 3) for n in range(3)}
    assert len(seeds) == 18
    with pytest.raises(ValueError, match="non-negative"):
        sample_seed(-1, 0, 0)


def test_repeat_and_take_rows_on_nested_conditions():
    cond = {"feat": torch.arange(2)[:, None], "pair": (torch.arange(2), None)}
    rep = repeat_rows(cond, 3)
    assert rep["feat"].flatten().tolist() == [0, 0, 0, 1, 1, 1]
    assert take_rows(rep, slice(2, 4))["pair"][0].tolist() == [0, 1]
    assert len(make_generators(0, ["a", "b"], 3)) == 6


@pytest.mark.parametrize("scheduler_cls", [RespacedDDPMScheduler, RespacedDDIMScheduler])
def test_batched_sampling_equals_one_at_a_time(tiny_denoiser, images, scheduler_cls):
    kwargs = {"variance_type": "learned_range"} if scheduler_cls is RespacedDDPMScheduler else {"eta": 1.0}
    scheduler = scheduler_cls(num_train_timesteps=50, **kwargs)
    batched = DiffusionSamplingInferer(scheduler, num_samples=3, num_inference_steps=5, seed=7)
    single = DiffusionSamplingInferer(scheduler, num_samples=3, num_inference_steps=5, seed=7, max_rows=1)
    a = batched(images, tiny_denoiser, image_ids=["c1", "c2"])
    b = single(images, tiny_denoiser, image_ids=["c1", "c2"])
    assert a.shape == (2, 3, 8, 8)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a, b)
    # image 2 alone gives the same masks as inside the batch: seeds follow the case id, not the position
    alone = batched(images[1:], tiny_denoiser, image_ids=["c2"])
    assert torch.equal(alone[0], a[1])


def test_samples_differ_between_seeds_and_samples(tiny_denoiser, images):
    scheduler = RespacedDDPMScheduler(num_train_timesteps=50, variance_type="learned_range", clip_sample=True)
    inferer = DiffusionSamplingInferer(scheduler, num_samples=4, num_inference_steps=4, seed=0, threshold=0.0)
    a = inferer(images, tiny_denoiser, image_ids=["x", "y"])
    b = DiffusionSamplingInferer(scheduler, num_samples=4, num_inference_steps=4, seed=1)(
        images, tiny_denoiser, image_ids=["x", "y"]
    )
    assert not torch.equal(a, b)
    assert not all(torch.equal(a[0, 0], a[0, n]) for n in range(1, 4))


def test_running_counter_seeds_images_by_position(tiny_denoiser, images):
    scheduler = RespacedDDIMScheduler(num_train_timesteps=20, eta=1.0)
    inferer = DiffusionSamplingInferer(scheduler, num_samples=2, num_inference_steps=3)
    first = inferer(images, tiny_denoiser)
    inferer.reset_counter()
    again = torch.cat([inferer(images[:1], tiny_denoiser), inferer(images[1:], tiny_denoiser)])
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="image_ids"):
        inferer(images, tiny_denoiser, image_ids=["only_one"])


def test_return_stats_gives_mean_and_variance(tiny_denoiser, images):
    scheduler = RespacedDDIMScheduler(num_train_timesteps=20, eta=1.0)
    out = DiffusionSamplingInferer(scheduler, num_samples=5, num_inference_steps=3, return_stats=True)(
        images, tiny_denoiser
    )
    p = out["pred"].mean(dim=1, keepdim=True)
    assert torch.allclose(out["mean"], p)
    assert torch.allclose(out["variance"], p * (1 - p))


def test_sample_statistics_by_hand():
    samples = torch.tensor([[[[1.0]], [[0.0]], [[1.0]], [[1.0]]]])  # 1 image, 4 samples, 1 x 1
    mean, var = sample_statistics(samples)
    assert mean.item() == pytest.approx(0.75)
    assert var.item() == pytest.approx(0.1875)


def test_wrong_image_channels_give_a_clear_error(tiny_denoiser):
    inferer = DiffusionSamplingInferer(RespacedDDIMScheduler(num_train_timesteps=10), num_samples=1, num_inference_steps=2)
    with pytest.raises(ValueError, match="image has 3 channel"):
        inferer(torch.zeros(1, 3, 8, 8), tiny_denoiser)


class _PrecisionRecorder(torch.nn.Module):
    """Wraps a denoiser and records the dtype its first convolution computes in at each call."""

    def __init__(self, network):
        super().__init__()
        self.network, self.seen = network, []

    def encode_condition(self, images):
        return self.network.encode_condition(images)

    def forward(self, x, t, cond=None, class_labels=None):
        self.seen.append(torch.nn.functional.conv2d(x, torch.ones(1, x.shape[1], 1, 1)).dtype)
        return self.network(x, t, cond=cond, class_labels=class_labels)


def test_autocast_runs_the_network_in_bfloat16_and_the_scheduler_in_float32(tiny_denoiser, images):
    scheduler = RespacedDDPMScheduler(num_train_timesteps=50, variance_type="learned_range")
    recorder = _PrecisionRecorder(tiny_denoiser)
    mixed = DiffusionSamplingInferer(scheduler, num_samples=3, num_inference_steps=4, seed=7, autocast_dtype="bfloat16")
    masks = mixed(images, recorder, image_ids=["c1", "c2"])
    assert recorder.seen == [torch.bfloat16] * 4  # every step's network call, and only those
    assert masks.dtype == torch.float32 and masks.shape == (2, 3, 8, 8)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    recorder.seen.clear()
    full = DiffusionSamplingInferer(scheduler, num_samples=3, num_inference_steps=4, seed=7)(
        images, recorder, image_ids=["c1", "c2"]
    )
    assert recorder.seen == [torch.float32] * 4
    # bf16 rounding moves a few pixels near the threshold at most; the samples are the same draws
    assert (masks != full).float().mean() < 0.1


def test_unknown_autocast_dtype_is_named():
    scheduler = RespacedDDPMScheduler(num_train_timesteps=50)
    with pytest.raises(ValueError, match="'float8'"):
        DiffusionSamplingInferer(scheduler, autocast_dtype="float8")
