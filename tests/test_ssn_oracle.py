"""benchmarks/ssn_oracle.py: the SSN family fitted to a known truth by the bundle's loss reproduces its
frequencies (and a one-sample loss or an unfitted distribution does not), the mode-TV breakdown adds up to the
truth metrics' mode TV, the low-rank share is that of the foreground logit, and the CLI runs end to end."""

from __future__ import annotations

import math

import pytest
import torch
from monai.bundle import ConfigParser

from ambiseg_monai.metrics.truth import truth_scores
from benchmarks import convergence, ssn_oracle

# an 8 x 8 truth: the core is rows 0-1 of columns 0-3 (8 px), the lobe rows 2-3 of columns 0-3 (8 px)
CORE = torch.zeros(8, 8, dtype=torch.bool)
CORE[0:2, 0:4] = True
LOBE = torch.zeros(8, 8, dtype=torch.bool)
LOBE[2:4, 0:4] = True


def _item(p_lobe: float, case_id: str = "hand") -> dict:
    """Core alone (1 - p) or core + lobe (p), padded to 3 modes and 2 regions as LoadTruthd pads."""
    modes = torch.zeros(3, 8, 8)
    modes[0], modes[1] = CORE.float(), (CORE | LOBE).float()
    regions = torch.zeros(2, 8, 8)
    regions[0] = LOBE.float()
    return {
        "case_id": case_id,
        "truth_modes": modes,
        "truth_probabilities": torch.tensor([1 - p_lobe, p_lobe, 0.0], dtype=torch.float64),
        "truth_mode_mask": torch.tensor([True, True, False]),
        "truth_regions": regions,
        "truth_region_probabilities": torch.tensor([p_lobe, 0.0], dtype=torch.float64),
        "truth_region_mask": torch.tensor([True, False]),
    }


def _lobe_frequency(row: dict, p: float) -> float:
    return p + row[f"signed_p{p}"]


def test_a_large_m_fit_keeps_the_frequencies_and_a_one_sample_fit_or_no_fit_does_not():
    items = [_item(0.25, "a"), _item(0.5, "b")]
    n = 1000
    fits = [ssn_oracle.Fit(64, 1, 1, "truth"), ssn_oracle.Fit(1, 1, 1, "truth")]
    rows = ssn_oracle.oracle_rows(items, n, fits, steps=200, batch=8, lr=0.1, log=lambda _: None)
    assert [row.name for row in rows] == ["start at the truth, rank 1", "oracle fit, M = 64, rank 1, from the truth",
                                          "oracle fit, M = 1, rank 1, from the truth"]  # fmt: skip
    start, large, one = (row.result(items) for row in rows)
    assert start["mode_tv"] < 0.03 and start["exact"] > 0.97 and "fit" not in start  # pixel noise at the threshold
    # M = 64: both modes at their probabilities (binomial std of a frequency: sqrt(p (1 - p) / n) <= 0.016),
    # every sample exactly a mode, the lobe's variance in the factor
    assert abs(_lobe_frequency(large, 0.25) - 0.25) < 0.04 and abs(_lobe_frequency(large, 0.5) - 0.5) < 0.04
    assert large["mode_tv"] < 0.04 and large["exact"] > 0.99 and large["unmatched"] == 0.0
    assert large["fit"]["flat"] and large["fit"]["batch"] == 8 and large["lowrank_share_lobes"] > 0.9
    # M = 1: the expected cross-entropy of one draw wants no variance between the modes: the rare lobe fades
    # (p = 0.25 drawn far less often), the lobes' variance moves to pixels (partial lobes)
    assert one["signed_p0.25"] < -0.15 and one["lobe_error"] > 0.1 and one["mode_tv"] > 0.1
    assert one["partial_lobe"] > 0.05 and one["exact"] < 0.9 and large["partial_lobe"] < 0.01
    # an unfitted distribution (loc 0, D = 1): pixel noise, no sample a mode
    unfitted = ssn_oracle.OracleRow("unfitted")
    model = ssn_oracle.OracleSSN(2, 8, 8, rank=1, generator=torch.Generator().manual_seed(0))
    logits = model.sample(n, None)
    for i, item in enumerate(items):
        unfitted.add(item, logits[i] > 0)
    result = unfitted.result(items)
    assert result["exact"] < 0.01 and result["low_iou"] > 0.9 and result["ged"] > 0.5


def test_the_truth_built_start_draws_the_truth_and_a_rank_below_the_lobes_ties_them():
    item = _item(0.25)
    two = _item(0.5)  # a second lobe of p = 0.5 below the first, and the lesion missed with probability 0.2
    lobe2 = torch.zeros(8, 8, dtype=torch.bool)
    lobe2[4:6, 0:4] = True
    modes = [torch.zeros(8, 8, dtype=torch.bool), CORE, CORE | LOBE, CORE | lobe2, CORE | LOBE | lobe2]
    two["truth_modes"] = torch.stack([m.float() for m in modes])
    two["truth_probabilities"] = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    two["truth_mode_mask"] = torch.ones(5, dtype=torch.bool)
    two["truth_regions"] = torch.stack([LOBE, lobe2]).float()
    two["truth_region_probabilities"] = torch.tensor([0.5, 0.5], dtype=torch.float64)
    two["truth_region_mask"] = torch.tensor([True, True])
    n = 4000
    rows = {}
    for rank in (3, 1):
        model = ssn_oracle.OracleSSN(1, 8, 8, rank)
        ssn_oracle.start_at_truth(model, [item])
        logits = model.sample(n, None)[0]
        assert abs(float(((logits > 0) & LOBE).flatten(1).any(1).double().mean()) - 0.25) < 0.03
        model = ssn_oracle.OracleSSN(1, 8, 8, rank)
        ssn_oracle.start_at_truth(model, [two])
        samples = model.sample(n, None)[0] > 0
        rows[rank] = ssn_oracle.mode_tv_breakdown(two, samples)
        both = (samples & LOBE).any((1, 2)) & (samples & lobe2).any((1, 2))
        rows[rank]["both"] = float(both.double().mean())
        rows[rank]["empty"] = float((~samples.any((1, 2))).double().mean())
    # rank 3: the lobes independent, but they ignore the core's presence: empty only when all three are off
    # (0.2 x 0.25 instead of 0.2); rank 1: one column, the lobes tied (both with p = 0.5) and to the core
    assert abs(rows[3]["both"] - 0.25) < 0.03 and abs(rows[3]["empty"] - 0.05) < 0.015
    assert abs(rows[1]["both"] - 0.5) < 0.03 and abs(rows[1]["empty"] - 0.2) < 0.03
    with pytest.raises(ValueError, match="one foreground logit"):
        ssn_oracle.start_at_truth(ssn_oracle.OracleSSN(1, 8, 8, 1, num_classes=2), [item])


def test_mode_tv_breakdown_on_hand_counted_samples():
    item = _item(0.5)
    half_lobe = LOBE.clone()
    half_lobe[3] = False  # 4 of the lobe's 8 pixels
    blob = torch.zeros(8, 8, dtype=torch.bool)
    blob[6:8, 6:8] = True  # overlaps no mode
    samples = torch.stack([CORE, CORE, CORE | half_lobe, blob])
    # assigned: core, core, core + lobe (IoU 12/16 against 8/12 with the core), none
    # frequencies 0.5 / 0.25 and 0.25 unmatched: TV = 0.25 / 2 + (|0.5 - 0.5| + |0.25 - 0.5|) / 2
    out = ssn_oracle.mode_tv_breakdown(item, samples)
    assert out == {"tv_unmatched": 0.125, "tv_frequency": 0.125, "unmatched": 0.25, "exact": 0.5, "low_iou": 0.25,
                   "partial_lobe": 0.25}  # fmt: skip
    scores = truth_scores(samples[None], item["truth_modes"][None] > 0.5, item["truth_probabilities"][None],
                          item["truth_mode_mask"][None])  # fmt: skip
    assert float(scores["mode_tv"][0]) == pytest.approx(out["tv_unmatched"] + out["tv_frequency"])
    torch.testing.assert_close(ssn_oracle.best_iou(samples, item["truth_modes"] > 0.5, item["truth_mode_mask"]),
                               torch.tensor([1.0, 1.0, 0.75, 0.0], dtype=torch.float64))  # fmt: skip


def test_low_rank_share_is_that_of_the_foreground_logit():
    pixels = torch.tensor([[True, False]])  # H x W = 1 x 2
    # two classes, K = 4 (class-major), rank 1: the foreground factor is P_1 - P_0, the diagonal D_1 + D_0
    factor = torch.tensor([[1.0], [0.0], [3.0], [5.0]])  # pixel 0: P_0 = 1, P_1 = 3 -> P_f = 2, variance 4
    diag = torch.tensor([0.5, 9.0, 0.5, 9.0])  # pixel 0: D_f = 1
    assert ssn_oracle.low_rank_share(factor, diag, 2, pixels) == pytest.approx(4 / 5)
    assert ssn_oracle.low_rank_share(factor[:2], diag[:2], 1, pixels) == pytest.approx(1 / 1.5)
    assert ssn_oracle.low_rank_share(None, diag, 2, pixels) == 0.0
    assert math.isnan(ssn_oracle.low_rank_share(factor, diag, 2, torch.zeros(1, 2, dtype=torch.bool)))


def test_the_fit_minimises_the_bundles_loss_and_samples_as_the_network():
    model = ssn_oracle.OracleSSN(3, 4, 4, rank=2, num_classes=2, generator=torch.Generator().manual_seed(0))
    out = model.training_output(5)
    assert out["loc"].shape == (15, 32) and out["cov_factor"].shape == (15, 32, 2)
    assert out["logits"].shape == (15, 1, 4, 4)
    torch.testing.assert_close(out["cov_diag"][5], torch.exp(model.log_cov_diag[1]) + 1e-5)
    assert ssn_oracle.default_batch(1) == 8 and ssn_oracle.default_batch(20) == 4 and ssn_oracle.default_batch(200) == 1
    # the same generators draw the same logit maps
    keys = ["x", "y", "z"]
    from ambiseg_monai.diffusion.sampler import make_generators

    first, second = (model.sample(6, make_generators(0, keys, 6)) for _ in range(2))
    assert first.shape == (3, 6, 4, 4) and torch.equal(first, second)
    assert ssn_oracle.fit_name(ssn_oracle.Fit(20, 10)) == "oracle fit, M = 20, rank 10 (the bundle's)"
    assert ssn_oracle.fit_configs([1, 20], [1, 10], True)[-1] == (20, 10, 2, "random")
    assert ssn_oracle.fit_configs([1], [3]) == [ssn_oracle.Fit(1, 3, 1, "random")]


def test_cli_parsing():
    args = ssn_oracle._parse([])
    assert (args.checkpoint, args.samples, args.steps, args.mc_samples, args.ranks, args.batch, args.lr) == (
        None, 200, 2000, [1, 20, 200], [1, 10], None, 0.1)  # fmt: skip
    args = ssn_oracle._parse(["--mc-samples", "5", "--ranks", "2", "3", "--images", "4", "--bundle-classes",
                              "--seed", "7", "--json", "x.json"])  # fmt: skip
    assert (args.mc_samples, args.ranks, args.images, args.bundle_classes, args.seed) == ([5], [2, 3], 4, True, 7)
    assert ssn_oracle._parse(["--mc-samples"]).mc_samples == []  # no fits
    fits = ssn_oracle._parse(["--fits", "1:10", "20:10:2", "200:1:truth"]).fits
    assert fits == [(1, 10, 1, "random"), (20, 10, 2, "random"), (200, 1, 1, "truth")]
    for bad in (["--ranks", "0"], ["--fits", "20"], ["--fits", "20:0"], ["--fits", "20:10:3"]):
        with pytest.raises(SystemExit):
            ssn_oracle._parse(bad)


def _model_file(path) -> None:
    parser = ConfigParser()
    parser.read_config("bundles/ssn/configs/train.json")
    parser["device"] = "$torch.device('cpu')"
    key = convergence.checkpoint_key(convergence.inference_config("ssn", ".", [], {}))
    torch.manual_seed(0)
    torch.save({key: parser.get_parsed_content("network_def").state_dict()}, path)


def test_ssn_oracle_runs_end_to_end_and_its_network_row_is_the_bundles_score(tmp_path, small_demo_dataset):
    _model_file(tmp_path / "model.pt")
    arguments = ["--checkpoint", str(tmp_path / "model.pt"), "--dataset-dir", small_demo_dataset, "--images", "2",
                 "--samples", "4", "--steps", "3", "--mc-samples", "2", "--ranks", "1", "--threads", "1",
                 "--json", str(tmp_path / "out.json")]  # fmt: skip
    result = ssn_oracle.main(arguments)
    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == ["truth", "network", "oracle fit, M = 2, rank 1"] and result["images"] == 2
    assert rows["truth"]["exact"] == 1.0 and rows["truth"]["unmatched"] == 0.0
    for row in rows.values():
        assert row["samples"] == 4
        assert row["mode_tv"] == pytest.approx(row["tv_unmatched"] + row["tv_frequency"])
    assert len(rows["oracle fit, M = 2, rank 1"]["fit"]["loss"]) == 3 and (tmp_path / "out.json").is_file()
    scored = convergence.main(["--methods", "ssn", "--checkpoint", str(tmp_path / "model.pt"), "--samples", "4",
                               "--images", "2", "--threads", "1", "--dataset-dir", small_demo_dataset])  # fmt: skip
    for name in ("ged", "mode_tv", "lobe_error", "empty_error"):
        assert rows["network"][name] == pytest.approx(scored[-1][name], nan_ok=True)
