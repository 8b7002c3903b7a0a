"""Rater-posterior training targets: E[x_0 | x_t, the image's raters] and the inferers that use them."""

from __future__ import annotations

import pytest
import torch

from ambiseg_monai.diffusion import mixture_posterior_mean, rater_posterior_target
from ambiseg_monai.diffusion.weighting import LossWeighting
from ambiseg_monai.engines import DiffusionTrainingPrepareBatch
from ambiseg_monai.inferers import DiffusionTrainingInferer
from ambiseg_monai.schedulers import RespacedDDPMScheduler
from ambiseg_monai.schedulers.continuous import ContinuousDDPMScheduler


def test_mixture_posterior_mean_matches_hand_computation():
    # two 2-pixel masks (+1, +1) and (+1, -1), prior 0.5 / 0.5, α = 1, σ² = 1, x_t = (0, 1):
    # logits α<x_t, m_k>/σ² = (1, -1), weights e/(e + 1/e) and 1/e/(e + 1/e)
    masks = torch.tensor([[[1.0, 1.0], [1.0, -1.0]]], dtype=torch.float64)
    out = mixture_posterior_mean(
        torch.tensor([[0.0, 1.0]], dtype=torch.float64),
        masks,
        torch.zeros(1, 2, dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64),
    )
    w1 = torch.e / (torch.e + 1 / torch.e)
    assert out[0].tolist() == pytest.approx([1.0, w1 - (1 - w1)])


def _raters():
    raters = torch.zeros(1, 3, 4, 4)
    raters[0, 0, :2] = 1  # top half
    raters[0, 1, :, :2] = 1  # left half
    raters[0, 2] = 1  # a padded rater, all foreground, must be ignored
    return raters, torch.tensor([[True, True, False]])


def test_rater_posterior_target_limits_and_padding():
    raters, rater_mask = _raters()
    first = 2.0 * raters[:, :1] - 1.0
    # almost no noise: the target is the rater that made x_t
    near = rater_posterior_target(0.999 * first, raters, rater_mask, torch.tensor([0.999**2]))
    assert torch.allclose(near, first, atol=1e-6)
    # almost pure noise: the target is the mean of the real raters (the padded one excluded)
    far = rater_posterior_target(torch.zeros(1, 1, 4, 4), raters, rater_mask, torch.tensor([1e-6]))
    expected = (2.0 * raters[:, :2] - 1.0).mean(1, keepdim=True)
    assert torch.allclose(far, expected, atol=1e-4)
    with pytest.raises(ValueError, match="no rater"):
        rater_posterior_target(torch.zeros(1, 1, 4, 4), raters, torch.zeros(1, 3, dtype=torch.bool), torch.tensor([0.5]))


def _batch():
    raters, rater_mask = _raters()
    return {
        "image": torch.rand(1, 1, 4, 4),
        "target": raters[:, :1],
        "label": raters,
        "rater_mask": rater_mask,
    }


class _Constant(torch.nn.Module):
    def forward(self, x_t, timesteps, class_labels=None, image=None, target=None):
        return torch.zeros_like(x_t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_training_inferer_regresses_on_the_rater_posterior(prediction_type):
    scheduler = RespacedDDPMScheduler(num_train_timesteps=100, variance_type="fixed_small", prediction_type=prediction_type)
    image, target, _, kwargs = DiffusionTrainingPrepareBatch(rater_key="label")(_batch())
    assert kwargs["raters"].shape == (1, 3, 4, 4) and kwargs["rater_mask"].tolist() == [[True, True, False]]
    torch.manual_seed(0)
    plain = DiffusionTrainingInferer(scheduler, compute_vlb=False)(image, _Constant(), target=target)
    torch.manual_seed(0)
    posterior = DiffusionTrainingInferer(scheduler, compute_vlb=False, rater_posterior_targets=True)(
        image, _Constant(), **kwargs
    )
    # a zero output makes l_simple the mean squared regression target; recompute it by hand
    t = posterior["timesteps"]
    gamma = scheduler.alphas_cumprod[t].float()
    x0_hat = rater_posterior_target(posterior["x_t"], kwargs["raters"], kwargs["rater_mask"], gamma)
    alpha, sigma = gamma.sqrt(), (1 - gamma).sqrt()
    eps_hat = (posterior["x_t"] - alpha * x0_hat) / sigma
    expected = {"epsilon": eps_hat, "sample": x0_hat, "v_prediction": alpha * eps_hat - sigma * x0_hat}[prediction_type]
    assert posterior["l_simple"].item() == pytest.approx(float((expected**2).mean()), rel=1e-5)
    assert plain["timesteps"].tolist() == t.tolist()  # same draws: only the target differs


def test_rater_posterior_target_needs_the_raters():
    scheduler = RespacedDDPMScheduler(num_train_timesteps=100, variance_type="fixed_small")
    image, target, _, _ = DiffusionTrainingPrepareBatch()(_batch())
    with pytest.raises(ValueError, match="rater_key"):
        DiffusionTrainingInferer(scheduler, rater_posterior_targets=True)(image, _Constant(), target=target)
    with pytest.raises(KeyError, match="rater_mask"):
        DiffusionTrainingPrepareBatch(rater_key="label")({k: v for k, v in _batch().items() if k != "rater_mask"})


def test_continuous_inferer_with_identical_raters_keeps_the_plain_target():
    # when every rater drew the same mask, the posterior target is that mask: the loss is unchanged
    scheduler = ContinuousDDPMScheduler(prediction_type="x")
    batch = _batch()
    batch["label"] = batch["target"].repeat(1, 3, 1, 1)
    image, target, _, kwargs = DiffusionTrainingPrepareBatch(rater_key="label")(batch)
    losses = []
    for posterior in (False, True):
        torch.manual_seed(0)
        inferer = DiffusionTrainingInferer(
            scheduler, weighting=LossWeighting(), stratified_times=True, rater_posterior_targets=posterior
        )
        losses.append(inferer(image, _Constant(), **kwargs)["l_simple"].item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
