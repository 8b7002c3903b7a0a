"""Flow matching (rectified flow) in the one diffusion core: the objective, the solvers and their oracle test.

- the interpolation, the velocity target and the conversions on hand-computed values, through the one
  training inferer; the same convention as MONAI's ``RFlowScheduler`` (interpolation, sign, Euler step);
- the rater-posterior velocity target E[x_0 - ε | x_t, raters] by hand;
- the solvers' order on a Gaussian whose ODE solution is known, and the oracle test of
  ``test_sampler_oracle.py``: fed the exact velocity of a known 5-mode mask distribution, Euler and Heun at the
  flow-matching overlays' step counts (and Euler–Maruyama) draw every mode with its probability;
- clear errors for bad settings.
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.schedulers import RFlowScheduler
from monai.networks.schedulers.rectified_flow import timestep_transform
from test_sampler_oracle import NUM_SAMPLES, TV_TOLERANCE, assert_reproduces, draw, mode_frequencies, truth  # noqa: F401

from ambiseg_monai.diffusion import (
    DiffusionParameterization,
    LearnedVarianceScheduler,
    LossWeighting,
    SamplingScheduler,
    TrainingScheduler,
    interpolation_variances,
)
from ambiseg_monai.diffusion.oracle import MixtureOracleDenoiser
from ambiseg_monai.diffusion.sampler import make_generators, reverse_diffusion
from ambiseg_monai.inferers import DiffusionSamplingInferer, DiffusionTrainingInferer
from ambiseg_monai.schedulers import RectifiedFlowHeunScheduler, RectifiedFlowScheduler, RectifiedFlowSDEScheduler

SOLVERS = (RectifiedFlowScheduler, RectifiedFlowHeunScheduler, RectifiedFlowSDEScheduler)


class _Zero(torch.nn.Module):
    """A network of the training protocol that outputs 0: l_simple is then the mean squared target."""

    def forward(self, x_t, timesteps, class_labels=None, image=None, target=None):
        return torch.zeros_like(x_t)


def _fixed_draws(monkeypatch, scheduler, t: float, noise: torch.Tensor) -> None:
    """Make the training inferer draw time ``t`` (in [0, 1]) and the noise ``noise``."""
    times = torch.tensor([t * scheduler.time_scale])
    monkeypatch.setattr(scheduler, "sample_timesteps", lambda batch, device=None, stratified=False: times.expand(batch))
    monkeypatch.setattr(torch, "randn_like", lambda like: noise.clone())


# ------------------------------------------------------------------------------------------ the objective
def test_interpolation_and_velocity_target_by_hand(monkeypatch):
    # one image, two pixels: mask [1, 0] -> x_0 = [1, -1]; ε = [0.5, 2]; t = 0.25 (network time 250)
    scheduler = RectifiedFlowScheduler(time_scale=1000)
    x0, noise = torch.tensor([[[[1.0, -1.0]]]]), torch.tensor([[[[0.5, 2.0]]]])
    x_t = scheduler.add_noise(x0, noise, torch.tensor([250.0]))
    torch.testing.assert_close(x_t, torch.tensor([[[[0.875, -0.25]]]]))  # 0.75 x_0 + 0.25 ε
    torch.testing.assert_close(
        scheduler.get_velocity(x0, noise, torch.tensor([250.0])), torch.tensor([[[[0.5, -3.0]]]])
    )
    # the conversions: x_0 = x_t + t u, ε = x_t - (1 - t) u
    u = torch.tensor([[[[0.5, -3.0]]]])
    x0_hat, eps_hat = scheduler.predict(u, x_t, torch.tensor([250.0]))
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)
    # the same numbers through the one training inferer: l_simple of a zero network = mean(u²) = (0.25 + 9) / 2
    _fixed_draws(monkeypatch, scheduler, 0.25, noise)
    terms = DiffusionTrainingInferer(scheduler)(torch.zeros(1, 1, 1, 2), _Zero(), target=torch.tensor([[[[1.0, 0.0]]]]))
    torch.testing.assert_close(terms["x_t"], torch.tensor([[[[0.875, -0.25]]]]))
    assert terms["timesteps"].tolist() == [250.0]
    assert terms["l_simple"].item() == pytest.approx(4.625)
    assert set(terms) == {"l_simple", "model_output", "x_t", "noise", "timesteps"}  # no l_vlb: no learned variance


def test_x_prediction_and_loss_weighting_under_flow(monkeypatch):
    # x-prediction regresses x_0; the x-space weighting w(λ) uses the flow's log-SNR 2 log((1 - t) / t)
    scheduler = RectifiedFlowScheduler(prediction_type="x")
    x0, noise = torch.tensor([[[[1.0, -1.0]]]]), torch.tensor([[[[0.5, 2.0]]]])
    _fixed_draws(monkeypatch, scheduler, 0.25, noise)
    target = torch.tensor([[[[1.0, 0.0]]]])
    assert DiffusionTrainingInferer(scheduler)(x0, _Zero(), target=target)["l_simple"].item() == pytest.approx(1.0)
    assert scheduler.logsnr(torch.tensor([0.25])).item() == pytest.approx(2 * math.log(3))
    weighted = DiffusionTrainingInferer(scheduler, weighting=LossWeighting("uniform"))(x0, _Zero(), target=target)
    assert weighted["l_simple"].item() == pytest.approx(1.0)
    snr = DiffusionTrainingInferer(scheduler, weighting=LossWeighting("snr"))(x0, _Zero(), target=target)
    assert snr["loss_weights"].item() == pytest.approx(9.0)  # ((1 - t) / t)²


def test_rater_posterior_velocity_target_by_hand(monkeypatch):
    # one pixel, raters 1 and 0 (x_0 = ±1); the training target 0 (x_0 = -1), ε = 1.4, t = 0.5: x_t = 0.2.
    # E[x_0 | x_t, raters] = tanh(α x_t / σ²) = tanh(0.4); E[ε | x_t, raters] = (x_t - α E[x_0]) / σ; the
    # velocity target is their difference
    scheduler = RectifiedFlowScheduler()
    _fixed_draws(monkeypatch, scheduler, 0.5, torch.tensor([[[[1.4]]]]))
    kwargs = {"raters": torch.tensor([[[[1.0]], [[0.0]]]]), "rater_mask": torch.tensor([[True, True]])}
    inferer = DiffusionTrainingInferer(scheduler, rater_posterior_targets=True)
    terms = inferer(torch.zeros(1, 1, 1, 1), _Zero(), target=torch.zeros(1, 1, 1, 1), **kwargs)
    assert terms["x_t"].item() == pytest.approx(0.2)
    x0_mean = math.tanh(0.5 * 0.2 / 0.25)
    u = x0_mean - (0.2 - 0.5 * x0_mean) / 0.5
    assert terms["l_simple"].item() == pytest.approx(u**2, rel=1e-5)
    # (α², σ²) of the flow come from its coefficients: σ² = t², not 1 - α²
    signal, variance = interpolation_variances(scheduler, torch.tensor([0.5, 0.25]))
    assert signal.tolist() == [0.25, 0.5625] and variance.tolist() == [0.25, 0.0625]


def test_same_convention_as_monai_rflow_scheduler():
    monai = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=True)
    ours = RectifiedFlowScheduler(time_scale=1000, num_inference_steps=10)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 4, 4, generator=generator), torch.randn(3, 1, 4, 4, generator=generator)
    steps = torch.tensor([0, 370, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, steps.float()), monai.add_noise(x0, noise, steps))
    # MONAI's velocity target is x_0 - ε (its docstring's loss(predicted, inputs - noise)), like ours
    torch.testing.assert_close(ours.get_velocity(x0, noise, steps), x0 - noise)
    # an Euler step on the integer grid 1000, 900, ..., 100 (where MONAI's int(next_timestep) is exact)
    monai.set_timesteps(10)
    assert monai.timesteps.tolist() == ours.timesteps.tolist()
    x, velocity = torch.randn(3, 1, 4, 4, generator=generator), torch.randn(3, 1, 4, 4, generator=generator)
    expected, expected_x0 = monai.step(velocity, 700, x, 600)
    got, got_x0 = ours.step(velocity, 700.0, x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_x0, expected_x0)
    # the shift is MONAI's timestep_transform with a fixed ratio
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = RectifiedFlowScheduler(shift=3.0).shifted(t)
    torch.testing.assert_close(shifted, 3 * t / (1 + 2 * t))
    torch.testing.assert_close(shifted, timestep_transform(t * 1000, 1, 1, scale=3.0, spatial_dim=1) / 1000)


def test_training_times_uniform_logit_normal_stratified_and_shifted():
    torch.manual_seed(0)
    uniform = RectifiedFlowScheduler(time_scale=1000, t_min=0.0).sample_timesteps(10, stratified=True)
    assert sorted((uniform // 100).long().tolist()) == list(range(10))  # one per stratum, network units
    logit_normal = RectifiedFlowScheduler(
        time_distribution="logit_normal", logit_normal_loc=0.5, logit_normal_scale=0.8
    )
    t = logit_normal.sample_timesteps(20000, stratified=True).double()
    assert 1e-4 <= float(t.min()) and float(t.max()) < 1.0
    logits = torch.logit(t)
    assert float(logits.mean()) == pytest.approx(0.5, abs=0.02) and float(logits.std()) == pytest.approx(0.8, abs=0.02)
    shifted = RectifiedFlowScheduler(shift=10.0, t_min=0.0).sample_timesteps(20000).double()
    # P(shifted t < 0.5) = P(u < 1 / 11) for t' = 10 u / (1 + 9 u)
    assert float((shifted < 0.5).double().mean()) == pytest.approx(1 / 11, abs=0.01)


# ------------------------------------------------------------------------------------------ the protocol
@pytest.mark.parametrize("scheduler_class", SOLVERS)
def test_flow_schedulers_follow_the_protocol(scheduler_class):
    scheduler = scheduler_class(time_scale=1000)
    assert isinstance(scheduler, SamplingScheduler) and isinstance(scheduler, TrainingScheduler)
    assert not isinstance(scheduler, LearnedVarianceScheduler)
    t = scheduler.sample_timesteps(5, stratified=True)
    x0 = torch.ones(5, 1, 2, 2)
    alpha, sigma = scheduler.coefficients(t, x0)
    torch.testing.assert_close(alpha + sigma, torch.ones_like(alpha))  # linear interpolation, not variance preserving
    torch.testing.assert_close(alpha**2, scheduler.signal_variance(t).float().reshape(-1, 1, 1, 1))
    torch.testing.assert_close(scheduler.add_noise(x0, torch.zeros_like(x0), t), alpha * x0)


def test_solver_grids():
    euler = RectifiedFlowScheduler(num_inference_steps=4)
    assert euler.timesteps.tolist() == [1.0, 0.75, 0.5, 0.25]
    heun = RectifiedFlowHeunScheduler(num_inference_steps=4, time_scale=1000)
    assert heun.timesteps.tolist() == [1000.0, 750.0, 750.0, 500.0, 500.0, 250.0, 250.0]  # 2K - 1 calls
    shifted = RectifiedFlowScheduler(num_inference_steps=2, shift=3.0)
    assert shifted.timesteps.tolist() == pytest.approx([1.0, 0.75])  # 3 * 0.5 / (1 + 2 * 0.5)


def _gaussian_velocity(scale: float, time_scale: float = 1.0):
    """The exact flow velocity when x_0 ~ N(0, scale²): E[x_0 - ε | x_t] = ((1 - t) scale² - t) x_t / v(t)."""

    def network(x, timesteps, cond=None, class_labels=None):
        t = timesteps.double().reshape(-1, 1, 1, 1) / time_scale
        variance = (1 - t) ** 2 * scale**2 + t**2
        return (((1 - t) * scale**2 - t) / variance * x.double()).to(x.dtype)

    return network


def _ode_error(scheduler_class, steps: int) -> float:
    # the flow ODE maps x_1 = z to x_0 = scale * z exactly (x_t = z sqrt(v(t)) along the path)
    scale = 0.5
    generators = make_generators(0, [0], 64)
    x0 = reverse_diffusion(
        _gaussian_velocity(scale), scheduler_class(), None, (1, 1, 1), generators, num_inference_steps=steps,
        reference=torch.zeros((), dtype=torch.float64),
    )  # fmt: skip
    z = torch.stack([torch.randn((1, 1, 1), generator=g) for g in make_generators(0, [0], 64)]).double()
    return float((x0 - scale * z).abs().max())


def test_euler_is_first_and_heun_second_order():
    euler = [_ode_error(RectifiedFlowScheduler, k) for k in (10, 20, 40)]
    heun = [_ode_error(RectifiedFlowHeunScheduler, k) for k in (10, 20, 40)]
    assert 1.7 < euler[0] / euler[1] < 2.3 and 1.7 < euler[1] / euler[2] < 2.3
    assert 3.3 < heun[0] / heun[1] < 4.7 and 3.3 < heun[1] / heun[2] < 4.7
    assert heun[0] < euler[0] / 5
    # the SDE solver with η = 0 is the Euler ODE
    assert _ode_error(lambda: RectifiedFlowSDEScheduler(noise_scale=0.0), 10) == pytest.approx(euler[0], rel=1e-12)


def test_heun_state_survives_an_interrupted_chain():
    # a chain stopped after a predictor leaves state behind; the next chain (from t = 1) must not use it
    network, generators = _gaussian_velocity(0.5), make_generators(0, [0], 4)
    fresh = reverse_diffusion(network, RectifiedFlowHeunScheduler(), None, (1, 1, 1), generators, num_inference_steps=5)
    scheduler = RectifiedFlowHeunScheduler(num_inference_steps=5)
    x = torch.randn(4, 1, 1, 1)
    scheduler.step(network(x, scheduler.timesteps[:1].expand(4)), scheduler.timesteps[0], x)  # predictor, then stop
    again = reverse_diffusion(network, scheduler, None, (1, 1, 1), make_generators(0, [0], 4))
    torch.testing.assert_close(again, fresh)


# ------------------------------------------------------------------------------------------ the oracle test
@pytest.mark.parametrize(
    "scheduler_class, steps, shift",
    [
        (RectifiedFlowScheduler, 25, 1.0),  # CIMD's flow overlay: validation (25) and evaluation / inference (50)
        (RectifiedFlowScheduler, 50, 1.0),
        (RectifiedFlowHeunScheduler, 25, 1.0),
        (RectifiedFlowScheduler, 10, 10.0),  # AmbDiffSeg's flow overlay: 10 steps, shift 10
        (RectifiedFlowHeunScheduler, 10, 10.0),
    ],
)
def test_flow_solvers_reproduce_the_distribution(truth, scheduler_class, steps, shift):  # noqa: F811
    assert_reproduces(draw(scheduler_class(shift=shift, time_scale=1000), steps, *truth), *truth)


def test_x_prediction_and_the_sde_solver_reproduce_the_distribution(truth):  # noqa: F811
    assert_reproduces(draw(RectifiedFlowScheduler(prediction_type="x"), 25, *truth), *truth)
    assert_reproduces(draw(RectifiedFlowSDEScheduler(noise_scale=1.0), 50, *truth), *truth)


def test_few_euler_steps_without_shift_under_draw_the_empty_mask(truth):  # noqa: F811
    # 5 Euler steps on the unshifted grid decide the lobes too early; the shift (like AmbDiffSeg's input
    # scaling) moves the grid to the noisy end, and Heun's second order fixes most of it at the same grid
    modes, probabilities = truth
    plain, _ = mode_frequencies(draw(RectifiedFlowScheduler(), 5, *truth), modes)
    shifted, _ = mode_frequencies(draw(RectifiedFlowScheduler(shift=10.0), 5, *truth), modes)
    assert 0.5 * float((plain - probabilities).abs().sum()) > 2 * TV_TOLERANCE
    assert 0.5 * float((shifted - probabilities).abs().sum()) < 0.5 * float((plain - probabilities).abs().sum())
    assert NUM_SAMPLES == 1000


def test_learned_variance_output_is_ignored_when_sampling(truth):  # noqa: F811
    # a CIMD network that still has its variance channel samples like one without it
    modes, probabilities = truth
    scheduler = RectifiedFlowScheduler()
    oracle = MixtureOracleDenoiser.for_scheduler(scheduler, modes, probabilities)
    with_variance = MixtureOracleDenoiser.for_scheduler(scheduler, modes, probabilities, variance_value=0.3)
    inferer = DiffusionSamplingInferer(scheduler, num_samples=8, num_inference_steps=5, seed=0)
    image = torch.zeros(1, 1, *modes.shape[-2:])
    assert torch.equal(inferer(image, oracle, image_ids=["a"]), inferer(image, with_variance, image_ids=["a"]))


# ------------------------------------------------------------------------------------------ bad settings
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_inference_steps": 0}, "num_inference_steps must be >= 1"),
        ({"prediction_type": "eps"}, "velocity .'flow'. or x_0"),
        ({"prediction_type": "v"}, "variance-preserving velocity"),
        ({"time_scale": 0}, "time_scale must be positive"),
        ({"shift": -1.0}, "shift must be positive"),
        ({"time_distribution": "beta"}, "time_distribution must be one of"),
        ({"logit_normal_scale": 0.0}, "logit_normal_scale must be positive"),
        ({"t_min": 1.0}, r"t_min must lie in \[0, 1\)"),
    ],
)
def test_bad_settings_fail_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RectifiedFlowScheduler(**kwargs)


def test_bad_sampling_calls_fail_with_a_clear_message():
    scheduler = RectifiedFlowScheduler(num_inference_steps=4)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        scheduler.set_timesteps(0)
    oracle = MixtureOracleDenoiser.for_scheduler(scheduler, torch.ones(1, 1, 2, 2), torch.ones(1))
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        DiffusionSamplingInferer(scheduler, num_inference_steps=0)(torch.zeros(1, 1, 2, 2), oracle)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="not on the sampling grid"):
        scheduler.step(torch.zeros_like(x), 0.6, x)
    with pytest.raises(ValueError, match="model output has 3 channels"):
        scheduler.step(torch.zeros(1, 3, 2, 2), 1.0, x)
    with pytest.raises(ValueError, match="noise_scale must be >= 0"):
        RectifiedFlowSDEScheduler(noise_scale=-0.1)
    # training a learned-variance network with the VLB on a flow scheduler: the inferer names the problem
    two_channels = torch.nn.Conv2d(1, 2, 1)
    with pytest.raises(ValueError, match="has no learned variance"):
        DiffusionTrainingInferer(scheduler)(
            x, lambda x_t, t, class_labels=None, image=None, target=None: two_channels(x_t), target=x
        )
    assert DiffusionParameterization("flow").target(torch.ones(1), torch.zeros(1), 0.5, 0.5).item() == 1.0
