"""CIMD's network: AMN/ACN encoders, L_amb, the frozen (official-code) option, channel checks."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from ambiseg_monai.inferers.diffusion import DiffusionTrainingInferer
from ambiseg_monai.losses.diffusion import HybridDiffusionLoss
from ambiseg_monai.networks.ambiguity import AxisAlignedGaussianEncoder
from ambiseg_monai.networks.cimd import CIMDNetwork
from ambiseg_monai.networks.denoisers import ConcatConditionedDenoiser
from ambiseg_monai.schedulers.respaced import RespacedDDPMScheduler


def _network(freeze: bool = False, ambiguity: bool = True) -> CIMDNetwork:
    torch.manual_seed(0)
    denoiser = ConcatConditionedDenoiser(image_channels=1, channels=(8, 8), norm_num_groups=4, num_head_channels=8)
    encoders = (AxisAlignedGaussianEncoder(2, latent_dim=6, channels=(4, 8)), AxisAlignedGaussianEncoder(2, 6, (4, 8)))
    return CIMDNetwork(denoiser, *(encoders if ambiguity else (None, None)), freeze_ambiguity=freeze)


def _denoiser_grad(net: CIMDNetwork) -> float:
    # the U-Net's output conv starts at zero (MONAI), so at init only it receives gradient: sum over all
    return sum(float(p.grad.abs().sum()) for p in net.denoiser.parameters() if p.grad is not None)


def test_encoder_gives_a_diagonal_gaussian_per_image():
    encoder = AxisAlignedGaussianEncoder(in_channels=3, latent_dim=6)
    dist = encoder(torch.randn(2, 3, 32, 32))
    assert dist.batch_shape == (2,) and dist.event_shape == (6,)
    assert kl_divergence(dist, dist).abs().max() < 1e-6
    with pytest.raises(ValueError, match="3 input channels"):
        encoder(torch.randn(1, 2, 32, 32))


def test_kl_is_the_analytic_diagonal_gaussian_kl():
    q = Independent(Normal(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 2.0]])), 1)
    p = Independent(Normal(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0]])), 1)
    # KL = sum_i log(s_p/s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2
    expected = (0 + (1 + 1) / 2 - 0.5) + (-torch.log(torch.tensor(2.0)) + 4 / 2 - 0.5)
    assert kl_divergence(q, p).item() == pytest.approx(expected.item(), rel=1e-6)


def test_training_forward_returns_l_amb_and_sampling_forward_does_not():
    net = _network()
    x_t, image, target = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16), torch.ones(2, 1, 16, 16)
    t = torch.tensor([3, 7])
    out, aux = net(x_t, t, image=image, target=target)
    assert out.shape == (2, 2, 16, 16) and aux["l_amb"].shape == (2,)
    assert (aux["l_amb"] >= 0).all()
    plain = net(x_t, t, cond=net.encode_condition(image))
    assert torch.allclose(plain, out)
    assert isinstance(_network(ambiguity=False)(x_t, t, image=image, target=target), torch.Tensor)


@pytest.mark.parametrize("freeze", [False, True])
def test_joint_training_versus_frozen_official_option(freeze):
    net = _network(freeze=freeze)
    scheduler = RespacedDDPMScheduler(num_train_timesteps=20, variance_type="learned_range")
    terms = DiffusionTrainingInferer(scheduler)(torch.randn(2, 1, 16, 16), net, target=torch.ones(2, 1, 16, 16))
    assert set(terms) >= {"l_simple", "l_vlb", "l_amb"}
    HybridDiffusionLoss(term_weights={"l_amb": 1e-3})(terms).mean().backward()
    amn_grads = [p.grad for p in net.amn.parameters()]
    if freeze:  # official code: AMN/ACN never trained ...
        assert all(not p.requires_grad for p in net.amn.parameters()) and all(g is None for g in amn_grads)
    else:
        assert all(g is not None and g.abs().sum() > 0 for g in amn_grads)
    # ... but in both cases the denoiser is trained
    assert _denoiser_grad(net) > 0


def test_l_amb_reaches_the_denoiser_through_acn_input():
    net = _network()
    image, target = torch.randn(1, 1, 16, 16), torch.ones(1, 1, 16, 16)
    _, aux = net(torch.randn(1, 1, 16, 16), torch.tensor([4]), image=image, target=target)
    aux["l_amb"].sum().backward()
    assert _denoiser_grad(net) > 0


def test_cimd_needs_both_encoders():
    denoiser = ConcatConditionedDenoiser(channels=(8, 8), norm_num_groups=4, num_head_channels=8)
    with pytest.raises(ValueError, match="both AMN and ACN"):
        CIMDNetwork(denoiser, amn=AxisAlignedGaussianEncoder(2))


def test_image_channel_mismatch_is_reported():
    net = _network()
    with pytest.raises(ValueError, match="image has 4 channel.*image_channels=1"):
        net(torch.randn(1, 1, 16, 16), torch.tensor([1]), image=torch.randn(1, 4, 16, 16))


def test_training_inferer_rejects_targets_outside_unit_range():
    net = _network()
    scheduler = RespacedDDPMScheduler(num_train_timesteps=20, variance_type="learned_range")
    with pytest.raises(ValueError, match=r"masks in \[0, 1\]"):
        DiffusionTrainingInferer(scheduler)(torch.randn(1, 1, 16, 16), net, target=-torch.ones(1, 1, 16, 16))
    with pytest.raises(ValueError, match="needs `target`"):
        DiffusionTrainingInferer(scheduler)(torch.randn(1, 1, 16, 16), net)


def test_training_inferer_draws_timesteps_with_the_scheduler():
    # the training times come from the scheduler protocol's sample_timesteps (discrete or continuous)
    class FixedTimeScheduler(RespacedDDPMScheduler):
        def sample_timesteps(self, batch, device=None, stratified=False):
            return torch.full((batch,), 7, device=device, dtype=torch.long)

    terms = DiffusionTrainingInferer(FixedTimeScheduler(num_train_timesteps=20, variance_type="learned_range"))(
        torch.randn(3, 1, 16, 16), _network(), target=torch.zeros(3, 1, 16, 16)
    )
    assert terms["timesteps"].tolist() == [7, 7, 7]
