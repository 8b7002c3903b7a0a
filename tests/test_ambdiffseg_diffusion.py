"""AmbDiffSeg's continuous-time diffusion: schedule, parameterisations, loss weightings, samplers, training pass."""

from __future__ import annotations

import math

import pytest
import torch

from ambiseg_monai.diffusion.parameterization import (
    DiffusionParameterization,
    eps_from_v,
    eps_from_x0,
    velocity,
    x0_from_eps,
    x0_from_v,
)
from ambiseg_monai.diffusion.protocols import sample_training_times
from ambiseg_monai.diffusion.sampler import make_generators, reverse_diffusion
from ambiseg_monai.diffusion.weighting import LossWeighting, loss_weight
from ambiseg_monai.inferers import DiffusionTrainingInferer
from ambiseg_monai.optimizers.lr_scheduler import WarmupConstantCosine
from ambiseg_monai.schedulers.continuous import ContinuousDDIMScheduler, ContinuousDDPMScheduler, ContinuousVPSchedule
from ambiseg_monai.transforms import RelativeAreaFilterd, relative_area_filter

TIMES = torch.tensor([0.1, 0.25, 0.5, 0.8, 0.95], dtype=torch.float64)


# ------------------------------------------------------------------------------------------ schedule
def test_input_scaled_gamma_matches_closed_form():
    schedule = ContinuousVPSchedule("cosine", input_scale=0.1, logsnr_min=None, logsnr_max=None)
    gamma = torch.cos(TIMES * math.pi / 2) ** 2
    expected = 0.01 * gamma / ((0.01 - 1.0) * gamma + 1.0)
    torch.testing.assert_close(schedule.gamma(TIMES), expected, rtol=1e-12, atol=0)
    # hand value at t = 1/2: γ = 1/2, γ_b = 0.005 / 0.505
    assert float(schedule.gamma(0.5)) == pytest.approx(0.005 / 0.505, rel=1e-12)


def test_input_scaling_multiplies_snr_by_b_squared():
    plain = ContinuousVPSchedule(input_scale=1.0, logsnr_min=None, logsnr_max=None)
    for b in (0.1, 0.5):
        scaled = ContinuousVPSchedule(input_scale=b, logsnr_min=None, logsnr_max=None)
        ratio = scaled.snr(TIMES) / plain.snr(TIMES)
        torch.testing.assert_close(ratio, torch.full_like(TIMES, b * b), rtol=1e-10, atol=0)
    # b = 1 is the plain cosine schedule; SNR(1/2) = 1 there
    torch.testing.assert_close(plain.gamma(TIMES), torch.cos(TIMES * math.pi / 2) ** 2, rtol=1e-12, atol=0)
    assert float(plain.snr(0.5)) == pytest.approx(1.0, rel=1e-12)


def test_logsnr_clipping_fixes_the_end_points_and_barely_moves_the_interior():
    clipped = ContinuousVPSchedule(input_scale=0.1, logsnr_min=-20.0, logsnr_max=20.0)
    free = ContinuousVPSchedule(input_scale=0.1, logsnr_min=None, logsnr_max=None)
    assert float(clipped.logsnr(0.0)) == pytest.approx(20.0, abs=1e-6)  # 1 - γ(0) ≈ 2e-9 limits float64
    assert float(clipped.logsnr(1.0)) == pytest.approx(-20.0, abs=1e-6)
    torch.testing.assert_close(clipped.logsnr(TIMES), free.logsnr(TIMES), rtol=0, atol=1e-4)
    # variance preserving everywhere, and α, σ > 0 at both ends
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(clipped.alpha(t) ** 2 + clipped.sigma(t) ** 2, torch.ones_like(t))
    assert bool((clipped.alpha(t) > 0).all()) and bool((clipped.sigma(t) > 0).all())


def test_dlogsnr_dt_matches_closed_form():
    # unclipped cosine: logSNR = 2 log b + 2 log cot(πt/2)  =>  dlogSNR/dt = -2π / sin(πt)
    schedule = ContinuousVPSchedule(input_scale=0.1, logsnr_min=None, logsnr_max=None)
    expected = -2 * math.pi / torch.sin(math.pi * TIMES)
    torch.testing.assert_close(schedule.dlogsnr_dt(TIMES), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_scale": 0.0}, "input_scale"),
        ({"input_scale": 1.5}, "input_scale"),
        ({"schedule": "quadratic"}, "schedule must be one of"),
        ({"logsnr_min": None}, "both logsnr_min and logsnr_max"),
        ({"logsnr_min": 5.0, "logsnr_max": 1.0}, "below logsnr_max"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContinuousVPSchedule(**kwargs)


# ------------------------------------------------------------------------------------------ parameterisation
def _vp_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(3, 1, 4, 4, generator=g)
    alpha = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64).reshape(3, 1, 1, 1)
    sigma = (1 - alpha**2).sqrt()
    x0, eps = x0.double(), eps.double()
    return x0, eps, alpha, sigma, alpha * x0 + sigma * eps


def test_conversions_round_trip():
    x0, eps, alpha, sigma, x_t = _vp_case()
    v = velocity(x0, eps, alpha, sigma)
    torch.testing.assert_close(x0_from_eps(x_t, eps, alpha, sigma), x0)
    torch.testing.assert_close(eps_from_x0(x_t, x0, alpha, sigma), eps)
    torch.testing.assert_close(x0_from_v(x_t, v, alpha, sigma), x0)
    torch.testing.assert_close(eps_from_v(x_t, v, alpha, sigma), eps)
    # hand value: α = 0.6, σ = 0.8, x0 = 1, ε = 0.5 -> v = 0.3 - 0.8 = -0.5
    one = torch.ones(1)
    assert float(velocity(one, 0.5 * one, 0.6, 0.8)) == pytest.approx(-0.5)


@pytest.mark.parametrize("prediction_type", ["x", "v", "eps", "epsilon", "sample", "v_prediction"])
def test_parameterization_predicts_x0_and_eps_from_its_own_target(prediction_type):
    x0, eps, alpha, sigma, x_t = _vp_case(1)
    param = DiffusionParameterization(prediction_type, tanh_x_output=False)
    pred_x0, pred_eps = param.predict(param.target(x0, eps, alpha, sigma), x_t, alpha, sigma)
    torch.testing.assert_close(pred_x0, x0)
    torch.testing.assert_close(pred_eps, eps)


def test_tanh_output_applies_to_x_prediction_only():
    x0, eps, alpha, sigma, x_t = _vp_case(2)
    raw = torch.tensor([-3.0, 0.0, 0.5, 10.0], dtype=torch.float64).reshape(1, 1, 2, 2).expand(3, 1, 2, 2)
    x_param = DiffusionParameterization("x", tanh_x_output=True)
    assert x_param.uses_tanh
    pred_x0, _ = x_param.predict(raw, x_t[:, :, :2, :2], alpha, sigma)
    torch.testing.assert_close(pred_x0, torch.tanh(raw))
    assert float(pred_x0.abs().max()) < 1.0
    v_param = DiffusionParameterization("v", tanh_x_output=True)
    assert not v_param.uses_tanh
    x_t = x_t[:, :, :2, :2]
    torch.testing.assert_close(v_param.predict(raw, x_t, alpha, sigma)[0], alpha * x_t - sigma * raw)


def test_parameterization_rejects_unknown_type():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DiffusionParameterization("score")


# ------------------------------------------------------------------------------------------ loss weightings
LOGSNR = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("snr", [math.exp(-2), 1.0, math.exp(1.5)]),
        ("truncated_snr", [1.0, 1.0, math.exp(1.5)]),
        ("SNR_trunc", [1.0, 1.0, math.exp(1.5)]),
        ("snr_plus_one", [1 + math.exp(-2), 2.0, 1 + math.exp(1.5)]),
        ("uniform", [1.0, 1.0, 1.0]),
        ("sigmoid", [1 / (1 + math.exp(-4)), 1 / (1 + math.exp(-6)), 1 / (1 + math.exp(-7.5))]),
    ],
)
def test_loss_weights_hand_values(name, expected):
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(loss_weight(LOGSNR, name, sigmoid_bias=-6.0), expected)


def test_sigmoid_bias_sign_and_dlogsnr_factor():
    # bias 2 -> sigmoid(λ - 2): at λ = 2 the weight is 1/2
    assert float(loss_weight(torch.tensor(2.0), "sigmoid", sigmoid_bias=2.0)) == pytest.approx(0.5)
    # unclipped plain cosine at t = 1/2: λ = 0 (truncated weight 1) and -dλ/dt = 2π
    schedule = ContinuousVPSchedule(input_scale=1.0, logsnr_min=None, logsnr_max=None)
    t = torch.tensor([0.5], dtype=torch.float64)
    assert float(LossWeighting("truncated_snr")(t, schedule)) == pytest.approx(1.0)
    assert float(LossWeighting("truncated_snr", times_neg_dlogsnr_dt=True)(t, schedule)) == pytest.approx(2 * math.pi)
    with pytest.raises(ValueError, match="loss weighting must be one of"):
        LossWeighting("elbo")


# ------------------------------------------------------------------------------------------ samplers
def _oracle(x0_rows: torch.Tensor, scheduler):
    """A perfect denoiser: outputs exactly what the scheduler's parameterisation expects for x0_rows."""

    def network(x_t, timesteps, cond=None, class_labels=None):
        t = timesteps.double()
        alpha = scheduler.schedule.alpha(t).reshape(-1, 1, 1, 1)
        sigma = scheduler.schedule.sigma(t).reshape(-1, 1, 1, 1)
        eps = eps_from_x0(x_t.double(), x0_rows.double(), alpha, sigma)
        return scheduler.parameterization.target(x0_rows.double(), eps, alpha, sigma).to(x_t.dtype)

    return network


def _clean_masks() -> torch.Tensor:
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, 2:6, 3:7] = 1
    mask[1, 0, 1:3, 1:3] = 1
    return mask * 2 - 1


@pytest.mark.parametrize("scheduler_class", [ContinuousDDIMScheduler, ContinuousDDPMScheduler])
@pytest.mark.parametrize("prediction_type", ["x", "v", "eps"])
def test_ten_steps_with_a_perfect_predictor_return_the_clean_mask(scheduler_class, prediction_type):
    scheduler = scheduler_class(prediction_type=prediction_type, tanh_x_output=False)
    assert scheduler.num_inference_steps == 10
    x0 = _clean_masks()
    out = reverse_diffusion(_oracle(x0, scheduler), scheduler, None, (1, 8, 8), make_generators(0, [0, 1], 1))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert torch.equal((out > 0).float(), (x0 > 0).float())


def test_timestep_grid_and_step_validation():
    scheduler = ContinuousDDIMScheduler()
    torch.testing.assert_close(scheduler.timesteps, torch.arange(10, 0, -1).float() / 10)
    scheduler.set_timesteps(4)
    assert scheduler.step_times(scheduler.timesteps[1]) == (0.75, 0.5)
    assert scheduler.step_times(0.25) == (0.25, 0.0)
    with pytest.raises(ValueError, match="not on the sampling grid"):
        scheduler.step_times(0.6)
    with pytest.raises(ValueError, match="no learned variance"):
        scheduler.step(torch.zeros(1, 2, 4, 4), 1.0, torch.zeros(1, 1, 4, 4))


def test_ddim_step_keeps_the_noise_direction_and_last_step_clamps():
    scheduler = ContinuousDDIMScheduler(prediction_type="x", tanh_x_output=False)
    scheduler.set_timesteps(2)
    sample = torch.full((1, 1, 2, 2), 0.3)
    x0_hat = torch.full((1, 1, 2, 2), 0.5)
    s = scheduler.schedule
    eps = (0.3 - float(s.alpha(1.0)) * 0.5) / float(s.sigma(1.0))
    prev, pred = scheduler.step(x0_hat, 1.0, sample)
    torch.testing.assert_close(prev, torch.full_like(sample, float(s.alpha(0.5)) * 0.5 + float(s.sigma(0.5)) * eps))
    last, _ = scheduler.step(torch.full((1, 1, 2, 2), 3.0), 0.5, sample)
    torch.testing.assert_close(last, torch.ones_like(sample))  # x̂_0 clamped to [-1, 1]


@pytest.mark.parametrize("variance_type", ["large", "small"])
def test_ddpm_posterior_is_vdm_closed_form(variance_type):
    scheduler = ContinuousDDPMScheduler(variance_type=variance_type)
    s_, t_ = 0.4, 0.5
    sch = scheduler.schedule
    a_t, a_s = float(sch.alpha(t_)), float(sch.alpha(s_))
    v_t, v_s = float(sch.sigma(t_)) ** 2, float(sch.sigma(s_)) ** 2
    coef_xt, coef_x0, std = scheduler.posterior_coefficients(t_, s_)
    r = (a_t**2 / v_t) / (a_s**2 / v_s)
    assert coef_xt == pytest.approx(a_t * v_s / (a_s * v_t), rel=1e-9)
    assert coef_x0 == pytest.approx(a_s * (1 - r), rel=1e-9)
    assert std**2 == pytest.approx((1 - r) * (v_t if variance_type == "large" else v_s), rel=1e-9)
    # the true ("small") posterior maps q(x_t | x0) onto q(x_s | x0)
    assert coef_xt * a_t + coef_x0 == pytest.approx(a_s, rel=1e-9)
    if variance_type == "small":
        assert coef_xt**2 * v_t + std**2 == pytest.approx(v_s, rel=1e-9)


def test_ddpm_uses_the_given_noise():
    scheduler = ContinuousDDPMScheduler(prediction_type="x", tanh_x_output=False)
    sample, x0 = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    a, _ = scheduler.step(x0, 1.0, sample, noise=torch.ones(1, 1, 2, 2))
    b, _ = scheduler.step(x0, 1.0, sample, noise=-torch.ones(1, 1, 2, 2))
    _, _, std = scheduler.posterior_coefficients(1.0, 0.9)
    torch.testing.assert_close(a, torch.full_like(a, std))
    torch.testing.assert_close(b, -a)


def test_add_noise_and_velocity_use_per_row_times():
    scheduler = ContinuousDDIMScheduler()
    x0, noise = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    t = torch.tensor([0.0, 0.5])
    x_t = scheduler.add_noise(x0, noise, t)
    for row in range(2):
        a, s = float(scheduler.schedule.alpha(t[row])), float(scheduler.schedule.sigma(t[row]))
        torch.testing.assert_close(x_t[row], torch.full((1, 2, 2), a + 2 * s))
        torch.testing.assert_close(scheduler.get_velocity(x0, noise, t)[row], torch.full((1, 2, 2), 2 * a - s))
    with pytest.raises(ValueError, match="timesteps for a batch"):
        scheduler.add_noise(x0, noise, torch.zeros(3))


# ------------------------------------------------------------------------------------------ post-processing
def test_relative_area_post_processing_rule():
    areas = [150, 74, 75, 0]
    preds = torch.zeros(1, 4, 20, 20)
    for n, area in enumerate(areas):
        preds[0, n].view(-1)[:area] = 1
    kept = relative_area_filter(preds, r=0.5).flatten(2).sum(-1)[0].tolist()
    assert kept == [150, 0, 75, 0]  # 74 < 0.5 * 150 <= 75
    assert relative_area_filter(preds, r=0.0).flatten(2).sum(-1)[0].tolist() == areas
    # as the bundles' post-transform on one image's N x H x W samples
    out = RelativeAreaFilterd(keys="pred", r=0.5)({"pred": preds[0]})["pred"]
    assert out.flatten(1).sum(-1).tolist() == [150, 0, 75, 0]


# ------------------------------------------------------------------------------------------ training pass
class _TinyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x_t, timesteps, cond=None, class_labels=None, image=None, target=None):
        assert timesteps.is_floating_point() and bool(((timesteps >= 0) & (timesteps < 1)).all())
        return self.conv(torch.cat([image, x_t], 1)) + timesteps.reshape(-1, 1, 1, 1)


def test_training_inferer_returns_weighted_x_space_loss():
    torch.manual_seed(0)
    scheduler = ContinuousDDIMScheduler(prediction_type="x", tanh_x_output=True)
    inferer = DiffusionTrainingInferer(scheduler, weighting=LossWeighting("truncated_snr"), stratified_times=True)
    network = _TinyDenoiser()
    image, target = torch.randn(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
    out = inferer(image, network, target=target)
    x0 = target * 2 - 1
    t = out["timesteps"]
    torch.testing.assert_close(out["x_t"], scheduler.add_noise(x0, out["noise"], t))
    torch.testing.assert_close(out["pred_x0"], torch.tanh(out["model_output"]))
    weights = torch.exp(scheduler.schedule.logsnr(t).clamp(min=0)).float()
    torch.testing.assert_close(out["l_simple"], weights * ((out["pred_x0"] - x0) ** 2).mean((1, 2, 3)))
    out["l_simple"].mean().backward()
    assert network.conv.weight.grad is not None and float(network.conv.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="needs `target`"):
        inferer(image, network)
    with pytest.raises(TypeError, match="TrainingScheduler protocol"):
        DiffusionTrainingInferer(object(), weighting=LossWeighting("truncated_snr"))


def test_stratified_training_times_cover_every_stratum():
    torch.manual_seed(1)
    t = sample_training_times(8)
    assert sorted(int(v) for v in (t * 8).floor()) == list(range(8))
    assert bool(((t >= 0) & (t < 1)).all())


def test_warmup_constant_cosine_factors():
    schedule = WarmupConstantCosine(warmup_steps=10, decay_steps=20, total_steps=100)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(50) == pytest.approx(1.0)
    assert schedule(80) == pytest.approx(1.0)
    assert schedule(90) == pytest.approx(0.5)
    assert schedule(100) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="exceed total_steps"):
        WarmupConstantCosine(10, 95, 100)


# ------------------------------------------------------------------------------------------ with the shared inferer
class _MaskOracle(torch.nn.Module):
    """A denoiser whose condition is the clean mask itself: outputs the exact x_0 (tanh off)."""

    def encode_condition(self, image):
        return image

    def forward(self, x_t, timesteps, cond=None, class_labels=None):
        assert timesteps.is_floating_point() and float(timesteps.max()) <= 1.0
        return cond * 2 - 1


@pytest.mark.parametrize("scheduler_class", [ContinuousDDIMScheduler, ContinuousDDPMScheduler])
def test_sampling_inferer_with_a_perfect_denoiser_returns_the_mask_for_every_sample(scheduler_class):
    from ambiseg_monai.inferers import DiffusionSamplingInferer

    masks = (_clean_masks() > 0).float()  # B x 1 x H x W in {0, 1}
    inferer = DiffusionSamplingInferer(scheduler_class(tanh_x_output=False), num_samples=3, num_inference_steps=10)
    samples = inferer(masks, _MaskOracle(), image_ids=["a", "b"])
    assert samples.shape == (2, 3, 8, 8)
    assert torch.equal(samples, masks.expand(2, 3, 8, 8))


def test_continuous_time_denoiser_embeds_scaled_time():
    from ambiseg_monai.networks.ambdiffseg import ContinuousTimeDenoiser
    from ambiseg_monai.networks.denoisers import ConcatConditionedDenoiser

    torch.manual_seed(0)
    kwargs = dict(image_channels=1, channels=(8, 16), num_res_blocks=1, norm_num_groups=4, num_head_channels=8)
    continuous = ContinuousTimeDenoiser(time_scale=1000.0, **kwargs)
    with torch.no_grad():  # MONAI zero-initialises the output convolutions: randomise to see the time
        for param in continuous.parameters():
            param.normal_(0.0, 0.2)
    discrete = ConcatConditionedDenoiser(learn_variance=False, **kwargs)
    discrete.load_state_dict(continuous.state_dict())
    x_t, image, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([0.25, 0.5])
    out = continuous(x_t, t, image=image)
    assert out.shape == (2, 1, 8, 8)
    torch.testing.assert_close(out, discrete(x_t, t * 1000.0, image=image))
    assert not torch.allclose(out, continuous(x_t, torch.tensor([0.75, 0.9]), image=image))
    with pytest.raises(ValueError, match=r"times in \[0, 1\]"):
        continuous(x_t, torch.tensor([250.0, 500.0]), image=image)
    with pytest.raises(ValueError, match="no learned variance"):
        ContinuousTimeDenoiser(learn_variance=True, **kwargs)
