"""The one diffusion core: the scheduler protocol, one training inferer and one N-sample inferer for every method.

Consensus sampling through the N-sample inferer is tested in test_consensus_inference.py.
"""

from __future__ import annotations

import pytest
import torch

from ambiseg_monai.diffusion import (
    DiffusionParameterization,
    LearnedVarianceScheduler,
    LossWeighting,
    SamplingScheduler,
    TrainingScheduler,
)
from ambiseg_monai.diffusion.protocols import missing_members
from ambiseg_monai.inferers import DiffusionSamplingInferer, DiffusionTrainingInferer
from ambiseg_monai.losses import DiffusionLoss, HybridDiffusionLoss
from ambiseg_monai.networks.denoisers import ConditionalDenoiser
from ambiseg_monai.schedulers import (
    ContinuousDDIMScheduler,
    ContinuousDDPMScheduler,
    RespacedDDIMScheduler,
    RespacedDDPMScheduler,
)


def _discrete(**kwargs) -> RespacedDDPMScheduler:
    return RespacedDDPMScheduler(num_train_timesteps=50, schedule="linear_beta", beta_start=1e-3, beta_end=0.1, **kwargs)


class _Linear(torch.nn.Module):
    """A tiny denoiser of the training protocol: a 1x1 convolution of [x_t, image] plus t."""

    def __init__(self, out_channels: int = 1) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, out_channels, 1)

    def forward(self, x_t, timesteps, class_labels=None, image=None, target=None):
        return self.conv(torch.cat([x_t, image], 1)) + timesteps.float().reshape(-1, 1, 1, 1) / 100


def _batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 1, 6, 6, generator=generator), (torch.rand(4, 1, 6, 6, generator=generator) > 0.5).float()


# ------------------------------------------------------------------------------------------ protocol
@pytest.mark.parametrize(
    "scheduler", [_discrete(), RespacedDDIMScheduler(num_train_timesteps=50), ContinuousDDPMScheduler(), ContinuousDDIMScheduler()]
)
def test_every_scheduler_follows_the_protocol(scheduler):
    assert isinstance(scheduler, SamplingScheduler) and isinstance(scheduler, TrainingScheduler)
    assert isinstance(scheduler.parameterization, DiffusionParameterization)
    t = scheduler.sample_timesteps(5, stratified=True)
    x0 = torch.ones(5, 1, 2, 2)
    alpha, sigma = scheduler.coefficients(t, x0)
    torch.testing.assert_close(alpha**2, scheduler.signal_variance(t).float().reshape(-1, 1, 1, 1))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    torch.testing.assert_close(scheduler.add_noise(x0, torch.zeros_like(x0), t), alpha * x0)
    assert isinstance(scheduler, LearnedVarianceScheduler) == isinstance(scheduler, RespacedDDPMScheduler)


def test_discrete_parameterization_is_monai_prediction_type():
    for monai_name, canonical in (("epsilon", "eps"), ("sample", "x"), ("v_prediction", "v")):
        parameterization = _discrete(prediction_type=monai_name).parameterization
        assert parameterization.prediction_type == canonical and not parameterization.uses_tanh


def test_stratified_discrete_timesteps_cover_every_stratum():
    torch.manual_seed(0)
    steps = _discrete().sample_timesteps(10, stratified=True)
    assert sorted((steps // 5).tolist()) == list(range(10))  # T = 50, B = 10: one step in each 5-step stratum


def test_training_inferer_names_what_a_scheduler_lacks():
    with pytest.raises(TypeError, match=r"TrainingScheduler protocol.*lacks \[.*'coefficients'"):
        DiffusionTrainingInferer(object())
    assert "sample_timesteps" in missing_members(object(), TrainingScheduler)
    assert missing_members(_discrete(), LearnedVarianceScheduler) == []


def test_parameterization_predict_x0_is_predict_first_output():
    x_t, output = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    for kind in ("x", "v", "eps"):
        parameterization = DiffusionParameterization(kind, tanh_x_output=True)
        assert torch.equal(parameterization.predict_x0(output, x_t, alpha, sigma), parameterization.predict(output, x_t, alpha, sigma)[0])
    assert torch.equal(DiffusionParameterization("x").prediction(output), torch.tanh(output))
    assert torch.equal(DiffusionParameterization("v").prediction(output), output)


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("scheduler_class", [ContinuousDDIMScheduler, ContinuousDDPMScheduler])
@pytest.mark.parametrize("posterior", [False, True])
def test_continuous_time_training_with_weighting_and_stratified_times(scheduler_class, posterior):
    """AmbDiffSeg's training step (``weighting``, ``stratified_times: true``): one time per stratum of the
    batch, and no ``l_vlb`` (no learned variance), so its loss ``DiffusionLoss()`` is ``l_simple`` alone, as
    ``HybridDiffusionLoss(vlb_weight=0.0)`` was."""
    scheduler = scheduler_class(prediction_type="v")
    image, target = _batch()
    kwargs = {"target": target}
    if posterior:
        kwargs.update(raters=torch.cat([target, 1 - target], 1), rater_mask=torch.ones(4, 2, dtype=torch.bool))
    inferer = DiffusionTrainingInferer(
        scheduler, weighting=LossWeighting("sigmoid"), stratified_times=True, rater_posterior_targets=posterior
    )
    torch.manual_seed(3)
    terms = inferer(image, _Linear(), **kwargs)
    assert set(terms) == {"l_simple", "loss_weights", "pred_x0", "model_output", "x_t", "noise", "timesteps"}
    strata = (terms["timesteps"] * len(terms["timesteps"])).floor().long()
    assert sorted(strata.tolist()) == list(range(len(strata)))
    assert torch.equal(DiffusionLoss()(terms), terms["l_simple"])
    assert torch.equal(HybridDiffusionLoss(vlb_weight=0.0)(terms), terms["l_simple"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_discrete_weighting_is_a_function_of_the_log_snr(prediction_type):
    """w(t) works with the discrete scheduler, through λ = log(ᾱ_t / (1 - ᾱ_t)): the x-space loss weighted
    by SNR is ε's own MSE (x̂_0 - x_0 = -(σ/α)(ε̂ - ε)), and by SNR + 1 it is v's (v̂ - v = -(x̂_0 - x_0)/α)."""
    scheduler = _discrete(prediction_type=prediction_type)
    image, target = _batch()
    own = "snr" if prediction_type == "epsilon" else "snr_plus_one"
    terms = {}
    for weighting in (None, LossWeighting(own), LossWeighting("uniform")):
        torch.manual_seed(5)
        terms[weighting and weighting.weighting] = DiffusionTrainingInferer(scheduler, weighting=weighting)(
            image, _Linear(out_channels=2), target=target
        )
    abar = scheduler.alphas_cumprod[terms[own]["timesteps"]].double()
    torch.testing.assert_close(terms[own]["loss_weights"].double(), abar / (1 - abar) + (own == "snr_plus_one"))
    torch.testing.assert_close(terms[own]["l_simple"], terms[None]["l_simple"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["uniform"]["loss_weights"], torch.ones(4))
    assert not torch.allclose(terms["uniform"]["l_simple"], terms[None]["l_simple"])
    with pytest.raises(TypeError, match="continuous-time schedule"):
        DiffusionTrainingInferer(scheduler, weighting=LossWeighting(times_neg_dlogsnr_dt=True))(
            image, _Linear(out_channels=2), target=target
        )


@pytest.mark.parametrize("prediction_type", ["x", "v", "eps"])
def test_continuous_time_without_weighting_regresses_the_prediction_on_its_target(prediction_type):
    scheduler = ContinuousDDIMScheduler(prediction_type=prediction_type, tanh_x_output=True)
    image, target = _batch()
    torch.manual_seed(1)
    out = DiffusionTrainingInferer(scheduler)(image, _Linear(), target=target)
    assert "loss_weights" not in out and bool(((out["timesteps"] >= 0) & (out["timesteps"] < 1)).all())
    alpha, sigma = scheduler.coefficients(out["timesteps"], out["x_t"])
    x0 = 2 * target - 1
    expected_target = {"x": x0, "v": alpha * out["noise"] - sigma * x0, "eps": out["noise"]}[prediction_type]
    prediction = torch.tanh(out["model_output"]) if prediction_type == "x" else out["model_output"]
    torch.testing.assert_close(out["l_simple"], ((expected_target - prediction) ** 2).mean((1, 2, 3)))


def test_learned_variance_needs_a_learned_variance_scheduler():
    image, target = _batch()
    with pytest.raises(ValueError, match="has no learned variance"):
        DiffusionTrainingInferer(ContinuousDDIMScheduler())(image, _Linear(out_channels=2), target=target)
    # without the VLB the variance channels are ignored, as with a discrete scheduler
    out = DiffusionTrainingInferer(ContinuousDDIMScheduler(), compute_vlb=False)(image, _Linear(2), target=target)
    assert "l_vlb" not in out
    assert "l_vlb" in DiffusionTrainingInferer(_discrete(variance_type="learned_range"))(image, _Linear(2), target=target)
    with pytest.raises(ValueError, match=r"network output has shape \(4, 1, 4, 4\)"):
        DiffusionTrainingInferer(_discrete())(image, lambda x_t, *a, **k: x_t[:, :, :4, :4], target=target)


def test_diffusion_loss_needs_a_weight_for_every_term():
    terms = {"l_simple": torch.ones(2), "l_vlb": torch.full((2,), 2.0), "l_amb": torch.full((2,), 4.0)}
    with pytest.raises(ValueError, match=r"\['l_amb', 'l_vlb'\] have no weight"):
        DiffusionLoss()(terms)
    total = DiffusionLoss({"l_vlb": 0.5, "l_amb": 0.25})(terms)
    assert torch.equal(total, HybridDiffusionLoss(vlb_weight=0.5, term_weights={"l_amb": 0.25})(terms))
    assert total.tolist() == [3.0, 3.0]


# ------------------------------------------------------------------------------------------ sampling
class _LabelRecorder(ConditionalDenoiser):
    """Predicts x_0 = +1 where the column index is below the row's class label (x0-prediction stub)."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: list[torch.Tensor | None] = []

    def denoise(self, x_t, timesteps, cond, class_labels=None):
        self.labels.append(None if class_labels is None else class_labels.clone())
        if class_labels is None:
            return torch.zeros_like(x_t)
        columns = torch.arange(x_t.shape[-1])
        return ((columns[None, :] < class_labels[:, None]).float() * 2 - 1)[:, None, None, :].expand_as(x_t).contiguous()


def _x0_scheduler() -> RespacedDDPMScheduler:
    return _discrete(prediction_type="sample")


def test_per_sample_labels_reach_the_network_row_by_row():
    network = _LabelRecorder()
    inferer = DiffusionSamplingInferer(_x0_scheduler(), num_samples=3, num_inference_steps=2, sample_labels=[2, 0, 1], max_rows=4)
    samples = inferer(torch.zeros(2, 1, 1, 3), network)
    assert samples.shape == (2, 3, 1, 3)
    assert [labels.tolist() for labels in network.labels] == [[2, 0, 1, 2]] * 2 + [[0, 1]] * 2  # 2 chunks x 2 steps
    torch.testing.assert_close(samples[:, :, 0], torch.tensor([[1.0, 1, 0], [0, 0, 0], [1, 0, 0]]).expand(2, 3, 3))


def test_per_image_class_labels_are_repeated_for_the_samples():
    network = _LabelRecorder()
    DiffusionSamplingInferer(_x0_scheduler(), num_samples=2, num_inference_steps=1)(
        torch.zeros(2, 1, 1, 3), network, class_labels=torch.tensor([1, 3])
    )
    assert network.labels[0].tolist() == [1, 1, 3, 3]


def test_sampling_inferer_rejects_bad_settings():
    with pytest.raises(ValueError, match="one non-negative label per sample"):
        DiffusionSamplingInferer(_x0_scheduler(), num_samples=3, sample_labels=[0, 1])
    with pytest.raises(ValueError, match="sample_values"):
        DiffusionSamplingInferer(_x0_scheduler(), sample_values="soft")
    with pytest.raises(ValueError, match="not both"):
        DiffusionSamplingInferer(_x0_scheduler(), return_stats=True, postprocess=lambda s: s)
    with pytest.raises(ValueError, match="do not pass class_labels"):
        DiffusionSamplingInferer(_x0_scheduler(), num_samples=1, sample_labels=[0])(
            torch.zeros(1, 1, 2, 2), _LabelRecorder(), class_labels=torch.tensor([0])
        )
    with pytest.raises(ValueError, match="B x C x H x W"):
        DiffusionSamplingInferer(_x0_scheduler())(torch.zeros(2, 4), _LabelRecorder())


def test_continuous_sample_values_and_postprocess():
    inferer = DiffusionSamplingInferer(
        _x0_scheduler(), num_samples=2, num_inference_steps=2, sample_values="continuous", postprocess=lambda s: s.sum()
    )
    assert float(inferer(torch.zeros(1, 1, 2, 2), _LabelRecorder())) == pytest.approx(4.0)  # x_0 = 0 -> 0.5
