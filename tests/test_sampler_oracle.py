"""Every sampler reproduces a known mask distribution when the denoiser is exact (no training involved).

The data distribution is one demo image's true rater distribution (empty, core, core + lobes, with
their probabilities). :class:`~ambiseg_monai.diffusion.oracle.MixtureOracleDenoiser` computes the
exact E[x_0 | x_t] of that distribution, so whatever goes wrong here is the sampler's fault: a wrong
variance, a respacing error, a time-grid error, a level mix-up in consensus sampling.

Each test draws N masks through the real N-sample inferer at a bundle's step count and checks that
(a) every mask is exactly one of the true modes and (b) the modes' frequencies are within the
binomial error of their probabilities: total variation at most ``TV_TOLERANCE``. With N = 1000
draws of 5 modes the total variation of a perfect sampler is about 0.02 (3 sigma 0.04); a sampler
that over-draws a mode by 0.05 fails.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ambiseg_monai.data.demo import DemoConfig, make_demo_case
from ambiseg_monai.diffusion.oracle import MixtureOracleDenoiser
from ambiseg_monai.diffusion.parameterization import DiffusionParameterization
from ambiseg_monai.inferers.consensus import ConsensusSamplingInferer
from ambiseg_monai.inferers.diffusion import DiffusionSamplingInferer
from ambiseg_monai.schedulers.continuous import ContinuousDDIMScheduler, ContinuousDDPMScheduler, ContinuousVPSchedule
from ambiseg_monai.schedulers.respaced import RespacedDDIMScheduler, RespacedDDPMScheduler

NUM_SAMPLES = 1000
TV_TOLERANCE = 0.045


@pytest.fixture(scope="module")
def truth():
    """A 16 x 16 demo image whose lesion is faint and has two lobes: 5 modes, K x 1 x H x W and (K,)."""
    config = DemoConfig(image_size=16)
    for index in itertools.count():
        case = make_demo_case(np.random.default_rng([0, 2, index]), config)
        if len(case.modes) == 5:
            return torch.as_tensor(case.modes)[:, None].float(), torch.tensor(case.probabilities)


def mode_frequencies(samples: torch.Tensor, modes: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(frequency of each mode among N x H x W samples, fraction of samples equal to some mode)."""
    equal = (samples.bool()[:, None] == modes[:, 0].bool()[None]).flatten(2).all(2)  # N x K
    return equal.float().mean(0), float(equal.any(1).float().mean())


def assert_reproduces(samples: torch.Tensor, modes: torch.Tensor, probabilities: torch.Tensor) -> None:
    frequencies, exact = mode_frequencies(samples, modes)
    assert exact == 1.0, f"{1 - exact:.1%} of the samples are not one of the true masks"
    tv = 0.5 * float((frequencies - probabilities).abs().sum())
    assert tv <= TV_TOLERANCE, f"frequencies {frequencies.tolist()} vs {probabilities.tolist()} (TV {tv:.3f})"


def draw(scheduler, steps: int, modes, probabilities, variance_value=None) -> torch.Tensor:
    oracle = MixtureOracleDenoiser.for_scheduler(scheduler, modes, probabilities, variance_value=variance_value)
    inferer = DiffusionSamplingInferer(scheduler, num_samples=NUM_SAMPLES, num_inference_steps=steps, seed=0)
    return inferer(torch.zeros(1, 1, *modes.shape[-2:]), oracle, image_ids=["oracle"])[0]


CIMD_CHAIN = dict(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02,
                  prediction_type="epsilon", clip_sample=True)  # fmt: skip
CONSENSUS_CHAIN = dict(num_train_timesteps=100, schedule="linear_beta", beta_start=1e-3, beta_end=0.2,
                       prediction_type="epsilon", clip_sample=True)  # fmt: skip


@pytest.mark.parametrize("steps", [25, 50])
@pytest.mark.parametrize("variance_value", [-1.0, 1.0])
def test_respaced_ddpm_learned_range_reproduces_the_distribution(truth, steps, variance_value):
    # CIMD: 25 steps in validation, 50 in inference.json; both ends of the learned range
    scheduler = RespacedDDPMScheduler(variance_type="learned_range", **CIMD_CHAIN)
    assert_reproduces(draw(scheduler, steps, *truth, variance_value=variance_value), *truth)


def test_respaced_ddim_reproduces_the_distribution(truth):
    scheduler = RespacedDDIMScheduler(**CIMD_CHAIN)
    assert_reproduces(draw(scheduler, 25, *truth), *truth)


@pytest.mark.parametrize("prediction_type", ["x", "v", "eps"])
@pytest.mark.parametrize("scheduler_cls", [ContinuousDDPMScheduler, ContinuousDDIMScheduler])
def test_continuous_time_samplers_reproduce_the_distribution(truth, scheduler_cls, prediction_type):
    # AmbDiffSeg: 10 steps, cosine schedule with input scaling b = 0.1 (the bundle's defaults)
    scheduler = scheduler_cls(ContinuousVPSchedule("cosine", input_scale=0.1), DiffusionParameterization(prediction_type))
    assert_reproduces(draw(scheduler, 10, *truth), *truth)


def test_few_steps_without_input_scaling_bias_the_frequencies(truth):
    # the same sampler at 10 steps but b = 1: the first steps are too coarse for a 16 x 16 mask and
    # the empty mode is under-drawn (what the AmbDiffSeg bundle must avoid; see docs/benchmarks.md)
    scheduler = ContinuousDDIMScheduler(ContinuousVPSchedule("cosine", input_scale=1.0), DiffusionParameterization("x"))
    frequencies, _ = mode_frequencies(draw(scheduler, 10, *truth), truth[0])
    assert 0.5 * float((frequencies - truth[1]).abs().sum()) > TV_TOLERANCE


def consensus_distribution(modes: torch.Tensor, probabilities: torch.Tensor, raters: int):
    """The distribution of each consensus map M^c = 1[Σ_i A_i >= c] when R raters draw from the modes.

    Returns (L x K' x 1 x H x W distinct masks padded per level, L x K' probabilities).
    """
    per_level: list[dict[tuple, list]] = [dict() for _ in range(raters)]  # mask bits -> [mask, probability]
    for draws in itertools.product(range(len(modes)), repeat=raters):
        weight = float(torch.prod(probabilities[list(draws)]))
        votes = modes[list(draws)].sum(0)
        for level in range(raters):
            mask = (votes >= level + 1).float()
            entry = per_level[level].setdefault(tuple(mask.flatten().int().tolist()), [mask, 0.0])
            entry[1] += weight
    width = max(len(level) for level in per_level)
    masks = torch.zeros(raters, width, *modes.shape[1:])
    weights = torch.zeros(raters, width)
    for level, entries in enumerate(per_level):
        for k, (mask, weight) in enumerate(entries.values()):
            masks[level, k], weights[level, k] = mask, weight
    return masks, weights


def test_consensus_sampling_draws_each_level_from_its_own_distribution(truth):
    modes, probabilities = truth
    raters = 3
    level_modes, level_probabilities = consensus_distribution(modes, probabilities, raters)
    scheduler = RespacedDDPMScheduler(variance_type="learned_range", **CONSENSUS_CHAIN)
    oracle = MixtureOracleDenoiser.for_scheduler(scheduler, level_modes, level_probabilities, variance_value=0.0)
    inferer = ConsensusSamplingInferer(
        scheduler, num_levels=raters, num_generations=NUM_SAMPLES // 2, num_inference_steps=20, seed=0
    )
    samples = inferer(torch.zeros(1, 1, *modes.shape[-2:]), oracle, image_ids=["oracle"])["samples"][0]  # C x G x H x W
    for level in range(raters):
        real = level_probabilities[level] > 0
        frequencies, exact = mode_frequencies(samples[level], level_modes[level][real])
        assert exact == 1.0
        tv = 0.5 * float((frequencies - level_probabilities[level][real]).abs().sum())
        assert tv <= TV_TOLERANCE + 0.02, f"level {level + 1}: TV {tv:.3f}"  # N/2 draws per level


def test_oracle_posterior_mean_is_exact_on_a_two_mask_mixture():
    # two 1-pixel "masks" -1 and +1 with p = 0.25 / 0.75: E[x0 | x_t] = tanh(α x_t / σ² + atanh-offset)
    modes = torch.tensor([[[[-1.0]]], [[[1.0]]]])
    oracle = MixtureOracleDenoiser(modes, torch.tensor([0.25, 0.75]), lambda t: torch.full(t.shape, 0.36, dtype=torch.float64))
    x_t = torch.tensor([[[[0.3]]]], dtype=torch.float64)
    alpha, variance = 0.6, 0.64
    logit = np.log(0.75 / 0.25) + 2 * alpha * 0.3 / variance
    expected = (np.exp(logit) - 1) / (np.exp(logit) + 1)
    assert float(oracle.posterior_mean(x_t, torch.zeros(1))) == pytest.approx(expected, rel=1e-9)
    eps = float(oracle(x_t, torch.zeros(1), cond=x_t))
    assert eps == pytest.approx((0.3 - alpha * expected) / 0.8, rel=1e-9)
