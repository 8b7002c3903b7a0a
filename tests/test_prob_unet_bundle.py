"""Method-specific tests of bundles/prob_unet: the latent-family variant overlays and the dataset overlays.
The train -> resume -> evaluate -> inference lifecycle shared with phiseg is in test_latent_bundles.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _bundle_runner import bundle_parser, latent_bundle_configs, latent_overrides, link_bundles, mlflow_runs

from ambiseg_monai.losses.elbo import ProbUNetELBOLoss
from ambiseg_monai.networks import latent_distributions as families
from ambiseg_monai.networks.prob_unet import ProbabilisticUNet

CONFIGS = latent_bundle_configs("prob_unet")


@pytest.mark.parametrize(
    "variant, family",
    [
        ("mixture_axis_aligned", families.MixtureOfAxisAlignedGaussians),
        ("full_covariance", families.FullCovarianceGaussian),
        ("mixture_full_covariance", families.MixtureOfFullCovarianceGaussians),
    ],
)
def test_variant_overlay_swaps_the_latent_family_and_trains_one_step(
    small_demo_dataset, tmp_path, monkeypatch, variant, family
):
    monkeypatch.chdir(tmp_path)  # the bundle writes runs/ and mlruns.db relative to the working directory
    link_bundles(tmp_path)  # and reads bundles/common relative to it
    parser = bundle_parser(CONFIGS, f"{variant}.json")
    overrides = latent_overrides("prob_unet", small_demo_dataset, tmp_path, iterations_per_epoch=1, val_interval=100)
    parser.update(overrides)
    network = parser.get_parsed_content("network")
    assert type(network.latent_distribution) is family
    assert network.latent_distribution.latent_dim == 6
    before = [p.detach().clone() for p in network.parameters()]
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    assert trainer.state.iteration == 1
    assert np.isfinite(parser.get_parsed_content("train#loss").last_terms["loss"])
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, network.parameters()))
    # a variant keeps its own checkpoints (resuming across latent families would fail) and its own run name
    assert (tmp_path / "runs" / f"prob_unet_{variant}" / "models" / "checkpoint_epoch=1.pt").is_file()
    (run,) = mlflow_runs(tmp_path, "prob_unet")
    assert run.info.run_name.startswith(f"prob_unet_{variant}_")
    assert run.data.params["latent_distribution"].endswith(family.__name__)


@pytest.mark.parametrize("overlay, channels", [("lidc", 1), ("ms", 4), ("bone_us", 1)])
def test_dataset_overlays_hold_the_paper_settings(overlay, channels):
    parser = bundle_parser(CONFIGS, f"{overlay}.json")
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, ProbabilisticUNet)
    assert network.channels == (32, 64, 128, 192) and network.in_channels == channels
    assert type(network.latent_distribution) is families.AxisAlignedGaussian
    assert network.latent_distribution.latent_dim == 6
    loss = parser.get_parsed_content("train#loss")
    assert isinstance(loss, ProbUNetELBOLoss) and (loss.beta, loss.l2_weight) == (10.0, 1e-5)
    assert parser.get_parsed_content("dataset_dir") == f"data/{overlay}"
    assert parser.get_parsed_content("output_dir") == f"runs/prob_unet_{overlay}"
