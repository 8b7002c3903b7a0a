"""Tests for PHiSeg (hierarchical spatial latents) and its ELBO loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _latent_training import sample_toy_batch, train_on_toy_batches

from ambiseg_monai.inferers.latent import LatentSampleInferer
from ambiseg_monai.losses.elbo import PHiSegELBOLoss
from ambiseg_monai.networks.latent_distributions import AxisAlignedGaussian, latent_kl_divergence
from ambiseg_monai.networks.phiseg import HierarchicalLikelihood, PHiSeg


def _tiny_phiseg(in_channels: int = 1, channels=(8, 16, 16), latent_levels: int = 2) -> PHiSeg:
    return PHiSeg(in_channels, channels, latent_levels=latent_levels, latent_dim=2, convs_per_level=1)


@pytest.mark.parametrize(
    "in_channels, channels, latent_levels",
    [(1, (8, 16, 16), 2), (4, (8, 16, 16), 3), (1, (8, 8, 16, 16), 1)],
    ids=["3res-2latent", "ms-4ch-3res-3latent", "4res-1latent"],
)
def test_phiseg_shapes(in_channels, channels, latent_levels):
    torch.manual_seed(0)
    net = _tiny_phiseg(in_channels, channels, latent_levels)
    image = torch.randn(2, in_channels, 32, 32)
    out = net(image, (torch.rand(2, 1, 32, 32) > 0.5).float())
    assert out["logits"].shape == (2, 1, 32, 32)
    assert out["level_logits"].shape == (2, latent_levels, 32, 32)
    torch.testing.assert_close(out["logits"], out["level_logits"][:, :1])
    assert out["kl"].shape == (2, latent_levels) and (out["kl"] >= 0).all()
    assert net.sample(image, 5).shape == (2, 5, 32, 32)


def test_latents_live_at_the_coarsest_resolution_levels():
    net = _tiny_phiseg(channels=(8, 8, 16, 16), latent_levels=2)  # latent levels at resolution levels 2 and 3
    distributions, samples = net.prior(torch.randn(3, 1, 32, 32), num_samples=4)
    assert [d.event_shape for d in distributions] == [(2, 8, 8), (2, 4, 4)]
    assert [s.shape for s in samples] == [(12, 2, 8, 8), (12, 2, 4, 4)]  # B * N rows


def test_spatial_kl_matches_closed_form():
    """Per-level KL of spatial axis-aligned Gaussians sums the closed form over channels and pixels."""
    mu_q, log_sigma_q = torch.randn(2, 2, 3, 3, dtype=torch.float64), 0.3 * torch.randn(2, 2, 3, 3, dtype=torch.float64)
    mu_p, log_sigma_p = torch.randn(2, 2, 3, 3, dtype=torch.float64), 0.3 * torch.randn(2, 2, 3, 3, dtype=torch.float64)
    family = AxisAlignedGaussian(latent_dim=2)
    q, p = family(torch.cat([mu_q, log_sigma_q], 1)), family(torch.cat([mu_p, log_sigma_p], 1))
    sq, sp = log_sigma_q.exp().numpy(), log_sigma_p.exp().numpy()
    elementwise = np.log(sp / sq) + (sq**2 + (mu_q.numpy() - mu_p.numpy()) ** 2) / (2 * sp**2) - 0.5
    np.testing.assert_allclose(latent_kl_divergence(q, p).numpy(), elementwise.sum(axis=(1, 2, 3)), rtol=1e-10)


def test_likelihood_sums_levels_residually():
    """Level l predicts the sum of the raw level maps l..L-1 (coarse to fine refinement)."""
    likelihood = HierarchicalLikelihood(channels=(4, 4, 4), latent_levels=3, latent_dim=2)
    with torch.no_grad():
        for level, head in enumerate(likelihood.heads):
            head.conv.weight.zero_()
            head.conv.bias.fill_(level + 1.0)  # raw level maps are constants 1, 2, 3
    samples = [torch.randn(1, 2, 8 // 2**level, 8 // 2**level) for level in range(3)]
    out = likelihood(samples, (8, 8))
    torch.testing.assert_close(out, torch.tensor([6.0, 5.0, 3.0])[None, :, None, None].expand(1, 3, 8, 8))


def test_training_prior_is_conditioned_on_posterior_samples_and_sampling_uses_only_the_prior():
    torch.manual_seed(0)
    net = _tiny_phiseg().eval()
    seen = {}

    def record_posterior(module, args, output):
        seen["posterior_samples"] = output[1]

    def record_prior(module, args, kwargs):
        seen["prior_override"] = kwargs.get("override_samples")

    net.posterior.register_forward_hook(record_posterior)
    handle = net.prior.register_forward_pre_hook(record_prior, with_kwargs=True)
    net(torch.randn(2, 1, 32, 32), torch.zeros(2, 1, 32, 32))
    assert seen["prior_override"] is seen["posterior_samples"]
    handle.remove()

    prior_batches = []
    net.prior.register_forward_hook(lambda module, args, output: prior_batches.append(args[0].shape[0]))

    def forbid(module, args):
        raise AssertionError("the posterior must not be used for sampling")

    net.posterior.register_forward_pre_hook(forbid)
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        logits = net.sample(image, 4)
        samples = LatentSampleInferer(num_samples=4)(image, net)
    assert prior_batches == [2, 2]  # one prior pass per call, the encoder runs once per image
    assert (logits[:, 1:] - logits[:, :1]).abs().amax(dim=(2, 3)).min() > 1e-3  # draws differ
    assert samples.shape == (2, 4, 32, 32) and set(samples.unique().tolist()) <= {0.0, 1.0}


def test_seeded_sampling_is_independent_of_the_batch():
    torch.manual_seed(0)
    net = _tiny_phiseg().eval()
    images = torch.randn(3, 1, 32, 32)
    inferer = LatentSampleInferer(num_samples=2, seed=5)
    with torch.no_grad():
        all_three = net.sample(images, 2, [torch.Generator().manual_seed(s) for s in range(6)])
        last_one = net.sample(images[2:], 2, [torch.Generator().manual_seed(s) for s in (4, 5)])
    torch.testing.assert_close(all_three[2:], last_one)
    together = inferer(images, net, image_ids=[0, 1, 2])
    torch.testing.assert_close(together[1:], inferer(images[1:], net, image_ids=[1, 2]))


def test_phiseg_bad_inputs():
    net = _tiny_phiseg()
    with pytest.raises(ValueError, match=r"divisible by 4, got \(30, 32\)"):
        net.sample(torch.randn(1, 1, 30, 32), 2)
    with pytest.raises(ValueError, match=r"B x 1 x H x W, got \(1, 2, 32, 32\)"):
        net.sample(torch.randn(1, 2, 32, 32), 2)
    with pytest.raises(ValueError, match="needs the training mask"):
        net(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"latent_levels must be in 1..3"):
        PHiSeg(channels=(8, 16, 16), latent_levels=4)


def test_phiseg_loss_matches_hand_computation():
    pred = {
        "logits": torch.zeros(2, 1, 4, 4),
        "level_logits": torch.zeros(2, 3, 4, 4),
        "kl": torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]),  # batch mean 2 at every level
    }
    target = torch.randint(0, 2, (2, 1, 4, 4)).float()
    reconstruction = 3 * 16 * math.log(2)  # three levels, 16 pixels at p = 0.5
    loss_fn = PHiSegELBOLoss()
    assert loss_fn(pred, target).item() == pytest.approx(reconstruction + 2.0 * (1 + 4 + 16), rel=1e-6)
    assert loss_fn.last_terms["kl_level2"] == pytest.approx(2.0)
    assert loss_fn.last_terms["reconstruction_level0"] == pytest.approx(16 * math.log(2), rel=1e-6)
    flat = PHiSegELBOLoss(kl_weight=0.5, exponential_kl_weighting=False, reconstruction_weight=2.0)
    assert flat(pred, target).item() == pytest.approx(2 * reconstruction + 0.5 * 2.0 * 3, rel=1e-6)


def test_phiseg_loss_reports_divergence_and_bad_shapes():
    loss_fn = PHiSegELBOLoss()
    pred = {
        "logits": torch.zeros(1, 1, 4, 4),
        "level_logits": torch.zeros(1, 2, 4, 4),
        "kl": torch.tensor([[0.0, math.inf]]),
    }
    with pytest.raises(FloatingPointError, match=r"PHiSeg loss became non-finite at iteration 1: .*'kl_level1'"):
        loss_fn(pred, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"kl must be B x L with L = 2 levels, got \(1, 3\)"):
        loss_fn({**pred, "kl": torch.zeros(1, 3)}, torch.zeros(1, 1, 4, 4))
    with pytest.raises(TypeError, match="level_logits"):
        loss_fn({"logits": torch.zeros(1, 1, 4, 4), "kl": torch.zeros(1, 2)}, torch.zeros(1, 1, 4, 4))


def test_short_supervised_training_decreases_the_loss():
    torch.manual_seed(0)
    net = _tiny_phiseg()
    losses, reconstructions = train_on_toy_batches(net, PHiSegELBOLoss(), max_epochs=10)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
    assert np.mean(reconstructions[-5:]) < 0.5 * np.mean(reconstructions[:3])  # learnt, not only KL shrinkage

    pred = sample_toy_batch(net, LatentSampleInferer(num_samples=3, return_stats=True))
    assert pred["pred"].shape == (4, 3, 32, 32) and pred["mean"].shape == (4, 1, 32, 32)
