"""Scoring samples against a stored true distribution inside an evaluator: LoadTruthd + TruthMetricsHandler."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.transforms import Compose

from ambiseg_monai.data.datalist import load_split
from ambiseg_monai.data.demo import lobe_regions
from ambiseg_monai.handlers import truth
from ambiseg_monai.handlers.truth import TruthMetricsHandler
from ambiseg_monai.transforms.loading import LoadImage2Dd, LoadTruthd


@pytest.fixture(scope="module")
def truth_batch(small_demo_dataset):
    items = load_split(small_demo_dataset, "test")
    transform = Compose([LoadImage2Dd(keys="image"), LoadTruthd()])
    loader = DataLoader(Dataset(items, transform), batch_size=len(items))
    return items, next(iter(loader))


def test_load_truth_pads_modes_and_derives_the_lobes(truth_batch):
    items, batch = truth_batch
    first = items[0]["truth"]
    k, lobes = len(first["probabilities"]), len(first["lobe_probabilities"])
    assert batch["truth_modes"].shape == (len(items), 8, 16, 16)
    assert batch["truth_mode_mask"][0].tolist() == [True] * k + [False] * (8 - k)
    assert batch["truth_probabilities"][0, :k].tolist() == pytest.approx(first["probabilities"])
    assert float(batch["truth_probabilities"][0, k:].abs().sum()) == 0.0
    assert batch["truth_region_mask"][0].tolist() == [True] * lobes + [False] * (4 - lobes)
    assert batch["truth_region_probabilities"][0, :lobes].tolist() == pytest.approx(first["lobe_probabilities"])
    modes = batch["truth_modes"][0, :k].numpy() > 0
    expected = lobe_regions(modes, first["modes"], lobes)
    assert (batch["truth_regions"][0, :lobes].numpy() > 0).tolist() == expected.tolist()
    # a lobe is the part of "core+lobe<l>" outside the core: never empty, never overlapping the core
    core = modes[first["modes"].index("core")]
    assert all(region.any() and not (region & core).any() for region in expected)


def test_load_truth_rejects_a_mismatched_truth_and_passes_items_without_one(small_demo_dataset):
    item = load_split(small_demo_dataset, "test")[0]
    broken = {**item, "truth": {**item["truth"], "probabilities": [1.0]}}
    with pytest.raises(ValueError, match="masks but 1 probabilities"):
        LoadTruthd()(broken)
    assert LoadTruthd()({"image": "x"}) == {"image": "x"}


def _run_handler(batch, samples: torch.Tensor, tmp_path, **options) -> tuple[dict, TruthMetricsHandler]:
    handler = TruthMetricsHandler(output_dir=tmp_path, **options)
    engine = Engine(lambda engine, data: {"pred": samples})
    handler.attach(engine)
    engine.run([batch], max_epochs=1)
    return engine.state.metrics, handler


def test_handler_scores_exact_truth_proportions_as_perfect(truth_batch, tmp_path):
    items, batch = truth_batch
    # for every image, 100 samples in exactly the true proportions (the demo's probabilities are multiples of 1/64)
    rows = []
    for b in range(len(items)):
        p = batch["truth_probabilities"][b]
        counts = torch.round(p * 64).long()
        rows.append(torch.cat([batch["truth_modes"][b, k].expand(int(c), -1, -1) for k, c in enumerate(counts) if c]))
    samples = torch.stack(rows)
    metrics, handler = _run_handler(batch, samples, tmp_path)
    assert metrics["truth_mode_tv"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["truth_lobe_error"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["truth_empty_error"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["truth_ged"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["isolated_pixels"] == 0.0
    assert handler.written and handler.written[0].stat().st_size > 0


def test_handler_hand_computed_when_every_sample_is_the_core(truth_batch, tmp_path):
    items, batch = truth_batch
    samples = []
    for b, item in enumerate(items):
        core = item["truth"]["modes"].index("core")
        samples.append(batch["truth_modes"][b, core].expand(10, -1, -1))
    metrics, _ = _run_handler(batch, torch.stack(samples), tmp_path)
    # all samples on the core mode: TV = 1 - p(core); no lobe ever included: error = mean lobe probability
    expected_tv = [1 - item["truth"]["probabilities"][item["truth"]["modes"].index("core")] for item in items]
    expected_lobe = [sum(i["truth"]["lobe_probabilities"]) / len(i["truth"]["lobe_probabilities"]) for i in items]
    expected_empty = [item["truth"]["empty_probability"] for item in items]
    assert metrics["truth_mode_tv"] == pytest.approx(sum(expected_tv) / len(items))
    assert metrics["truth_lobe_error"] == pytest.approx(sum(expected_lobe) / len(items))
    assert metrics["truth_empty_error"] == pytest.approx(sum(expected_empty) / len(items))


def test_handler_skips_batches_without_truth(tmp_path):
    engine = Engine(lambda engine, data: {"pred": torch.zeros(1, 2, 4, 4)})
    handler = TruthMetricsHandler(output_dir=tmp_path)
    handler.attach(engine)
    engine.run([{"image": torch.zeros(1, 1, 4, 4)}], max_epochs=1)
    assert "truth_ged" not in engine.state.metrics and not handler.written


def test_loggers_attached_after_the_handler_see_this_runs_scores(truth_batch):
    # StatsHandler / MLFlowHandler read state.metrics at EPOCH_COMPLETED: the scores must be there by then,
    # and a second run must show its own scores, not the previous run's
    items, batch = truth_batch
    seen = []
    engine = Engine(lambda engine, data: {"pred": engine.state.samples})
    TruthMetricsHandler().attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(e.state.metrics.get("truth_empty_error")))
    all_empty = torch.zeros(len(items), 4, 16, 16)
    all_core = torch.stack([batch["truth_modes"][b, i["truth"]["modes"].index("core")] for b, i in enumerate(items)])
    for samples in (all_empty, all_core[:, None].expand(-1, 4, -1, -1)):
        engine.state.samples = samples
        engine.run([batch], max_epochs=1)
    true_empty = [item["truth"]["empty_probability"] for item in items]
    assert seen[0] == pytest.approx(sum(1 - p for p in true_empty) / len(items))  # every sample empty
    assert seen[1] == pytest.approx(sum(true_empty) / len(items))  # no sample empty


def test_plot_is_named_and_titled_by_phase(truth_batch, tmp_path, monkeypatch):
    """Validation during training: ``<prefix>_epoch<E>.png`` titled with the epoch; a stand-alone evaluation
    (evaluate.json): ``<prefix>.png`` titled with the phase and split, not the evaluator's epoch 1 (issue #18)."""
    items, batch = truth_batch
    titles = {}
    save = truth.save_figure

    def keep(fig, path, dpi):
        titles[path.name] = fig.get_suptitle()
        return save(fig, path, dpi)

    monkeypatch.setattr(truth, "save_figure", keep)
    samples = torch.zeros(len(items), 4, 16, 16)
    _, validation = _run_handler(batch, samples, tmp_path / "samples")
    _, evaluation = _run_handler(
        batch, samples, tmp_path / "eval", prefix="n4_mode_frequencies", phase="evaluation", split="test", name="cimd"
    )
    assert [p.name for p in validation.written] == ["mode_frequencies_epoch0001.png"]
    assert [p.name for p in evaluation.written] == ["n4_mode_frequencies.png"]
    assert titles["mode_frequencies_epoch0001.png"].startswith(
        "sampled vs true mode frequencies (epoch 1, N = 4 samples per image; mode TV "
    )
    evaluation_title = titles["n4_mode_frequencies.png"]
    assert evaluation_title.startswith(
        "cimd\nsampled vs true mode frequencies (evaluation, test split, N = 4 samples per image; mode TV "
    )
    assert "epoch" not in evaluation_title
