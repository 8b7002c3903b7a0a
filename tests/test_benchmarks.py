"""The benchmark scripts: their settings parse, the quality script runs end to end and reuses a trained network."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from monai.bundle import ConfigParser

from ambiseg_monai.data.demo import DemoConfig, generate_demo_dataset
from benchmarks import convergence, quality, run_all, sampler_overhead


@pytest.mark.parametrize("script", sorted(run_all.SUITE))
def test_every_run_all_setting_is_accepted_by_its_script(script, monkeypatch):
    module = importlib.import_module(f"benchmarks.{script}")
    for arguments in run_all.SUITE[script]:
        monkeypatch.setattr(sys, "argv", [script, *arguments])
        module._parse()  # argparse exits on an unknown or malformed argument


def test_sampler_settings_parse_and_bad_ones_are_named():
    assert quality.parse_sampler_setting("ddim:25") == ("ddim", 25, False)
    assert quality.parse_sampler_setting("ddpm:1000") == ("ddpm", 1000, False)
    assert quality.parse_sampler_setting("ddpm:25:amp") == ("ddpm", 25, True)
    for bad in ("ddim", "euler:10", "ddpm:0", "ddpm:x", "ddpm:25:fp8"):
        with pytest.raises(ValueError, match=bad):
            quality.parse_sampler_setting(bad)


def test_use_sampler_switches_the_cimd_scheduler_and_back():
    parser = ConfigParser()
    parser.read_config(str(quality.BUNDLES / "cimd" / "configs" / "train.json"))
    quality.use_sampler(parser, "ddim")
    ddim = parser.get_parsed_content("sampling_scheduler", lazy=False)
    assert type(ddim).__name__ == "RespacedDDIMScheduler"
    quality.use_sampler(parser, "ddpm")
    ddpm = parser.get_parsed_content("sampling_scheduler", lazy=False)
    assert type(ddpm).__name__ == "RespacedDDPMScheduler" and ddpm.variance_type == "learned_range"
    assert torch.equal(ddim.alphas_cumprod, ddpm.alphas_cumprod)  # same training schedule


def test_sampler_overhead_measures_both_parts():
    row = sampler_overhead.measure("ambdiffseg", rows=2, size=16, device=torch.device("cpu"), repeats=1)
    assert row["setting"] == "ambdiffseg" and row["steps"] == 10
    assert row["network_ms"] > 0 and row["sampler_ms"] > 0


def test_quality_trains_scores_and_reuses_the_checkpoint(tmp_path, monkeypatch, capsys):
    generate_demo_dataset(tmp_path / "demo", DemoConfig(num_training=64))  # the study's 64-image setting
    arguments = ["quality.py", "--methods", "prob_unet", "--epochs", "1", "--samples", "8", "--images", "2",
                 "--threads", "1", "--dataset-dir", str(tmp_path / "demo"), "--checkpoint-dir", str(tmp_path / "ckpt"),
                 "--json", str(tmp_path / "rows.json")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", arguments)
    quality.main()
    rows = {row["method"]: row for row in json.loads((tmp_path / "rows.json").read_text())}
    assert set(rows) == {"truth (8 draws)", "raters (4 draws)", "prob_unet"}
    trained = rows["prob_unet"]
    assert trained["iterations"] == 8  # 64 training images / batch 8, one epoch
    assert 0.0 <= trained["ged"] <= 2.0 and 0.0 <= trained["mode_tv"] <= 1.0
    assert rows["truth (8 draws)"]["ged"] < rows["raters (4 draws)"]["ged"] + 0.5
    assert (tmp_path / "ckpt" / "prob_unet.pt").is_file()
    assert "| prob_unet |" in capsys.readouterr().out
    # a second run loads the saved network instead of training: same iterations, same scores
    quality.main()
    again = {row["method"]: row for row in json.loads((tmp_path / "rows.json").read_text())}["prob_unet"]
    assert again["iterations"] == 8 and again["train_s"] == trained["train_s"]
    assert again["ged"] == pytest.approx(trained["ged"])


def test_fast_setting_caps_rows_per_call_on_cpu_only():
    from benchmarks.sampling_methods import fast_max_rows

    assert fast_max_rows(4, torch.device("cpu")) == 4
    assert fast_max_rows(0, torch.device("cpu")) is None  # 0: all N masks in one call
    assert fast_max_rows(4, torch.device("cuda")) is None  # a GPU always takes the whole batch


def _untrained_prob_unet_model_file(path) -> None:
    """A bundle model file (``{"network": state dict}``) of an untrained Prob. U-Net."""
    network = ConfigParser()
    network.read_config("bundles/prob_unet/configs/train.json")
    network["device"] = "$torch.device('cpu')"
    torch.save({"network": network.get_parsed_content("network_def").state_dict()}, path)


def test_convergence_scores_every_method_and_a_saved_checkpoint(tmp_path, monkeypatch, capsys, small_demo_dataset):
    rows = convergence.main(["--methods", "cimd", "prob_unet", "--iterations", "1", "2", "--samples", "2", "--images", "2",
                             "--threads", "1", "--dataset-dir", small_demo_dataset, "--json", str(tmp_path / "rows.json"),
                             "--plot", str(tmp_path / "convergence.png"), "--save-dir", str(tmp_path / "weights")])  # fmt: skip
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    assert set(by_method) == {"truth", "truth, 1-px jitter", "consensus construction", "cimd", "prob_unet"}
    assert [row["iterations"] for row in by_method["cimd"]] == [1, 2]
    for row in by_method["cimd"] + by_method["prob_unet"]:
        assert 0.0 <= row["ged"] <= 2.0 and 0.0 <= row["mode_tv"] <= 1.0 and 0.0 <= row["isolated_pixels"] <= 1.0
    truth, jittered = by_method["truth"][0], by_method["truth, 1-px jitter"][0]
    # draws from the truth are exact modes: no speckle, and every sample matches a mode, so a
    # one-pixel jitter of the same draws changes GED but not the mode assignment
    assert truth["isolated_pixels"] == 0.0 and jittered["ged"] > truth["ged"]
    assert jittered["mode_tv"] == pytest.approx(truth["mode_tv"])
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    assert (tmp_path / "convergence.png").stat().st_size > 1000
    assert "| cimd | 2 |" in capsys.readouterr().out
    # a saved bundle model file is scored with the weights its inference.json loads
    _untrained_prob_unet_model_file(tmp_path / "model.pt")
    scored = convergence.main(["--methods", "prob_unet", "--checkpoint", str(tmp_path / "model.pt"), "--samples", "2",
                               "--images", "2", "--threads", "1", "--dataset-dir", small_demo_dataset])  # fmt: skip
    assert scored[-1]["method"] == "prob_unet" and scored[-1]["checkpoint"] == str(tmp_path / "model.pt")
    # --save-dir keeps the scored weights as model files; scoring one again gives the study's scores
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [
        "cimd_it1.pt", "cimd_it2.pt", "prob_unet_it1.pt", "prob_unet_it2.pt"]  # fmt: skip
    assert set(torch.load(tmp_path / "weights" / "cimd_it2.pt", weights_only=True)) == {"ema"}
    rescored = convergence.main(["--methods", "prob_unet", "--checkpoint", str(tmp_path / "weights" / "prob_unet_it2.pt"),
                                 "--samples", "2", "--images", "2", "--threads", "1", "--dataset-dir", small_demo_dataset])  # fmt: skip
    study_row = by_method["prob_unet"][-1]
    assert {k: rescored[-1][k] for k in convergence.SCORES} == {k: study_row[k] for k in convergence.SCORES}


def test_oracle_in_band_replaces_the_network_only_inside_the_band():
    from benchmarks.denoiser_vs_oracle import OracleInBand

    from ambiseg_monai.diffusion import MixtureOracleDenoiser
    from ambiseg_monai.networks.denoisers import ConditionalDenoiser
    from ambiseg_monai.schedulers import RespacedDDPMScheduler

    class Constant(ConditionalDenoiser):
        def encode_condition(self, image):
            return image

        def denoise(self, x_t, timesteps, cond, class_labels=None):
            return torch.full((len(x_t), 2, *x_t.shape[2:]), 7.0)  # [ε, learned-range v]

    scheduler = RespacedDDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
    modes = torch.tensor([[[[0.0, 1.0]]], [[[1.0, 1.0]]]])  # K x C x H x W
    oracle = MixtureOracleDenoiser.for_scheduler(scheduler, modes, torch.tensor([0.25, 0.75]))
    x_t, timesteps = torch.randn(3, 1, 1, 2), torch.tensor([100, 500, 900])
    out = OracleInBand(Constant(), oracle, 400, 700).denoise(x_t, timesteps, None)
    assert torch.equal(out[[0, 2]], torch.full((2, 2, 1, 2), 7.0)) and torch.equal(out[1, 1], torch.full((1, 2), 7.0))
    torch.testing.assert_close(out[1:2, :1], oracle.denoise(x_t[1:2], timesteps[1:2], None))


def test_denoiser_vs_oracle_scores_a_saved_cimd_model(tmp_path, small_demo_dataset):
    from benchmarks import denoiser_vs_oracle

    parser = ConfigParser()
    parser.read_config("bundles/cimd/configs/train.json")
    parser["device"] = "$torch.device('cpu')"
    torch.save({"ema": parser.get_parsed_content("network_def").state_dict()}, tmp_path / "model.pt")
    results = denoiser_vs_oracle.main(["--checkpoint", str(tmp_path / "model.pt"), "--dataset-dir", small_demo_dataset,
                                       "--images", "2", "--samples", "4", "--draws", "8", "--threads", "1",
                                       "--calibration-times", "500", "900", "--bands", "0-1000"])  # fmt: skip
    assert [row["t"] for row in results["calibration"]] == [500, 900]
    assert all(0.0 <= row["mean_abs_dq"] <= 1.0 for row in results["calibration"])
    assert [row["oracle_band"] for row in results["bands"]] == ["none", "[0, 1000)"]
    assert all(0.0 <= row["lobe_error"] <= 1.0 for row in results["bands"])


def test_memorisation_compares_sampled_lobe_frequencies_with_the_images_own_draws(tmp_path, small_demo_dataset):
    from benchmarks import memorisation

    _untrained_prob_unet_model_file(tmp_path / "model.pt")
    result = memorisation.main(["--method", "prob_unet", "--checkpoint", str(tmp_path / "model.pt"), "--images", "3",
                                "--samples", "4", "--threads", "1", "--dataset-dir", small_demo_dataset])  # fmt: skip
    assert result["split"] == "training" and result["lobes"] >= 3  # every demo image has 1-2 lobes
    assert 0.0 <= result["lobe_error"] <= 1.0 and 0.0 <= result["mean_abs_f_minus_d"] <= 1.0
    corr = result["corr_f_minus_p_d_minus_p"]
    assert corr != corr or -1.0 <= corr <= 1.0  # NaN when an untrained model's frequencies do not vary
