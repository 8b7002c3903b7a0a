"""Tests for the latent distribution families, the Probabilistic U-Net and the latent-model engine pieces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _latent_training import sample_toy_batch, train_on_toy_batches
from ignite.engine import Engine
from torch import nn

from ambiseg_monai.inferers.latent import LatentSampleInferer, LatentTrainingInferer
from ambiseg_monai.losses.elbo import ProbUNetELBOLoss
from ambiseg_monai.networks.latent_distributions import (
    CHOLESKY_DIAGONAL_EPS,
    AxisAlignedGaussian,
    FullCovarianceGaussian,
    MixtureOfAxisAlignedGaussians,
    MixtureOfFullCovarianceGaussians,
    latent_kl_divergence,
    sample_with_generators,
)
from ambiseg_monai.networks.prob_unet import ProbabilisticUNet

FAMILIES = {
    "axis_aligned": lambda: AxisAlignedGaussian(latent_dim=3),
    "mixture_axis_aligned": lambda: MixtureOfAxisAlignedGaussians(latent_dim=3, num_components=2),
    "full_covariance": lambda: FullCovarianceGaussian(latent_dim=3),
    "mixture_full_covariance": lambda: MixtureOfFullCovarianceGaussians(latent_dim=3, num_components=2),
}


def _softplus_inverse(value: float) -> float:
    """Raw Cholesky diagonal entry that the families map to ``value``."""
    return math.log(math.expm1(value - CHOLESKY_DIAGONAL_EPS))


def _tiny_net(family=None, in_channels: int = 1) -> ProbabilisticUNet:
    return ProbabilisticUNet(in_channels=in_channels, channels=(8, 16), latent_distribution=family, num_res_units=1)


# ----------------------------------------------------------------------------------------------- latent families


def test_axis_aligned_kl_matches_closed_form():
    mu_q, sigma_q = [0.5, -1.0], [0.8, 1.5]
    mu_p, sigma_p = [0.0, 0.5], [1.0, 2.0]
    expected = sum(
        math.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5
        for mq, sq, mp, sp in zip(mu_q, sigma_q, mu_p, sigma_p)
    )
    family = AxisAlignedGaussian(latent_dim=2)
    q = family(torch.tensor([mu_q + [math.log(s) for s in sigma_q]], dtype=torch.float64))
    p = family(torch.tensor([mu_p + [math.log(s) for s in sigma_p]], dtype=torch.float64))
    kl = latent_kl_divergence(q, p)
    assert kl.shape == (1,)
    assert kl.item() == pytest.approx(expected, rel=1e-10)
    # Monte Carlo agrees with the analytic value.
    torch.manual_seed(0)
    estimate = latent_kl_divergence(q, p, num_samples=20000, method="monte_carlo").item()
    assert estimate == pytest.approx(expected, rel=0.03)


def test_full_covariance_kl_matches_closed_form_and_builds_the_cholesky_factor():
    family = FullCovarianceGaussian(latent_dim=2)
    # parameters: [mu (2), raw diagonal (2), lower entry (1)]
    q = family(torch.tensor([[0.5, -1.0, _softplus_inverse(1.0), _softplus_inverse(0.8), 0.5]], dtype=torch.float64))
    p = family(torch.tensor([[0.0, 0.5, _softplus_inverse(1.5), _softplus_inverse(2.0), -0.3]], dtype=torch.float64))
    l_q, l_p = np.array([[1.0, 0.0], [0.5, 0.8]]), np.array([[1.5, 0.0], [-0.3, 2.0]])
    np.testing.assert_allclose(q.scale_tril[0].numpy(), l_q, atol=1e-12)
    cov_q, cov_p = l_q @ l_q.T, l_p @ l_p.T
    delta = np.array([0.0, 0.5]) - np.array([0.5, -1.0])
    inv_p = np.linalg.inv(cov_p)
    expected = 0.5 * (
        np.trace(inv_p @ cov_q) + delta @ inv_p @ delta - 2 + math.log(np.linalg.det(cov_p) / np.linalg.det(cov_q))
    )
    assert latent_kl_divergence(q, p).item() == pytest.approx(expected, rel=1e-10)
    torch.manual_seed(0)
    estimate = latent_kl_divergence(q, p, num_samples=20000, method="monte_carlo").item()
    assert estimate == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize(
    "mixture, single, component_params, prior_params",
    [
        (
            MixtureOfAxisAlignedGaussians(2, 3),
            AxisAlignedGaussian(2),
            [0.5, -1.0, math.log(0.8), math.log(1.5)],
            [0.0, 0.5, math.log(1.0), math.log(2.0)],
        ),
        (
            MixtureOfFullCovarianceGaussians(2, 3),
            FullCovarianceGaussian(2),
            [0.5, -1.0, _softplus_inverse(1.0), _softplus_inverse(0.8), 0.5],
            [0.0, 0.5, _softplus_inverse(1.5), _softplus_inverse(2.0), -0.3],
        ),
    ],
    ids=["mixture_axis_aligned", "mixture_full_covariance"],
)
def test_mixture_kl_monte_carlo_matches_closed_form_of_degenerate_mixture(
    mixture, single, component_params, prior_params
):
    """A mixture of K identical components is that Gaussian: the Monte Carlo KL must match its closed form
    (checked against the hand formulas in the two tests above)."""
    logits = [0.3, -1.0, 2.0]  # the weights must not matter
    q = mixture(torch.tensor([logits + component_params * 3], dtype=torch.float64))
    q_single = single(torch.tensor([component_params], dtype=torch.float64))
    p = single(torch.tensor([prior_params], dtype=torch.float64))
    z = torch.randn(5, 1, 2, dtype=torch.float64)
    torch.testing.assert_close(q.log_prob(z), q_single.log_prob(z))
    closed_form = latent_kl_divergence(q_single, p, method="analytic").item()
    torch.manual_seed(0)
    estimate = latent_kl_divergence(q, p, num_samples=20000).item()  # "auto": no analytic KL for a mixture
    assert estimate == pytest.approx(closed_form, rel=0.03)
    # KL of a distribution with itself is exactly zero for every sample.
    assert latent_kl_divergence(q, q, num_samples=7).item() == 0.0


@pytest.mark.parametrize("name", FAMILIES)
def test_family_shapes_rsample_gradients_and_auto_kl(name):
    family = FAMILIES[name]()
    torch.manual_seed(0)
    params = torch.randn(4, family.num_parameters, requires_grad=True)
    q, p = family(params), family(torch.randn(4, family.num_parameters))
    assert q.batch_shape == (4,) and q.event_shape == (3,)
    z = q.rsample((5,))
    assert z.shape == (5, 4, 3)
    z.sum().backward()
    assert params.grad is not None and params.grad.abs().sum() > 0  # reparameterised (mixtures: weights too)
    kl_a, kl_b = latent_kl_divergence(q, p), latent_kl_divergence(q, p)
    assert kl_a.shape == (4,) and torch.isfinite(kl_a).all()
    if name.startswith("mixture"):
        assert not torch.equal(kl_a, kl_b)  # Monte Carlo: no analytic KL for mixtures
        with pytest.raises(NotImplementedError, match="no analytic KL"):
            latent_kl_divergence(q, p, method="analytic")
    else:
        assert torch.equal(kl_a, kl_b)  # analytic


def test_mixture_rsample_draws_from_the_mixture():
    family = MixtureOfAxisAlignedGaussians(latent_dim=1, num_components=2)
    # weights 0.25 / 0.75 (logits log 1, log 3); components N(-5, 0.1^2) and N(5, 0.1^2)
    params = torch.tensor([[0.0, math.log(3.0), -5.0, math.log(0.1), 5.0, math.log(0.1)]])
    torch.manual_seed(0)
    z = family(params).rsample((4000,))[:, 0, 0]
    assert ((z - 5).abs() < 1).float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert ((z + 5).abs() < 1).sum() + ((z - 5).abs() < 1).sum() == 4000


def test_extreme_parameters_stay_finite():
    aa = AxisAlignedGaussian(2)(torch.tensor([[0.0, 0.0, 1e4, -1e4]]))
    assert torch.isfinite(aa.base_dist.scale).all() and (aa.base_dist.scale > 0).all()
    assert torch.isfinite(latent_kl_divergence(aa, AxisAlignedGaussian(2)(torch.zeros(1, 4)))).all()
    fc = FullCovarianceGaussian(2)(torch.tensor([[0.0, 0.0, -1e4, -1e4, 0.0]]))
    assert (torch.diagonal(fc.scale_tril, dim1=-2, dim2=-1) >= CHOLESKY_DIAGONAL_EPS).all()
    assert torch.isfinite(latent_kl_divergence(fc, FullCovarianceGaussian(2)(torch.zeros(1, 5)))).all()


def test_family_bad_inputs():
    with pytest.raises(ValueError, match=r"expects parameters of shape B x 5"):
        FullCovarianceGaussian(2)(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="latent_dim must be >= 1"):
        AxisAlignedGaussian(0)
    with pytest.raises(ValueError, match="num_components must be >= 1"):
        MixtureOfAxisAlignedGaussians(2, 0)
    with pytest.raises(ValueError, match="shapes differ"):
        latent_kl_divergence(AxisAlignedGaussian(2)(torch.zeros(1, 4)), AxisAlignedGaussian(3)(torch.zeros(1, 6)))


# ------------------------------------------------------------------------------------------ Probabilistic U-Net


@pytest.mark.parametrize("name", FAMILIES)
def test_prob_unet_shapes_for_each_variant(name):
    torch.manual_seed(0)
    net = _tiny_net(FAMILIES[name](), in_channels=4)  # 4 channels: multi-sequence MS MRI
    image = torch.randn(2, 4, 32, 32)
    target = (torch.rand(2, 1, 32, 32) > 0.5).float()
    out = net(image, target)
    assert out["logits"].shape == (2, 1, 32, 32)
    assert out["kl"].shape == (2,) and torch.isfinite(out["kl"]).all()
    assert net.sample(image, 5).shape == (2, 5, 32, 32)


def test_prob_unet_bad_inputs():
    net = _tiny_net()
    image = torch.randn(2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"B x 1 x H x W, got \(2, 3, 32, 32\)"):
        net(torch.randn(2, 3, 32, 32), torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible by 2"):
        net.sample(torch.randn(2, 1, 31, 32), 2)
    with pytest.raises(ValueError, match="needs the training mask `target`"):
        net(image)
    with pytest.raises(ValueError, match=r"target must have shape \(2, 1, 32, 32\)"):
        net(image, torch.zeros(2, 4, 32, 32))
    with pytest.raises(ValueError, match="binary mask"):
        net(image, torch.full((2, 1, 32, 32), 0.5))


def test_sampling_uses_the_prior_once_per_batch_and_never_the_posterior():
    torch.manual_seed(0)
    net = _tiny_net().eval()
    prior_calls = []
    net.prior.encoder.register_forward_hook(lambda module, args, out: prior_calls.append(args[0].shape[0]))

    def forbid(module, args):
        raise AssertionError("the posterior must not be used for sampling")

    net.posterior.encoder.register_forward_pre_hook(forbid)
    with torch.no_grad():
        samples = LatentSampleInferer(num_samples=6)(torch.randn(3, 1, 32, 32), net)
    assert samples.shape == (3, 6, 32, 32)
    assert prior_calls == [3]  # one prior pass for all 6 samples of the 3 images
    # ...whereas training does use the posterior
    with pytest.raises(AssertionError, match="posterior must not be used"):
        net(torch.randn(1, 1, 32, 32), torch.zeros(1, 1, 32, 32))


def test_samples_follow_the_prior_distribution_and_differ_across_draws():
    """Rig the decoder so that every pixel's logit is z_0: each binary sample is then all 1 iff z_0 > 0."""
    torch.manual_seed(0)
    net = ProbabilisticUNet(1, (8, 16), AxisAlignedGaussian(latent_dim=2), num_res_units=1, num_combiner_convs=1)
    net.eval()
    head, combiner = net.prior.head.conv, net.combiner[0].conv
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        head.weight.zero_()
        combiner.weight.zero_()
        combiner.weight[0, 8] = 1.0  # channels 0..7: U-Net features, 8..9: z
        combiner.bias.zero_()
        head.bias.copy_(torch.tensor([-50.0, 0.0, -10.0, -10.0]))  # prior mu_0 = -50, sigma ~ 0
        assert LatentSampleInferer(num_samples=5)(image, net).sum() == 0
        head.bias.copy_(torch.tensor([50.0, 0.0, -10.0, -10.0]))  # prior mu_0 = +50
        assert LatentSampleInferer(num_samples=5)(image, net).mean() == 1
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]))  # standard normal prior
        samples = LatentSampleInferer(num_samples=16, seed=3)(image, net)
        logits = net.sample(image, 6)
    assert samples.shape == (2, 16, 32, 32) and set(samples.unique().tolist()) == {0.0, 1.0}
    per_draw = samples.mean(dim=(2, 3))
    assert set(per_draw.unique().tolist()) == {0.0, 1.0}  # whole masks, both kinds drawn for each image
    assert ((per_draw == 1).sum(1) > 0).all() and ((per_draw == 0).sum(1) > 0).all()
    assert (logits[:, 1:] - logits[:, :1]).abs().amax(dim=(2, 3)).min() > 1e-3  # every draw differs


# -------------------------------------------------------------------------------------------- loss and engines


def test_prob_unet_loss_matches_hand_computation():
    regularised = nn.Linear(2, 1)
    with torch.no_grad():
        regularised.weight.copy_(torch.tensor([[1.0, 2.0]]))
        regularised.bias.fill_(3.0)  # squared L2 norm 1 + 4 + 9 = 14
    loss_fn = ProbUNetELBOLoss(beta=10.0, l2_weight=0.5, network=regularised)
    pred = {"logits": torch.zeros(2, 1, 4, 4), "kl": torch.tensor([1.0, 3.0])}
    loss = loss_fn(pred, torch.randint(0, 2, (2, 1, 4, 4)).float())
    expected = 16 * math.log(2) + 10.0 * 2.0 + 0.5 * 14.0  # summed BCE at p=0.5 + beta * mean KL + L2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss_fn.last_terms == pytest.approx(
        {"loss": expected, "reconstruction": 16 * math.log(2), "kl": 2.0, "l2": 14.0}, rel=1e-6
    )


def test_prob_unet_loss_bad_inputs():
    with pytest.raises(ValueError, match="needs the network"):
        ProbUNetELBOLoss(l2_weight=1e-5)
    loss_fn = ProbUNetELBOLoss(l2_weight=0.0)
    with pytest.raises(TypeError, match=r"dict with keys \['logits', 'kl'\]"):
        loss_fn(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"target must have shape \(2, 1, 4, 4\)"):
        loss_fn({"logits": torch.zeros(2, 1, 4, 4), "kl": torch.zeros(2)}, torch.zeros(2, 4, 4, 4))


def test_divergence_error_names_the_trainer_iteration_and_the_term():
    loss_fn = ProbUNetELBOLoss(l2_weight=0.0)
    target = torch.zeros(1, 1, 4, 4)

    def step(engine, kl_value):
        return loss_fn({"logits": torch.zeros(1, 1, 4, 4), "kl": torch.tensor([kl_value])}, target)

    engine = Engine(step)
    loss_fn.attach(engine)
    with pytest.raises(FloatingPointError, match=r"non-finite at iteration 3: non-finite term\(s\) \['kl'\]"):
        engine.run([0.5, 1.0, float("nan"), 1.0], max_epochs=1)


def test_sample_inferer_statistics_and_wrappers():
    class FixedSampler(nn.Module):
        def sample(self, image, num_samples, generators=None):
            # pixel 0 foreground in 3 of 4 samples, pixel 1 in none, pixel 2 in all, pixel 3 in 2 of 4
            logits = torch.tensor([[1.0, -1.0, 2.0, 3.0], [1.0, -1.0, 2.0, -3.0], [1.0, -1.0, 2.0, 3.0],
                                   [-1.0, -1.0, 2.0, -3.0]])
            return logits.reshape(1, 4, 2, 2)

    wrapped = nn.DataParallel(FixedSampler())
    out = LatentSampleInferer(num_samples=4, return_stats=True)(torch.zeros(1, 1, 2, 2), wrapped)
    assert out["pred"].shape == (1, 4, 2, 2)
    torch.testing.assert_close(out["mean"], torch.tensor([[[[0.75, 0.0], [1.0, 0.5]]]]))
    torch.testing.assert_close(out["variance"], torch.tensor([[[[0.1875, 0.0], [0.0, 0.25]]]]))
    with pytest.raises(TypeError, match=r"needs a network with sample\(image, num_samples, generators\)"):
        LatentSampleInferer(2)(torch.zeros(1, 1, 2, 2), nn.Identity())
    with pytest.raises(ValueError, match="returned \\(1, 4, 2, 2\\), expected \\(1, 2, 2, 2\\)"):
        LatentSampleInferer(2)(torch.zeros(1, 1, 2, 2), FixedSampler())
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        LatentSampleInferer(0)


def test_training_inferer_passes_the_target_and_rejects_class_labels():
    net = _tiny_net()
    image, target = torch.randn(2, 1, 32, 32), torch.ones(2, 1, 32, 32)
    out = LatentTrainingInferer()(image, net, target=target, class_labels=None)
    assert set(out) == {"logits", "kl"} and out["logits"].shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="needs `target`"):
        LatentTrainingInferer()(image, net)
    with pytest.raises(ValueError, match="take no class labels"):
        LatentTrainingInferer()(image, net, target=target, class_labels=torch.tensor([1, 2]))


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_with_generators_follows_the_distribution(name):
    family = FAMILIES[name]()
    torch.manual_seed(1)
    params = torch.randn(1, family.num_parameters, dtype=torch.float64).repeat(4000, 1)
    distribution = family(params)
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    z = sample_with_generators(distribution, generators)
    assert z.shape == (4000, 3)
    torch.testing.assert_close(z.mean(0), distribution.mean[0], atol=0.1 * distribution.stddev[0].max().item(), rtol=0)
    torch.testing.assert_close(z.var(0), distribution.variance[0], rtol=0.1, atol=0)
    # row i depends on generator i only
    again = sample_with_generators(family(params[:3]), [torch.Generator().manual_seed(i) for i in (0, 1, 2)])
    torch.testing.assert_close(again, z[:3])
    with pytest.raises(ValueError, match="one generator per batch row"):
        sample_with_generators(distribution, generators[:2])


def test_seeded_sampling_is_repeatable_and_independent_of_the_batch():
    torch.manual_seed(0)
    net = _tiny_net(MixtureOfAxisAlignedGaussians(latent_dim=2, num_components=3)).eval()
    with torch.no_grad():
        net.prior.head.conv.bias[-2:].fill_(2.0)  # wide last component: draws visibly differ
    images = torch.randn(2, 1, 32, 32)
    inferer = LatentSampleInferer(num_samples=4, seed=7, return_stats=True)
    pair = inferer(images, net, image_ids=["case_a", "case_b"])
    alone = inferer(images[1:], net, image_ids=["case_b"])
    torch.testing.assert_close(pair["pred"][1:], alone["pred"])
    logits = net.sample(images[1:], 4, [torch.Generator().manual_seed(s) for s in range(4)])
    assert not torch.equal(logits, net.sample(images[1:], 4, [torch.Generator().manual_seed(s) for s in range(4, 8)]))
    other_seed = LatentSampleInferer(num_samples=4, seed=8)(images, net, image_ids=["case_a", "case_b"])
    assert not torch.equal(other_seed, pair["pred"])
    with pytest.raises(ValueError, match="got 1 image_ids for a batch of 2"):
        inferer(images, net, image_ids=["case_a"])


def test_short_supervised_training_decreases_the_loss_and_evaluator_samples():
    torch.manual_seed(0)
    net = _tiny_net(MixtureOfFullCovarianceGaussians(latent_dim=2, num_components=2))
    loss_fn = ProbUNetELBOLoss(beta=1.0, network=net)
    losses, reconstructions = train_on_toy_batches(net, loss_fn, max_epochs=12, train_handlers=[loss_fn])
    assert len(losses) == 36 and loss_fn.iteration == 36
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
    assert np.mean(reconstructions[-5:]) < 0.5 * np.mean(reconstructions[:3])  # learnt, not only KL shrinkage

    pred = sample_toy_batch(net, LatentSampleInferer(num_samples=3))
    assert pred.shape == (4, 3, 32, 32) and set(pred.unique().tolist()) <= {0.0, 1.0}
