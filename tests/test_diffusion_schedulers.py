"""Respaced DDPM/DDIM schedulers and the Improved-DDPM VLB term, against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler
from scipy.stats import norm

from ambiseg_monai.diffusion.gaussian import GaussianChain
from ambiseg_monai.losses.diffusion import HybridDiffusionLoss, vlb_term
from ambiseg_monai.schedulers.respaced import (
    RespacedDDIMScheduler,
    RespacedDDPMScheduler,
    evenly_spaced_timesteps,
    split_model_output,
)


def _abar(scheduler) -> np.ndarray:
    return scheduler.alphas_cumprod.double().numpy()


def test_evenly_spaced_timesteps_keep_both_ends():
    assert evenly_spaced_timesteps(10, 3).tolist() == [9, 4, 0]  # linspace 9, 4.5, 0 (round half to even)
    assert evenly_spaced_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="num_inference_steps"):
        evenly_spaced_timesteps(10, 11)


def test_full_chain_matches_monai_betas_and_posterior():
    scheduler = RespacedDDPMScheduler(num_train_timesteps=50)
    chain = scheduler.sampling_chain
    assert torch.allclose(chain.betas.float(), scheduler.betas, atol=1e-6)
    abar = _abar(scheduler)
    t = 20
    expected = (1 - abar[t - 1]) / (1 - abar[t]) * (1 - abar[t] / abar[t - 1])
    assert chain.posterior_variance[t].item() == pytest.approx(expected, rel=1e-9)


def test_respaced_chain_recomputes_betas_from_kept_alphas_cumprod():
    scheduler = RespacedDDPMScheduler(num_train_timesteps=10)
    scheduler.set_timesteps(3)
    abar = _abar(scheduler)
    chain = scheduler.sampling_chain  # ascending kept steps 0, 4, 9
    assert chain.betas[0].item() == pytest.approx(1 - abar[0])
    assert chain.betas[1].item() == pytest.approx(1 - abar[4] / abar[0])
    assert chain.betas[2].item() == pytest.approx(1 - abar[9] / abar[4])
    post = (1 - abar[4]) / (1 - abar[9]) * (1 - abar[9] / abar[4])
    assert chain.posterior_variance[2].item() == pytest.approx(post)
    # the first step's posterior variance is 0: its log is clipped to the next step's value
    assert chain.posterior_log_variance_clipped[0].item() == pytest.approx(chain.posterior_log_variance_clipped[1].item())


def test_full_schedule_fixed_small_step_matches_monai():
    torch.manual_seed(0)
    ours = RespacedDDPMScheduler(num_train_timesteps=20, variance_type="fixed_small")
    monai = DDPMScheduler(num_train_timesteps=20, variance_type="fixed_small")
    monai.set_timesteps(20)
    sample, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for t in (15, 1):
        noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(5))
        expected, expected_x0 = monai.step(eps, t, sample, generator=torch.Generator().manual_seed(5))
        got, got_x0 = ours.step(eps, t, sample, noise=noise)
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.allclose(got_x0, expected_x0, atol=1e-5)


def test_respaced_learned_range_step_by_hand():
    """Mean and variance of a respaced learned-range step, computed from ᾱ at the kept steps."""
    scheduler = RespacedDDPMScheduler(num_train_timesteps=10, variance_type="learned_range", clip_sample=False)
    scheduler.set_timesteps(3)
    abar = _abar(scheduler)
    x_t = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64)
    eps = torch.full_like(x_t, -0.2)
    v = torch.full_like(x_t, 0.5)
    noise = torch.full_like(x_t, 1.0)
    out, x0 = scheduler.step(torch.cat([eps, v], 1), 4, x_t, noise=noise)  # kept step 4 -> previous kept step 0
    a_t, a_prev = abar[4], abar[0]
    beta = 1 - a_t / a_prev
    x0_ref = (0.3 - math.sqrt(1 - a_t) * -0.2) / math.sqrt(a_t)
    mean = math.sqrt(a_prev) * beta / (1 - a_t) * x0_ref + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * 0.3
    post = beta * (1 - a_prev) / (1 - a_t)
    frac = (0.5 + 1) / 2
    log_var = frac * math.log(beta) + (1 - frac) * math.log(post)  # interpolation of LOG variances
    assert x0.item() == pytest.approx(x0_ref, rel=1e-9)
    assert out.item() == pytest.approx(mean + math.exp(0.5 * log_var) * 1.0, rel=1e-9)


def test_last_step_adds_no_noise():
    scheduler = RespacedDDPMScheduler(num_train_timesteps=10, variance_type="learned_range")
    scheduler.set_timesteps(4)
    x = torch.randn(1, 1, 3, 3)
    output = torch.cat([torch.randn(1, 1, 3, 3), torch.zeros(1, 1, 3, 3)], 1)
    first, _ = scheduler.step(output, 0, x, noise=torch.zeros_like(x))
    second, _ = scheduler.step(output, 0, x, noise=torch.ones_like(x))
    assert torch.equal(first, second)


def test_ddim_uses_the_next_kept_step():
    scheduler = RespacedDDIMScheduler(num_train_timesteps=10, clip_sample=False)
    scheduler.set_timesteps(3)  # kept 9, 4, 0 (MONAI's DDIM would step 9 -> 9 - 10 // 3 = 6)
    abar = _abar(scheduler)
    x_t = torch.full((1, 1, 1, 1), 0.7, dtype=torch.float64)
    eps = torch.full_like(x_t, 0.1)
    out, x0 = scheduler.step(torch.cat([eps, torch.zeros_like(eps)], 1), 9, x_t)  # variance channel dropped
    x0_ref = (0.7 - math.sqrt(1 - abar[9]) * 0.1) / math.sqrt(abar[9])
    assert out.item() == pytest.approx(math.sqrt(abar[4]) * x0_ref + math.sqrt(1 - abar[4]) * 0.1, rel=1e-9)
    last, last_x0 = scheduler.step(eps, 0, x_t)
    assert torch.equal(last, last_x0)


def test_step_rejects_unknown_timestep_and_bad_channels():
    scheduler = RespacedDDPMScheduler(num_train_timesteps=10)
    scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match="not one of the scheduler's kept timesteps"):
        scheduler.step(torch.zeros(1, 1, 2, 2), 5, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="3 channels"):
        split_model_output(torch.zeros(1, 3, 2, 2), 1)


def test_vlb_term_matches_direct_gaussian_kl_and_decoder_nll():
    """A hand-made case: 2 images of 1 x 1 x 2 pixels at t = 3 (KL) and t = 0 (decoder NLL)."""
    scheduler = RespacedDDPMScheduler(num_train_timesteps=5, variance_type="learned_range", beta_start=0.1, beta_end=0.3)
    abar = _abar(scheduler)
    betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    x0 = torch.tensor([[[[1.0, -1.0]]], [[[-1.0, 1.0]]]], dtype=torch.float64)
    xt = torch.tensor([[[[0.4, -0.2]]], [[[-0.696, 0.854]]]], dtype=torch.float64)
    eps = torch.tensor([[[[0.3, -0.5]]], [[[0.2, 0.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[0.0, 1.0]]], [[[-1.0, 0.5]]]], dtype=torch.float64)
    t = torch.tensor([3, 0])
    got = vlb_term(scheduler, eps, v, x0, xt, t)

    def posterior(step, x_start, x_step):
        a, ap = abar[step], (abar[step - 1] if step > 0 else 1.0)
        mean = math.sqrt(ap) * betas[step] / (1 - a) * x_start + math.sqrt(1 - betas[step]) * (1 - ap) / (1 - a) * x_step
        return mean, betas[step] * (1 - ap) / (1 - a)

    # image 0, t = 3: analytic KL between 1-D Gaussians, averaged over the 2 pixels, in bits
    kls = []
    for p in range(2):
        true_mean, true_var = posterior(3, x0[0, 0, 0, p].item(), xt[0, 0, 0, p].item())
        x0_hat = (xt[0, 0, 0, p].item() - math.sqrt(1 - abar[3]) * eps[0, 0, 0, p].item()) / math.sqrt(abar[3])
        model_mean, _ = posterior(3, x0_hat, xt[0, 0, 0, p].item())
        frac = (v[0, 0, 0, p].item() + 1) / 2
        model_var = math.exp(frac * math.log(betas[3]) + (1 - frac) * math.log(true_var))
        kl = 0.5 * (math.log(model_var / true_var) + (true_var + (true_mean - model_mean) ** 2) / model_var - 1)
        kls.append(kl)
    assert got[0].item() == pytest.approx(np.mean(kls) / math.log(2), rel=1e-6)

    # image 1, t = 0: -log of the Gaussian mass of the data bin (edge bins open), exact normal CDF
    nlls = []
    _, post1 = posterior(1, 0.0, 0.0)
    for p in range(2):
        x = x0[1, 0, 0, p].item()
        x0_hat = (xt[1, 0, 0, p].item() - math.sqrt(1 - abar[0]) * eps[1, 0, 0, p].item()) / math.sqrt(abar[0])
        mean = x0_hat  # at t = 0 the posterior mean is x0_hat itself
        frac = (v[1, 0, 0, p].item() + 1) / 2
        std = math.sqrt(math.exp(frac * math.log(betas[0]) + (1 - frac) * math.log(post1)))
        mass = norm.cdf((x + 1 / 255 - mean) / std) if x < 0 else 1 - norm.cdf((x - 1 / 255 - mean) / std)
        nlls.append(-math.log(mass))
    assert got[1].item() == pytest.approx(np.mean(nlls) / math.log(2), rel=5e-3)  # tanh CDF approximation (bins near the mean)


def test_vlb_is_zero_when_the_model_matches_the_posterior():
    scheduler = RespacedDDPMScheduler(num_train_timesteps=20, variance_type="learned_range")
    chain: GaussianChain = scheduler.train_chain
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([5, 10, 19])
    xt = scheduler.add_noise(x0, noise, t)
    # v = -1 selects the posterior (clipped) variance; ε = true noise gives the true mean
    got = vlb_term(scheduler, noise, -torch.ones_like(x0), x0, xt, t)
    assert torch.allclose(got, torch.zeros(3), atol=1e-5)
    assert len(chain) == 20


def test_hybrid_loss_weights_and_unknown_terms():
    loss = HybridDiffusionLoss(vlb_weight=0.5, term_weights={"l_amb": 0.1})
    pred = {"l_simple": torch.tensor([1.0, 2.0]), "l_vlb": torch.tensor([2.0, 0.0]), "l_amb": torch.tensor([10.0, 0.0])}
    assert torch.allclose(loss(pred), torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match="l_other"):
        loss({**pred, "l_other": torch.zeros(2)})
