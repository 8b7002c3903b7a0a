"""The benchmark scripts: their settings parse, the quality script runs end to end and reuses a trained network,
the metric benchmark compares the current suite with the previous one."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from monai.bundle import ConfigParser

from ambiseg_monai.data.datalist import load_split
from ambiseg_monai.data.demo import DemoConfig, generate_demo_dataset
from benchmarks import convergence, quality, run_all, sampler_overhead
from benchmarks import metrics as metrics_benchmark


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


def test_sampling_methods_times_the_flow_matching_bundle_at_its_step_counts():
    from functools import partial

    from benchmarks.sampling_methods import load_method, method_rows

    torch.set_num_threads(1)
    image = torch.randn(1, 1, 16, 16)
    rows, official = method_rows("cimd", partial(load_method, "cimd", torch.device("cpu")), image, num_samples=2,
                                 timed_steps=1, repeats=1, amp=None, max_rows=None, flow_steps=[1, 3])  # fmt: skip
    settings = [setting for _, setting, _, _ in rows]
    assert settings[-2:] == ["fast, flow matching (1 Euler steps)", "fast, flow matching (3 Euler steps)"]
    rates = {setting: rate for _, setting, rate, _ in rows}
    assert official > 0 and all(rate > 0 for rate in rates.values())
    assert all("x vs official" in note and "x vs PyTorch fast" in note for _, _, _, note in rows[-2:])
    # a method without a flow-matching overlay has no such rows
    latent_rows, _ = method_rows("prob_unet", partial(load_method, "prob_unet", torch.device("cpu")), image, 2, 1, 1,
                                 None, None, official, flow_steps=[1])  # fmt: skip
    assert not any("flow" in setting for _, setting, _, _ in latent_rows)


def _untrained_model_file(path, method: str = "prob_unet", overlays=()) -> None:
    """A bundle model file of an untrained network of ``method`` (train.json plus ``overlays``), under the
    key its inference.json loads (``{"network" or "ema": state dict}``)."""
    network = ConfigParser()
    network.read_config([f"bundles/{method}/configs/train.json", *overlays])
    network["device"] = "$torch.device('cpu')"
    key = convergence.checkpoint_key(convergence.inference_config(method, ".", overlays, {}))
    torch.save({key: network.get_parsed_content("network_def").state_dict()}, path)


def test_convergence_scores_every_method_and_a_saved_checkpoint(tmp_path, monkeypatch, capsys, small_demo_dataset):
    rows = convergence.main(["--methods", "cimd", "prob_unet", "--iterations", "1", "2", "--samples", "2",
                             "--images", "2", "--threads", "1", "--dataset-dir", small_demo_dataset,
                             "--json", str(tmp_path / "rows.json"), "--plot", str(tmp_path / "convergence.png"),
                             "--save-dir", str(tmp_path / "weights")])  # fmt: skip
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
    assert "| cimd | bundle | ddim | 50 | 2 |" in capsys.readouterr().out  # the bundle's own sampler and steps
    # a saved bundle model file is scored with the weights its inference.json loads
    _untrained_model_file(tmp_path / "model.pt")
    scored = convergence.main(["--methods", "prob_unet", "--checkpoint", str(tmp_path / "model.pt"), "--samples", "2",
                               "--images", "2", "--threads", "1", "--dataset-dir", small_demo_dataset])  # fmt: skip
    assert scored[-1]["method"] == "prob_unet" and scored[-1]["checkpoint"] == str(tmp_path / "model.pt")
    # --save-dir keeps the scored weights as model files; scoring one again gives the study's scores
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [
        "cimd_it1.pt", "cimd_it2.pt", "prob_unet_it1.pt", "prob_unet_it2.pt"]  # fmt: skip
    assert set(torch.load(tmp_path / "weights" / "cimd_it2.pt", weights_only=True)) == {"ema"}
    saved = str(tmp_path / "weights" / "prob_unet_it2.pt")
    rescored = convergence.main(["--methods", "prob_unet", "--checkpoint", saved, "--samples", "2", "--images", "2",
                                 "--threads", "1", "--dataset-dir", small_demo_dataset])  # fmt: skip
    study_row = by_method["prob_unet"][-1]
    assert {k: rescored[-1][k] for k in convergence.SCORES} == {k: study_row[k] for k in convergence.SCORES}


@pytest.mark.parametrize("method", convergence.METHODS)
def test_convergence_trains_without_tracking_validation_or_checkpoints(method, small_demo_dataset):
    """A study run only trains: no handler of it opens an MLflow store (``mlruns.db`` in the working folder), builds
    the validator or writes checkpoints."""
    handlers = json.dumps(convergence.training_config(method, small_demo_dataset, [], {}, 10)["train#handlers"])
    for needle in ("mlflow", "MLflow", "validate", "Checkpoint", "ckpt_dir", "output_dir"):
        assert needle not in handlers, (method, needle)
    assert "NonFiniteGuard" in handlers and "@train::method_handler" in handlers  # what a training needs stays


FLOW = {method: f"bundles/{method}/configs/flow_matching.json" for method in ("cimd", "ambdiffseg")}


def _model_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if "iterations" in row or "checkpoint" in row]


@pytest.mark.parametrize(
    ("method", "overlays", "variant"),
    [
        ("cimd", [], "bundle"),
        ("cimd", [FLOW["cimd"]], "flow_matching"),
        ("ambdiffseg", [FLOW["ambdiffseg"]], "flow_matching"),
    ],
)
def test_steps_id_and_sampler_switch_of_the_inference_config(method, overlays, variant):
    parser = convergence.inference_config(method, ".", overlays, {})
    # every bundle's inference.json feeds its inferer "@inference_steps" (AmbDiffSeg's is "@num_inference_steps")
    assert convergence.steps_id(parser) == "inference_steps"
    assert convergence.variant_name(overlays) == variant
    family, sampler = convergence.sampler_of(parser)
    assert (family, sampler) == (("flow", "euler") if overlays else ("respaced", "ddim"))
    other = "heun" if overlays else "ddpm"
    convergence.use_sampler(parser, other)
    assert convergence.sampler_of(parser) == (family, other)
    with pytest.raises(ValueError, match="does not fit"):
        convergence.use_sampler(parser, "ddim" if overlays else "euler")


def test_sampling_settings_keep_the_fitting_samplers_and_score_a_latent_model_once():
    args = convergence._parse(["--samplers", "bundle", "ddpm", "ddim", "heun", "--sampling-steps", "1", "5"])
    # CIMD's own sampler is DDIM: "ddim" again is dropped, Heun does not fit
    assert convergence.sampling_settings("cimd", ".", [], args) == [
        ("bundle", 1), ("bundle", 5), ("ddpm", 1), ("ddpm", 5)]  # fmt: skip
    assert convergence.sampling_settings("cimd", ".", [FLOW["cimd"]], args) == [
        ("bundle", 1), ("bundle", 5), ("heun", 1), ("heun", 5)]  # fmt: skip
    assert convergence.sampling_settings("prob_unet", ".", [], args) == [("bundle", None)]  # no sampler, no steps


def test_convergence_sweeps_the_sampling_steps_of_a_saved_ddpm_and_flow_model(tmp_path, small_demo_dataset, capsys):
    common = ["--samples", "2", "--images", "2", "--threads", "1", "--dataset-dir", small_demo_dataset]
    # the VP CIMD bundle: its own sampler (DDIM) and DDPM, once per step count; a flow solver does not fit it
    _untrained_model_file(tmp_path / "cimd_it3.pt", "cimd")  # named as --save-dir names them: 3 iterations
    rows = convergence.main(["--methods", "cimd", "--checkpoint", str(tmp_path / "cimd_it3.pt"), "--sampling-steps",
                             "1", "3", "--samplers", "bundle", "ddpm", "heun", "--json", str(tmp_path / "ddpm.json"),
                             *common])  # fmt: skip
    scored = _model_rows(rows)
    assert [(r["variant"], r["sampler"], r["sampling_steps"], r["network_calls"]) for r in scored] == [
        ("bundle", "ddim", 1, 1), ("bundle", "ddim", 3, 3), ("bundle", "ddpm", 1, 1), ("bundle", "ddpm", 3, 3),
    ]  # fmt: skip
    for row in scored:
        assert row["checkpoint"] == str(tmp_path / "cimd_it3.pt") and row["iterations"] == 3
        assert row["images"] == 2 and row["sample_s"] > 0 and 0.0 <= row["ged"] <= 2.0 and 0.0 <= row["mode_tv"] <= 1.0
    out = capsys.readouterr().out
    assert "sampler 'heun' does not fit" in out and "| cimd | bundle | ddim | 3 | 3 |" in out
    assert "| cimd | bundle | ddim | 3 | 2 | own |" in out  # speed at equal quality
    # the flow overlay: the variant is named after it; Heun's K steps cost 2K - 1 network calls
    _untrained_model_file(tmp_path / "cimd_flow_it3.pt", "cimd", [FLOW["cimd"]])
    rows = convergence.main(["--methods", "cimd", "--checkpoint", str(tmp_path / "cimd_flow_it3.pt"), "--overlays",
                             FLOW["cimd"], "--sampling-steps", "1", "3", "--samplers", "euler", "heun",
                             "--json", str(tmp_path / "flow.json"), *common])  # fmt: skip
    assert [(r["variant"], r["sampler"], r["sampling_steps"], r["network_calls"]) for r in _model_rows(rows)] == [
        ("flow_matching", "euler", 1, 1), ("flow_matching", "euler", 3, 3),
        ("flow_matching", "heun", 1, 1), ("flow_matching", "heun", 3, 5)]  # fmt: skip
    # the two runs' rows in one table, plot and summary: the truth rows once, a common target at 3 iterations
    capsys.readouterr()
    both = convergence.main(["--from-json", str(tmp_path / "ddpm.json"), str(tmp_path / "flow.json"),
                             "--plot", str(tmp_path / "steps.png")])  # fmt: skip
    assert [r["method"] for r in both].count("truth") == 1 and len(_model_rows(both)) == 8
    out = capsys.readouterr().out
    assert (
        "| cimd | flow_matching | heun | 3 | 2 | common |" in out and "| cimd | bundle | ddpm | 3 | 2 | common |" in out
    )
    assert (tmp_path / "steps.png").stat().st_size > 1000
    # AmbDiffSeg: the sweep overrides its inference_steps (a reference to num_inference_steps); without a
    # sweep the row records the bundle's 10 steps
    _untrained_model_file(tmp_path / "amb.pt", "ambdiffseg", [FLOW["ambdiffseg"]])
    amb = ["--methods", "ambdiffseg", "--checkpoint", str(tmp_path / "amb.pt"), "--overlays", FLOW["ambdiffseg"],
           *common]  # fmt: skip
    swept = _model_rows(convergence.main([*amb, "--sampling-steps", "2"]))
    assert [(r["sampler"], r["sampling_steps"], r["network_calls"]) for r in swept] == [("euler", 2, 2)]
    default = _model_rows(convergence.main(amb))
    assert [(r["sampler"], r["sampling_steps"], r["network_calls"]) for r in default] == [("euler", 10, 10)]


def test_convergence_trains_each_variant_and_scoring_does_not_change_the_training(tmp_path, small_demo_dataset, capsys):
    common = ["--methods", "cimd", "--samples", "2", "--images", "2", "--threads", "1",
              "--dataset-dir", small_demo_dataset]  # fmt: skip
    rows = convergence.main([*common, "--variants", "vp=", "flow=bundles/{method}/configs/flow_matching.json",
                             "--iterations", "1", "2", "--sampling-steps", "1", "2", "--save-dir", str(tmp_path / "w"),
                             "--json", str(tmp_path / "rows.json"), "--plot", str(tmp_path / "plot.png")])  # fmt: skip
    scored = _model_rows(rows)
    assert [(r["variant"], r["sampler"], r["iterations"], r["sampling_steps"]) for r in scored] == [
        ("vp", "ddim", 1, 1), ("vp", "ddim", 1, 2), ("vp", "ddim", 2, 1), ("vp", "ddim", 2, 2),
        ("flow", "euler", 1, 1), ("flow", "euler", 1, 2), ("flow", "euler", 2, 1), ("flow", "euler", 2, 2)]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [
        "cimd_flow_it1.pt", "cimd_flow_it2.pt", "cimd_vp_it1.pt", "cimd_vp_it2.pt"]  # fmt: skip
    assert (tmp_path / "plot.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| cimd | flow | euler | 2 | 2 |" in out and "| cimd | vp | ddim | 2 | 2 | common |" in out
    # the scored points run with the random state kept: training straight to 2 iterations, scored once,
    # gives the same weights (and scores) as the sweep above, which scored 2 settings after iteration 1
    again = convergence.main([*common, "--variants", "vp=", "--iterations", "2", "--sampling-steps", "2",
                              "--save-dir", str(tmp_path / "again")])  # fmt: skip
    assert {k: _model_rows(again)[0][k] for k in convergence.SCORES} == {k: scored[3][k] for k in convergence.SCORES}
    straight, swept = (
        torch.load(d / "cimd_vp_it2.pt", weights_only=True)["ema"] for d in (tmp_path / "again", tmp_path / "w")
    )
    assert all(torch.equal(straight[k], swept[k]) for k in swept)
    # the rows of earlier runs are summarised again without training
    assert convergence.main(["--from-json", str(tmp_path / "rows.json")]) == rows
    assert "| cimd | flow | euler | 2 | 2 | own |" in capsys.readouterr().out


def _sweep_rows(variant: str, geds, lobes, steps=(1, 2, 5, 10, 25, 50)) -> list[dict]:
    """Hand-made sweep rows: 4 samples x 2 images, 0.8 s per step (0.1 s per mask and step)."""
    return [{"method": "cimd", "variant": variant, "sampler": "euler" if variant == "flow" else "ddpm",
             "sampling_steps": k, "network_calls": k, "iterations": 1000, "samples": 4, "images": 2,
             "sample_s": 0.8 * k, "ged": g, "mode_tv": 0.2, "lobe_error": lobe, "empty_error": 0.0}
            for k, g, lobe in zip(steps, geds, lobes, strict=True)]  # fmt: skip


def test_equal_quality_picks_the_fewest_steps_within_the_tolerance():
    ddpm = _sweep_rows("ddpm", [0.5, 0.3, 0.12, 0.105, 0.10, 0.13], [0.3, 0.2, 0.1, 0.09, 0.085, 0.08])
    flow = _sweep_rows("flow", [0.2, 0.108, 0.095, 0.09, 0.09, 0.09], [0.15, 0.095, 0.085, 0.08, 0.08, 0.08])
    truth = {"method": "truth", "samples": 4, "ged": 0.01, "mode_tv": 0.1, "lobe_error": 0.05, "empty_error": 0.0}
    summary = convergence.equal_quality([truth, *ddpm, *flow], tolerance=(0.01, 0.02))
    picked = {(s["variant"], s["target"]): s for s in summary}
    assert set(picked) == {("ddpm", "own"), ("flow", "own"), ("ddpm", "common"), ("flow", "common")}
    # own: GED <= 0.10 + 0.01 (best at 25 steps) and lobe error <= 0.08 + 0.02: 5 steps miss GED, 10 meet both
    own = picked["ddpm", "own"]
    assert own["steps"] == 10 and own["ged_limit"] == pytest.approx(0.11) and own["lobe_limit"] == pytest.approx(0.10)
    assert (
        own["s_per_mask"] == pytest.approx(1.0) and own["speedup"] == pytest.approx(5.0) and own["largest_steps"] == 50
    )
    assert picked["flow", "own"]["steps"] == 5  # GED <= 0.10: 2 steps (0.108) miss it
    # common target: the worse variant's references (GED 0.10, lobe 0.08) plus the tolerance
    assert picked["flow", "common"]["steps"] == 2 and picked["ddpm", "common"]["steps"] == 10
    # reference "last": the 50-step values (DDPM's GED 0.13 there): 5 steps are within 0.14
    last = {
        (s["variant"], s["target"]): s["steps"] for s in convergence.equal_quality(ddpm + flow, (0.01, 0.02), "last")
    }
    assert last["ddpm", "own"] == 5 and last["flow", "own"] == 5
    # a NaN lobe error (no non-empty sample) drops that criterion; no step count within the limits: None
    nan = _sweep_rows("flow", [0.3, 0.2], [float("nan")] * 2, steps=(1, 2))
    assert convergence.equal_quality(nan)[0]["steps"] == 2
    apart = _sweep_rows("ddpm", [0.3, 0.5], [0.3, 0.2], steps=(1, 2))  # the best GED and lobe error at different steps
    assert convergence.equal_quality(apart, (0.0, 0.0))[0]["steps"] is None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["--sampling-steps", "0"], "argument --sampling-steps: 0 is not a number of sampling steps"),
     (["--sampling-steps", "five"], "argument --sampling-steps: 'five' is not an integer"),
     (["--variants", "flow"], "argument --variants: a variant is NAME=FILE"),
     (["--samplers", "rk4"], "argument --samplers: invalid choice: 'rk4'")],
)  # fmt: skip
def test_convergence_rejects_bad_sweep_settings_with_a_clear_message(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convergence._parse(arguments)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_convergence_names_a_missing_overlay_and_a_sampler_that_fits_no_variant(small_demo_dataset):
    with pytest.raises(SystemExit, match="no such overlay file"):
        convergence.main(["--methods", "prob_unet", "--variants", "flow=bundles/{method}/configs/flow_matching.json"])
    with pytest.raises(SystemExit, match="none of --samplers"):
        convergence.main(["--methods", "cimd", "--samplers", "heun", "--iterations", "1", "--dataset-dir",
                          small_demo_dataset, "--samples", "2", "--images", "2", "--threads", "1"])  # fmt: skip


def test_oracle_in_band_replaces_the_network_only_inside_the_band():
    from ambiseg_monai.diffusion import MixtureOracleDenoiser
    from ambiseg_monai.networks.denoisers import ConditionalDenoiser
    from ambiseg_monai.schedulers import RespacedDDPMScheduler
    from benchmarks.denoiser_vs_oracle import OracleInBand

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
                                       "--images", "3", "--samples", "4", "--draws", "8", "--threads", "1",
                                       "--calibration-times", "500", "900", "--bands", "0-1000"])  # fmt: skip
    faint = [item["truth"]["empty_probability"] > 0 for item in load_split(small_demo_dataset, "test")[:3]]
    assert faint == [False, False, True]  # the fixture's first three test images: both kinds of lesion
    kinds = ["normal", "faint"]
    assert [(row["t"], row["lesions"]) for row in results["calibration"]] == [(t, k) for t in (500, 900) for k in kinds]
    assert all(0.0 <= row["mean_abs_dq"] <= 1.0 for row in results["calibration"])
    assert [row["oracle_band"] for row in results["bands"]] == ["none", "[0, 1000)"]
    assert all(0.0 <= row["lobe_error"] <= 1.0 for row in results["bands"])
    # --lesions reads one kind only: the other kind's rows and signed errors are gone
    for kind in kinds:
        only = denoiser_vs_oracle.main(["--checkpoint", str(tmp_path / "model.pt"), "--dataset-dir", small_demo_dataset,
                                        "--images", "3", "--samples", "2", "--draws", "4", "--threads", "1",
                                        "--lesions", kind, "--calibration-times", "999", "--bands"])  # fmt: skip
        assert [row["lesions"] for row in only["calibration"]] == [kind]
        mine = "faint_signed_p" if kind == "faint" else "signed_p"
        (row,) = only["bands"]  # --bands alone: the model's row only
        for row in only["bands"]:
            read = {key for key, value in row.items() if "signed_p" in key and value == value}  # not NaN
            assert read and all(key.startswith(mine) for key in read)


def test_memorisation_compares_sampled_lobe_frequencies_with_the_images_own_draws(tmp_path, small_demo_dataset):
    from benchmarks import memorisation

    _untrained_model_file(tmp_path / "model.pt")
    result = memorisation.main(["--method", "prob_unet", "--checkpoint", str(tmp_path / "model.pt"), "--images", "3",
                                "--samples", "4", "--threads", "1", "--dataset-dir", small_demo_dataset])  # fmt: skip
    assert result["split"] == "training" and result["lobes"] >= 3  # every demo image has 1-2 lobes
    assert 0.0 <= result["lobe_error"] <= 1.0 and 0.0 <= result["mean_abs_f_minus_d"] <= 1.0
    corr = result["corr_f_minus_p_d_minus_p"]
    assert corr != corr or -1.0 <= corr <= 1.0  # NaN when an untrained model's frequencies do not vary


def test_metrics_benchmark_compares_current_and_previous_suite_with_the_load(capsys):
    arguments = ["--batch", "3", "--samples", "5", "--raters", "3", "--size", "17", "--repeats", "1", "--compare"]
    result = metrics_benchmark.main(arguments)
    out = capsys.readouterr().out
    assert "load average before:" in out and "load average after :" in out
    assert "vectorised, previous" in out and "current vs previous:" in out
    assert "agreement within 1e-6: True" in out and "current and previous results identical: True" in out
    assert result["worst_difference"] <= 1e-6 and result["identical"] == 1.0
    assert result["current_s"] > 0 and result["previous_s"] > 0 and result["loop_s"] > 0


def test_previous_metric_suite_is_restored_after_the_comparison():
    import ambiseg_monai.metrics.ncc as ncc
    import ambiseg_monai.metrics.suite as suite
    from ambiseg_monai.metrics import MaskSetOverlaps

    def stages():
        return MaskSetOverlaps.from_masks, ncc.rater_level_histogram, suite.combined_sensitivity_from_overlaps

    originals = stages()
    with metrics_benchmark.previous_implementation():
        assert all(a != b for a, b in zip(stages(), originals, strict=True))
    assert stages() == originals
