"""Tests of the Stochastic Segmentation Network: the low-rank logit distribution, sampling, the Monte Carlo
log-likelihood loss (hand-computed and quadrature values) and the latent-model engine pieces it plugs into."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Independent, LowRankMultivariateNormal

from ambiseg_monai.inferers.latent import LatentSampleInferer, LatentTrainingInferer
from ambiseg_monai.losses.ssn import StochasticSegmentationLoss, monte_carlo_log_likelihood
from ambiseg_monai.networks.ssn import (
    COVARIANCE_EPSILON,
    StochasticSegmentationNetwork,
    foreground_logits,
    logit_distribution,
    sample_logit_maps,
)


def _tiny_net(**kwargs) -> StochasticSegmentationNetwork:
    torch.manual_seed(0)
    settings = {"channels": (8, 16), "num_res_units": 1, "num_head_convs": 1, "rank": 3, **kwargs}
    return StochasticSegmentationNetwork(**settings)


def _pred(loc, cov_diag, cov_factor=None, height=1, width=1) -> dict:
    """A training dict for the loss from explicit parameters (B x K); ``logits`` only carries the shape."""
    loc = torch.as_tensor(loc, dtype=torch.float64)
    pred = {"logits": torch.zeros(loc.shape[0], 1, height, width, dtype=torch.float64), "loc": loc,
            "cov_diag": torch.as_tensor(cov_diag, dtype=torch.float64)}  # fmt: skip
    if cov_factor is not None:
        pred["cov_factor"] = torch.as_tensor(cov_factor, dtype=torch.float64)
    return pred


# ------------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize("num_classes", [1, 2])
def test_training_output_holds_the_distribution_parameters(num_classes):
    net = _tiny_net(num_classes=num_classes)
    image = torch.rand(2, 1, 16, 12)
    out = net(image, torch.zeros(2, 1, 16, 12))
    k = num_classes * 16 * 12
    assert out["logits"].shape == (2, 1, 16, 12)
    assert out["loc"].shape == (2, k) and out["cov_diag"].shape == (2, k) and out["cov_factor"].shape == (2, k, 3)
    assert bool((out["cov_diag"] >= COVARIANCE_EPSILON).all())
    mean_maps = out["loc"].reshape(2, num_classes, 16, 12)
    expected = mean_maps[:, 0] if num_classes == 1 else mean_maps[:, 1] - mean_maps[:, 0]
    torch.testing.assert_close(out["logits"][:, 0], expected)


def test_covariance_is_low_rank_plus_diagonal_as_torch_defines_it():
    net = _tiny_net(num_classes=2).eval()
    image = torch.rand(1, 1, 4, 4)
    with torch.no_grad():
        params = net.distribution_parameters(image)
        distribution = net.distribution(image)
    assert isinstance(distribution, LowRankMultivariateNormal)
    assert distribution.event_shape == (32,) and distribution.batch_shape == (1,)
    factor, diag = params["cov_factor"][0].double(), params["cov_diag"][0].double()
    expected = factor @ factor.T + torch.diag(diag)
    torch.testing.assert_close(distribution.covariance_matrix[0].double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_rank(expected - torch.diag(diag)).item() == 3  # rank of P P^T: the factor's rank
    # the factor's channel layout: channel r * C + c of the head is class c of column r
    with torch.no_grad():
        raw = net.cov_factor_head(net.head(net.unet(image)))  # 1 x (R * C) x H x W
    torch.testing.assert_close(params["cov_factor"][0, 16 + 5, 2], raw[0, 2 * 2 + 1].flatten()[5])


def test_empirical_covariance_of_the_samples_matches_the_distribution():
    generator = torch.Generator().manual_seed(1)
    loc = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    factor = torch.randn(1, 3, 2, generator=generator, dtype=torch.float64)
    diag = torch.tensor([[0.3, 0.1, 0.5]], dtype=torch.float64)
    torch.manual_seed(0)
    samples = sample_logit_maps(loc, factor, diag, 40000)[0]  # N x K
    reference = LowRankMultivariateNormal(loc, factor, diag)
    torch.testing.assert_close(samples.mean(0), loc[0], atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), reference.covariance_matrix[0], atol=0.05, rtol=0)
    # the same formula as torch's reparameterised sample: loc + P e_W + sqrt(D) e_D
    generators = [torch.Generator().manual_seed(7)]
    drawn = sample_logit_maps(loc, factor, diag, 1, generators)[0, 0]
    g = torch.Generator().manual_seed(7)
    e_w, e_d = torch.randn(2, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(drawn, loc[0] + factor[0] @ e_w + diag[0].sqrt() * e_d)


def test_zero_covariance_samples_all_equal_the_mean():
    loc = torch.randn(2, 6)
    samples = sample_logit_maps(loc, torch.zeros(2, 6, 4), torch.zeros(2, 6), 5)
    assert samples.shape == (2, 5, 6)
    torch.testing.assert_close(samples, loc[:, None].expand(2, 5, 6))
    diagonal = sample_logit_maps(loc, None, torch.zeros(2, 6), 3)
    torch.testing.assert_close(diagonal, loc[:, None].expand(2, 3, 6))


@pytest.mark.parametrize("num_classes", [1, 2])
def test_samples_have_the_inferer_shape_and_vary(num_classes):
    net = _tiny_net(num_classes=num_classes).eval()
    image = torch.rand(3, 1, 8, 8)
    logits = net.sample(image, 6)
    assert logits.shape == (3, 6, 8, 8)
    masks = (logits > 0).float()
    assert all(len({tuple(m.flatten().tolist()) for m in masks[b]}) > 1 for b in range(3))  # N distinct masks
    samples = LatentSampleInferer(num_samples=6, seed=0)(image, net)
    assert samples.shape == (3, 6, 8, 8) and set(samples.unique().tolist()) <= {0.0, 1.0}
    stats = LatentSampleInferer(num_samples=6, seed=0, return_stats=True)(image, net)
    torch.testing.assert_close(stats["pred"], samples)  # the same seeds
    torch.testing.assert_close(stats["mean"][:, 0], samples.mean(1))


def test_two_class_samples_are_the_argmax():
    maps = torch.randn(2, 4, 2, 5, 5)  # B x N x C x H x W
    foreground = foreground_logits(maps, 2)
    assert torch.equal(foreground > 0, maps.argmax(dim=2) == 1)
    assert torch.equal(foreground_logits(maps[:, :, :1], 1), maps[:, :, 0])


def test_seeded_samples_do_not_depend_on_the_rest_of_the_batch():
    net = _tiny_net().eval()
    images = torch.rand(2, 1, 8, 8)
    inferer = LatentSampleInferer(num_samples=3, seed=5)
    both = inferer(images, net, image_ids=["a", "b"])
    alone = inferer(images[1:], net, image_ids=["b"])
    assert torch.equal(both[1:], alone)
    assert not torch.equal(both[0], inferer(images[:1], net, image_ids=["c"])[0])


def test_diagonal_variant_has_no_factor_and_independent_pixels():
    net = _tiny_net(diagonal=True)
    assert net.cov_factor_head is None
    out = net(torch.rand(2, 1, 8, 8))
    assert "cov_factor" not in out
    assert isinstance(net.distribution(torch.rand(1, 1, 8, 8)), Independent)
    independent = logit_distribution(torch.zeros(1, 3), None, torch.tensor([[1.0, 4.0, 9.0]]))
    torch.testing.assert_close(independent.variance, torch.tensor([[1.0, 4.0, 9.0]]))
    loss = StochasticSegmentationLoss(num_mc_samples=4)
    assert torch.isfinite(loss(out, torch.zeros(2, 1, 8, 8)))
    assert net.eval().sample(torch.rand(1, 1, 8, 8), 2).shape == (1, 2, 8, 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, r"rank must be >= 1 \(paper: 10\), got 0.*diagonal=True"),
        ({"rank": -2}, "rank must be >= 1"),
        ({"num_classes": 3}, "num_classes must be 1 .* or 2"),
        ({"channels": (8,)}, "at least 2 levels"),
        ({"num_head_convs": -1}, "num_head_convs must be >= 0"),
        ({"epsilon": 0.0}, "epsilon must be > 0"),
    ],
)
def test_bad_network_settings_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _tiny_net(**kwargs)


def test_bad_images_fail_clearly():
    net = _tiny_net()
    with pytest.raises(ValueError, match=r"expects images of shape B x 1 x H x W, got \(2, 3, 8, 8\)"):
        net(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"needs H and W divisible by 2, got \(7, 8\)"):
        net.sample(torch.rand(1, 1, 7, 8), 2)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        net.sample(torch.rand(1, 1, 8, 8), 0)
    with pytest.raises(ValueError, match="one generator per"):
        sample_logit_maps(torch.zeros(2, 3), None, torch.ones(2, 3), 2, [torch.Generator()])


# ---------------------------------------------------------------------------------------------------- loss


def test_loss_with_zero_covariance_is_the_summed_cross_entropy_of_the_mean():
    # 2 x 2 image, one foreground logit: every Monte Carlo sample is the mean, so the estimate is exact
    mean = [2.0, -1.0, 0.5, -3.0]
    target = [1.0, 0.0, 0.0, 1.0]
    sigmoid = [1 / (1 + math.exp(-m)) for m in mean]
    by_hand = -sum(math.log(p) if y else math.log(1 - p) for p, y in zip(sigmoid, target, strict=True))
    loss = StochasticSegmentationLoss(num_mc_samples=5)
    pred = _pred([mean], [[0.0] * 4], [[[0.0]] * 4], height=2, width=2)
    value = loss(pred, torch.tensor(target, dtype=torch.float64).reshape(1, 1, 2, 2))
    assert value.item() == pytest.approx(by_hand, rel=1e-6)  # computed in float32
    assert loss.last_terms["mean_nll"] == pytest.approx(by_hand, rel=1e-6)  # computed in float32
    # two classes, background logit 0: the same likelihood (softmax of (0, m) is sigmoid(m))
    two_class = _pred([[0.0] * 4 + mean], [[0.0] * 8], height=2, width=2)
    assert loss(two_class, torch.tensor(target, dtype=torch.float64).reshape(1, 1, 2, 2)).item() == pytest.approx(
        by_hand
    )


def test_logsumexp_estimator_matches_the_direct_mean_of_likelihoods():
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(6, 2, 2, 2, 3, generator=generator, dtype=torch.float64)  # M x B x C x H x W
    target = (torch.rand(2, 2, 3, generator=generator) > 0.5).double()
    probabilities = torch.softmax(samples, dim=2)  # direct: p(y | eta_m) as a product over pixels
    chosen = torch.where(target.bool()[None], probabilities[:, :, 1], probabilities[:, :, 0])
    direct = torch.log(chosen.flatten(2).prod(-1).mean(0))  # log (1/M) sum_m prod_pixels p
    torch.testing.assert_close(monte_carlo_log_likelihood(samples, target), direct)


def test_monte_carlo_loss_converges_to_the_integral_it_estimates():
    # one pixel, eta ~ N(mu, sigma^2), target 1: -log E[sigmoid(eta)] by Gauss-Hermite quadrature
    mu, sigma = -0.5, 1.5
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    exact = -math.log(float(np.sum(weights / (1 + np.exp(-(mu + sigma * nodes))))) / math.sqrt(2 * math.pi))
    torch.manual_seed(0)
    loss = StochasticSegmentationLoss(num_mc_samples=100000)
    value = loss(_pred([[mu]], [[sigma**2]]), torch.ones(1, 1, 1, 1, dtype=torch.float64)).item()
    assert value == pytest.approx(exact, abs=5e-3)
    # the mean alone (no covariance) is a different, larger value here: the covariance is what is estimated
    assert loss.last_terms["mean_nll"] == pytest.approx(math.log1p(math.exp(-mu)))
    # the low-rank route: the same variance as factor + small diagonal gives the same integral
    low_rank = loss(_pred([[mu]], [[1e-6]], [[[sigma]]]), torch.ones(1, 1, 1, 1, dtype=torch.float64)).item()
    assert low_rank == pytest.approx(exact, abs=5e-3)


def test_antithetic_draws_come_in_reflected_pairs():
    loss = StochasticSegmentationLoss(num_mc_samples=6, antithetic=True)
    pred = _pred([[1.0, -2.0]], [[0.5, 0.2]], [[[0.3], [0.7]]], height=1, width=2)
    draws = loss.draw(pred)
    assert draws.shape == (6, 1, 2)
    torch.testing.assert_close(draws[:3] + draws[3:], 2 * pred["loc"].expand(3, 1, 2))


def test_loss_gradient_reaches_every_head():
    net = _tiny_net()
    out = net(torch.rand(2, 1, 8, 8))
    StochasticSegmentationLoss(num_mc_samples=4)(out, (torch.rand(2, 1, 8, 8) > 0.5).float()).backward()
    for head in (net.mean_head, net.log_cov_diag_head, net.cov_factor_head):
        assert head.conv.weight.grad is not None and head.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("samples", ValueError, r"num_mc_samples must be >= 1 \(paper: 20\)"),
        ("odd", ValueError, "num_mc_samples must be even"),
        ("not_a_dict", TypeError, "expects the network's training output"),
        ("target_shape", ValueError, r"target must have shape \(1, 1, 2, 2\)"),
        ("loc_shape", ValueError, r"loc must be B x \(C \* H \* W\)"),
        ("nan", FloatingPointError, "non-finite at iteration 1"),
    ],
)
def test_loss_bad_inputs(case, error, message):
    pred = _pred([[0.0] * 4], [[1.0] * 4], height=2, width=2)
    target = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(error, match=message):
        if case == "samples":
            StochasticSegmentationLoss(num_mc_samples=0)
        elif case == "odd":
            StochasticSegmentationLoss(num_mc_samples=5, antithetic=True)
        elif case == "not_a_dict":
            StochasticSegmentationLoss()(torch.zeros(1, 1, 2, 2), target)
        elif case == "target_shape":
            StochasticSegmentationLoss()(pred, torch.zeros(1, 1, 3, 2))
        elif case == "loc_shape":
            StochasticSegmentationLoss()({**pred, "loc": torch.zeros(1, 5)}, target)
        else:
            StochasticSegmentationLoss()({**pred, "loc": torch.full((1, 4), float("nan"))}, target)


def test_training_inferer_drives_the_network_and_the_loss():
    net = _tiny_net()
    image, target = torch.rand(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    out = LatentTrainingInferer()(image, net, target=target)
    assert set(out) == {"logits", "loc", "cov_diag", "cov_factor"}
    loss = StochasticSegmentationLoss(num_mc_samples=4, l2_weight=1e-5, network=net)
    value = loss(out, target)
    assert set(loss.last_terms) == {"loss", "nll", "mean_nll", "l2"}
    assert value.item() == pytest.approx(loss.last_terms["nll"] + 1e-5 * loss.last_terms["l2"], rel=1e-6)
    assert loss.last_terms["l2"] > 0


def test_distribution_algebra_stays_float32_under_autocast():
    # the bundles autocast the network (CUDA fp16, CPU bf16); the parameters, draws and loss stay float32
    net = _tiny_net()
    image, target = torch.rand(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = LatentTrainingInferer()(image, net, target=target)
        loss = StochasticSegmentationLoss(num_mc_samples=4)
        value = loss(out, target)
        samples = net.eval().sample(image, 3)
    assert all(out[key].dtype == torch.float32 for key in ("loc", "cov_diag", "cov_factor"))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert samples.dtype == torch.float32 and samples.shape == (2, 3, 8, 8)
