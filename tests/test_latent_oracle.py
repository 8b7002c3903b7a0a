"""benchmarks/latent_oracle.py: the mode draws follow π, the oracle rows decode what the posterior encodes, the
PHiSeg chain conditions each level on the one drawn above it, and the script runs end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from monai.bundle import ConfigParser
from torch.distributions import Independent, Normal, kl_divergence

from ambiseg_monai.metrics.truth import sampled_mode_frequencies
from ambiseg_monai.networks.latent_distributions import AxisAlignedGaussian
from benchmarks import convergence, latent_oracle


def test_draw_modes_follows_the_probabilities_and_never_draws_padding():
    probabilities = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0, 0.0], dtype=torch.float64)
    drawn = latent_oracle.draw_modes(probabilities, 40000, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=6).double() / len(drawn)
    assert frequencies[4:].sum() == 0
    torch.testing.assert_close(frequencies, probabilities, atol=0.01, rtol=0)


def test_best_modes_assigns_samples_as_the_mode_frequency_metric_does():
    generator = torch.Generator().manual_seed(1)
    modes = torch.rand(5, 6, 6, generator=generator) > 0.5
    modes[0] = False  # an empty mode
    mode_mask = torch.tensor([True, True, True, True, False])  # the last one padded
    samples = torch.rand(40, 6, 6, generator=generator) > 0.5
    samples[:3] = False  # empty samples match the empty mode
    samples[3:6] = modes[2]
    assigned = latent_oracle.best_modes(samples, modes, mode_mask)
    assert (assigned[:3] == 0).all() and (assigned[3:6] == 2).all() and not (assigned == 4).any()
    expected = sampled_mode_frequencies(samples[None], modes[None], mode_mask[None])[0]
    counts = torch.stack([(assigned == k).double().mean() for k in range(5)])
    torch.testing.assert_close(counts, expected)


def test_gaussian_moments_of_a_two_component_mixture():
    means = torch.tensor([[-1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    stds = torch.tensor([[0.5, 1.0], [0.5, 1.0]], dtype=torch.float64)
    m, v = latent_oracle.gaussian_moments(means, stds, torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(m, torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(v, torch.tensor([0.25 + 0.75, 1.0 + 0.75], dtype=torch.float64))  # within + between


class _HandBuiltProbUNet:
    """A Prob. U-Net stand-in on 4 x 4 images: the core is pixel row 0, the lobe row 1. The posterior puts
    z_0 at +2 for masks with the lobe and at -2 without (std 0.1); the decoder draws the lobe where z_0 > 0."""

    core = torch.zeros(4, 4, dtype=torch.bool)
    core[0] = True
    lobe = torch.zeros(4, 4, dtype=torch.bool)
    lobe[1] = True

    latent_distribution = AxisAlignedGaussian(latent_dim=2)
    prior = SimpleNamespace(encode=lambda image: torch.zeros(len(image), 4))  # N(0, 1)

    def unet(self, image):
        return image

    def posterior(self, inputs):
        has_lobe = (inputs[:, 1][:, self.lobe] > 0).all(1).float()
        mean = torch.stack([4 * has_lobe - 2, torch.zeros_like(has_lobe)], dim=1)
        return Independent(Normal(mean, torch.full_like(mean, 0.1)), 1)

    def combine(self, features, z):
        logits = torch.where(self.core, 10.0, -10.0).expand(len(z), 4, 4).clone()
        logits[:, self.lobe] = z[:, :1] * 10
        return logits[:, None]


def _hand_built_item(p_lobe: float) -> dict:
    core, lobe = _HandBuiltProbUNet.core, _HandBuiltProbUNet.lobe
    return {
        "truth_modes": torch.stack([core, core | lobe]).float(),
        "truth_probabilities": torch.tensor([1 - p_lobe, p_lobe], dtype=torch.float64),
        "truth_mode_mask": torch.tensor([True, True]),
        "truth_regions": lobe[None].float(),
        "truth_region_probabilities": torch.tensor([p_lobe], dtype=torch.float64),
        "truth_region_mask": torch.tensor([True]),
    }


def test_prob_unet_rows_decode_what_the_posterior_encodes():
    network, item = _HandBuiltProbUNet(), _hand_built_item(0.75)
    rows = {name: latent_oracle.Row(name) for name in latent_oracle.row_names("prob_unet", network)}
    stats: list[dict] = []
    n = 2000
    latent_oracle.prob_unet_image(network, torch.zeros(1, 1, 4, 4), item, n, torch.Generator().manual_seed(0),
                                  rows, stats)  # fmt: skip
    results = {name: row.result([item]) for name, row in rows.items() if row.samples}
    # the oracle latent: modes in proportion to π, each draw decoded to its own mode
    assert results["oracle latent"]["mode_match"] == 1.0
    assert results["oracle latent"]["lobe_error"] < 0.02 and results["oracle latent"]["mode_tv"] < 0.02
    assert results["posterior mean"]["mode_match"] == 1.0
    assert stats[0]["posterior_mean_exact"] == [True, True] and stats[0]["posterior_mean_iou"] == [1.0, 1.0]
    # the aggregated posterior: m = 0.75 * 2 - 0.25 * 2 = 1, v = 0.01 + 4 - 1; its Gaussian includes the lobe
    # with probability Φ(1 / sqrt(3.01)) = 0.718 (a unimodal prior flattens 0.75); the N(0, 1) prior: 0.5
    aggregate = 0.5 * (1 + math.erf(1 / math.sqrt(3.01) / math.sqrt(2)))
    assert abs(results["aggregate-moment prior"]["signed_p0.75"] - (aggregate - 0.75)) < 0.025
    assert abs(results["aggregate mean, prior std"]["signed_p0.75"] - (0.5 * (1 + math.erf(1 / 2**0.5)) - 0.75)) < 0.025
    assert abs(results["prior mean, aggregate std"]["signed_p0.75"] + 0.25) < 0.025
    q = Independent(Normal(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), torch.full((2, 2), 0.1)), 1)
    p = Independent(Normal(torch.zeros(2, 2), torch.ones(2, 2)), 1)
    torch.testing.assert_close(torch.tensor(stats[0]["kl_modes"]), kl_divergence(q, p), atol=0.01, rtol=0)
    assert stats[0]["reachable"] == [True, True] and stats[0]["axis_sweep"] == [0, 1]  # core, then core + lobe
    assert stats[0]["axis_multi_flip_pixels"] == 0.0
    assert abs(stats[0]["prior_draws_changed"] - 0.5) < 0.03  # z_0 = 0 decodes the core, half the draws the lobe
    assert abs(stats[0]["between_share"] - 3 / (3.01 + 0.01)) < 1e-6 and stats[0]["mode_dims"] == 1


def _untrained_phiseg():
    parser = ConfigParser()
    parser.read_config("bundles/phiseg/configs/train.json")
    parser["device"] = "$torch.device('cpu')"
    return parser.get_parsed_content("network_def").eval()


@torch.no_grad()
def test_phiseg_chain_conditions_each_level_on_the_level_drawn_above_it():
    torch.manual_seed(0)
    network = _untrained_phiseg()
    image = torch.randn(1, 1, 16, 16)
    probe = latent_oracle.PHiSegProbe(network, image)
    masks = torch.rand(3, 16, 16) > 0.5
    levels = network.latent_levels
    x = image.expand(3, -1, -1, -1)
    posterior_input = torch.cat([x, masks[:, None].float() - 0.5], 1)
    for start in range(levels + 1):  # posterior at levels >= start, prior below
        z = probe.chain(masks, 3, start, latent_oracle._mean)
        assert [tuple(level.shape) for level in z] == [(3, *shape) for shape in probe.shapes]
        posteriors, _ = network.posterior(posterior_input, override_samples=z)
        priors, _ = network.prior(x, override_samples=z)
        for level in range(levels):
            expected = (posteriors if level >= start else priors)[level].mean
            torch.testing.assert_close(z[level], expected)
        assert probe.decode(z).shape == (3, 16, 16)
    kl = probe.level_kl(masks, torch.Generator().manual_seed(0))
    assert kl.shape == (3, levels) and bool((kl >= 0).all())


def _model_file(path, method: str) -> None:
    parser = ConfigParser()
    parser.read_config(f"bundles/{method}/configs/train.json")
    parser["device"] = "$torch.device('cpu')"
    key = convergence.checkpoint_key(convergence.inference_config(method, ".", [], {}))
    torch.manual_seed(0)
    torch.save({key: parser.get_parsed_content("network_def").state_dict()}, path)


@pytest.mark.parametrize("method", ["prob_unet", "phiseg"])
def test_latent_oracle_runs_end_to_end_and_its_prior_row_is_the_bundles_score(
    method, tmp_path, small_demo_dataset, capsys
):
    _model_file(tmp_path / "model.pt", method)
    arguments = ["--method", method, "--checkpoint", str(tmp_path / "model.pt"), "--dataset-dir", small_demo_dataset,
                 "--images", "2", "--samples", "4", "--threads", "1", "--json", str(tmp_path / "out.json")]  # fmt: skip
    result = latent_oracle.main(arguments)
    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows)[:4] == ["truth", "prior", "oracle latent", "posterior mean"] and result["images"] == 2
    for row in rows.values():
        assert row["samples"] == 4 and 0.0 <= row["mode_tv"] <= 1.0 and 0.0 <= row["pair_diversity"] <= 1.0
        assert math.isnan(row["lobe_error"]) or 0.0 <= row["lobe_error"] <= 1.0
    assert 0.0 <= rows["oracle latent"]["mode_match"] <= 1.0 and math.isnan(rows["prior"]["mode_match"])
    assert len(result["latent_stats"]) == 2 and "means over images" in capsys.readouterr().out
    assert (tmp_path / "out.json").is_file()
    scored = convergence.main(["--methods", method, "--checkpoint", str(tmp_path / "model.pt"), "--samples", "4",
                               "--images", "2", "--threads", "1", "--dataset-dir", small_demo_dataset])  # fmt: skip
    for name in ("ged", "mode_tv", "lobe_error", "empty_error"):
        assert rows["prior"][name] == pytest.approx(scored[-1][name], nan_ok=True)
