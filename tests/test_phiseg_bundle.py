"""Method-specific tests of bundles/phiseg: the dataset overlays (the paper's 7 resolution / 5 latent levels).
The train -> resume -> evaluate -> inference lifecycle shared with prob_unet is in test_latent_bundles.py.
"""

from __future__ import annotations

import pytest
import torch
from _bundle_runner import bundle_parser, latent_bundle_configs

from ambiseg_monai.losses.elbo import PHiSegELBOLoss
from ambiseg_monai.networks.phiseg import PHiSeg

CONFIGS = latent_bundle_configs("phiseg")


@pytest.mark.parametrize("overlay, channels", [("lidc", 1), ("ms", 4), ("bone_us", 1)])
def test_dataset_overlays_hold_the_paper_settings(overlay, channels):
    parser = bundle_parser(CONFIGS, f"{overlay}.json")
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, PHiSeg)
    assert network.channels == (32, 64, 128, 192, 192, 192, 192) and network.latent_levels == 5
    assert network.in_channels == channels and network.size_divisor == 64
    loss = parser.get_parsed_content("train#loss")
    assert isinstance(loss, PHiSegELBOLoss) and loss.exponential_kl_weighting and loss.reconstruction_weight == 1.0
    assert loss.level_kl_weights(5).tolist() == [1.0, 4.0, 16.0, 64.0, 256.0]
    assert parser.get_parsed_content("learning_rate") == 1e-3 and parser.get_parsed_content("batch_size") == 12
    assert parser.get_parsed_content("dataset_dir") == f"data/{overlay}"
    assert parser.get_parsed_content("output_dir") == f"runs/phiseg_{overlay}"


def test_lidc_network_trains_on_a_128_pixel_batch():
    """The paper's 7 / 5 level network on LIDC-sized input: shapes of the training dict and of the samples."""
    parser = bundle_parser(CONFIGS, "lidc.json")
    network = parser.get_parsed_content("network_def")
    image, target = torch.randn(2, 1, 128, 128), (torch.rand(2, 1, 128, 128) > 0.5).float()
    out = network(image, target)
    assert out["logits"].shape == (2, 1, 128, 128) and out["level_logits"].shape == (2, 5, 128, 128)
    assert out["kl"].shape == (2, 5) and bool((out["kl"] >= 0).all())
    network.eval()
    with torch.no_grad():
        assert network.sample(image[:1], 3).shape == (1, 3, 128, 128)
