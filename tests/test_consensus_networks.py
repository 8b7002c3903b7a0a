"""Consensus diffusion networks: the RRDB image encoder and the denoiser D(E(F(x_t) + G(I)))."""

from __future__ import annotations

import pytest
import torch

from ambiseg_monai.inferers.consensus import ConsensusSamplingInferer
from ambiseg_monai.inferers.diffusion import DiffusionTrainingInferer
from ambiseg_monai.losses.diffusion import HybridDiffusionLoss
from ambiseg_monai.networks.consensus import ConsensusDenoiser, SummedConditionStem
from ambiseg_monai.networks.rrdb import RRDB, ResidualDenseBlock, RRDBEncoder
from ambiseg_monai.schedulers.respaced import RespacedDDPMScheduler

TINY = dict(
    channels=(8, 16),
    norm_num_groups=4,
    num_head_channels=4,
    rrdb_features=4,
    rrdb_blocks=1,
    rrdb_growth_channels=2,
)


def _tiny_denoiser(num_levels: int | None = 4, image_channels: int = 1, randomise: bool = True) -> ConsensusDenoiser:
    torch.manual_seed(0)
    net = ConsensusDenoiser(image_channels=image_channels, num_levels=num_levels, **TINY)
    if randomise:
        # MONAI zero-initialises the last conv of every res block and the output conv, so a fresh
        # network ignores its embeddings; give those layers weights so the tests can see them
        with torch.no_grad():
            for parameter in net.parameters():
                if parameter.ndim > 1 and not parameter.any():
                    parameter.normal_(std=0.2)
    return net.eval()


def _scheduler() -> RespacedDDPMScheduler:
    return RespacedDDPMScheduler(
        num_train_timesteps=100, schedule="linear_beta", beta_start=1e-3, beta_end=0.2, variance_type="learned_range"
    )


# ----------------------------------------------------------------------------------------------- RRDB
def test_rrdb_encoder_keeps_resolution_and_maps_to_unet_width():
    encoder = RRDBEncoder(in_channels=4, out_channels=8, features=4, num_blocks=2, growth_channels=2)
    out = encoder(torch.randn(3, 4, 12, 10))
    assert out.shape == (3, 8, 12, 10)
    assert len(encoder.trunk) == 2 and all(isinstance(block, RRDB) for block in encoder.trunk)


def test_dense_block_is_identity_when_its_last_convolution_is_zero_and_rrdb_adds_a_scaled_residual():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 6)
    block = ResidualDenseBlock(features=4, growth_channels=3)
    assert [c.in_channels for c in block.convs] == [4, 7, 10, 13, 16]  # dense connectivity
    assert block.convs[-1].out_channels == 4
    with torch.no_grad():
        block.convs[-1].weight.zero_()
        block.convs[-1].bias.zero_()
    torch.testing.assert_close(block(x), x)
    rrdb = RRDB(features=4, growth_channels=3)
    with torch.no_grad():
        for inner in rrdb.blocks:
            inner.convs[-1].weight.zero_()
            inner.convs[-1].bias.zero_()
    # identity dense blocks: RRDB(x) = x + 0.2 * x
    torch.testing.assert_close(rrdb(x), 1.2 * x)


def test_rrdb_residual_scaling_is_one_fifth():
    block = ResidualDenseBlock(features=2, growth_channels=2)
    with torch.no_grad():
        for conv in block.convs:
            conv.weight.zero_()
            conv.bias.zero_()
        block.convs[-1].bias.fill_(1.0)  # conv5 outputs a constant 1
    x = torch.zeros(1, 2, 3, 3)
    torch.testing.assert_close(block(x), torch.full_like(x, 0.2))


def test_rrdb_encoder_rejects_wrong_channel_count():
    encoder = RRDBEncoder(in_channels=4, out_channels=8, features=4, num_blocks=1, growth_channels=2)
    with pytest.raises(ValueError, match="B x 4 x H x W.*image_channels"):
        encoder(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="num_blocks"):
        RRDBEncoder(num_blocks=-1)


# ------------------------------------------------------------------------------------ the denoiser
def test_stem_adds_image_features_to_the_mask_convolution():
    conv = torch.nn.Conv2d(1, 3, 3, padding=1)
    stem = SummedConditionStem(conv, mask_channels=1)
    x_t, features = torch.randn(2, 1, 5, 5), torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(stem(torch.cat([x_t, features], 1)), conv(x_t) + features)


def test_denoiser_sums_f_and_g_instead_of_concatenating():
    net = _tiny_denoiser(image_channels=4)
    stem = net.unet.conv_in
    assert isinstance(stem, SummedConditionStem)
    assert stem.conv.conv.in_channels == 1  # F sees only the noisy mask
    captured = {}
    stem.register_forward_hook(lambda module, args, output: captured.update(out=output))
    x_t, image = torch.randn(2, 1, 8, 8), torch.randn(2, 4, 8, 8)
    out = net(x_t, torch.tensor([5, 60]), class_labels=torch.tensor([0, 2]), image=image)
    assert out.shape == (2, 2, 8, 8)  # epsilon and the learned-range variance
    torch.testing.assert_close(captured["out"], stem.conv(x_t) + net.encode_condition(image))


def test_level_embedding_changes_the_output():
    net = _tiny_denoiser(num_levels=4)
    x_t, image, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([10, 70])
    cond = net.encode_condition(image)
    with torch.no_grad():
        outputs = [net(x_t, t, cond=cond, class_labels=torch.tensor([c, c])) for c in range(4)]
        again = net(x_t, t, cond=cond, class_labels=torch.tensor([2, 2]))
    torch.testing.assert_close(again, outputs[2])
    for a in range(4):
        for b in range(a + 1, 4):
            assert (outputs[a] - outputs[b]).abs().max() > 1e-3, (a, b)
    # each row uses its own label
    with torch.no_grad():
        mixed = net(x_t, t, cond=cond, class_labels=torch.tensor([0, 3]))
    torch.testing.assert_close(mixed[0], outputs[0][0])
    torch.testing.assert_close(mixed[1], outputs[3][1])


def test_denoiser_label_errors_are_explicit():
    net = _tiny_denoiser(num_levels=3, randomise=False)
    x_t, image, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 2\]"):
        net(x_t, t, class_labels=torch.tensor([0, 3]), image=image)
    with pytest.raises(ValueError, match="needs class_labels"):
        net(x_t, t, image=image)
    unconditional = _tiny_denoiser(num_levels=None, randomise=False)
    assert unconditional.unet.num_class_embeds is None
    with pytest.raises(ValueError, match="no level embedding"):
        unconditional(x_t, t, class_labels=torch.tensor([0, 1]), image=image)
    assert unconditional(x_t, t, image=image).shape == (2, 2, 8, 8)
    with pytest.raises(ValueError, match="encoded image"):
        net(x_t, t, cond=image, class_labels=torch.tensor([0, 1]))


def test_training_step_reaches_the_image_encoder_and_the_level_table():
    net = _tiny_denoiser(num_levels=4).train()
    inferer = DiffusionTrainingInferer(_scheduler())
    torch.manual_seed(2)
    image = torch.randn(3, 1, 8, 8)
    target = (torch.rand(3, 1, 8, 8) > 0.5).float()
    terms = inferer(image, net, target=target, class_labels=torch.tensor([0, 0, 2]))
    loss = HybridDiffusionLoss(vlb_weight=0.01)(terms).mean()
    assert torch.isfinite(loss)
    assert set(terms) >= {"l_simple", "l_vlb"}
    loss.backward()
    assert net.image_encoder.conv_first.weight.grad.abs().sum() > 0
    table_grad = net.unet.class_embedding.weight.grad
    assert table_grad[0].abs().sum() > 0 and table_grad[2].abs().sum() > 0
    assert table_grad[1].abs().sum() == 0 and table_grad[3].abs().sum() == 0  # unused levels


def test_image_encoder_runs_once_per_image_when_sampling():
    net = _tiny_denoiser(num_levels=3)
    encoder_batches, unet_rows = [], []
    net.image_encoder.register_forward_hook(lambda m, args, out: encoder_batches.append(args[0].shape[0]))
    net.unet.register_forward_hook(lambda m, args, out: unet_rows.append(args[0].shape[0]))
    inferer = ConsensusSamplingInferer(_scheduler(), num_levels=3, num_generations=2, num_inference_steps=4)
    out = inferer(torch.randn(2, 1, 8, 8), net, image_ids=["a", "b"])
    assert encoder_batches == [2]  # one call, one row per image
    assert unet_rows == [2 * 3 * 2] * 4  # every step: all images x levels x generations in one batch
    assert out["samples"].shape == (2, 3, 2, 8, 8)
