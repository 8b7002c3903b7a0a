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


def test_convergence_scores_every_method_and_a_saved_checkpoint(tmp_path, monkeypatch, capsys, small_demo_dataset):
    rows = convergence.main(["--methods", "cimd", "prob_unet", "--iterations", "1", "2", "--samples", "2", "--images", "2",
                             "--threads", "1", "--dataset-dir", small_demo_dataset, "--json", str(tmp_path / "rows.json"),
                             "--plot", str(tmp_path / "convergence.png")])  # fmt: skip
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
    network = ConfigParser()
    network.read_config("bundles/prob_unet/configs/train.json")
    network["device"] = "$torch.device('cpu')"
    torch.save({"network": network.get_parsed_content("network_def").state_dict()}, tmp_path / "model.pt")
    scored = convergence.main(["--methods", "prob_unet", "--checkpoint", str(tmp_path / "model.pt"), "--samples", "2",
                               "--images", "2", "--threads", "1", "--dataset-dir", small_demo_dataset])  # fmt: skip
    assert scored[-1]["method"] == "prob_unet" and scored[-1]["checkpoint"] == str(tmp_path / "model.pt")
