"""Ignite handlers: engine.state.metrics / metric_details against hand-computed values, the rater mask taken
from engine.state.batch, decollated outputs of a MONAI SupervisedEvaluator, soft-map selection, published
names with prefix / suffix (the bundles' ``*_pp`` and ``soft_dice_5`` entries), MetricsSaver and
PerImageMetricsWriter."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.handlers import MetricsSaver
from monai.inferers import Inferer

from ambiseg_monai.bundle.config import merged_config
from ambiseg_monai.handlers import AmbiguousSegmentationMetricsHandler, CaseIdMeta, PerImageMetricsWriter
from ambiseg_monai.metrics import CONSENSUS_PAPER_THRESHOLDS, DEFAULT_HANDLER_METRICS, soft_dice
from test_metrics_cumulative import two_batches  # noqa: E402  (tests/ is on sys.path)

CASE_IDS = ["basic", "both_empty", "only_preds_empty", "single_rater"]
BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def batches_with_rater_mask():
    (p1, r1, _), (p2, r2, m2), expected = two_batches()
    all_real = torch.ones(2, 2, dtype=torch.bool)
    data = [
        {"pred": p1, "label": r1, "rater_mask": all_real, "case_id": CASE_IDS[:2]},
        {"pred": p2, "label": r2, "rater_mask": m2, "case_id": CASE_IDS[2:]},
    ]
    return data, expected


def engine_passing_through() -> Engine:
    """An evaluator stand-in: output = {"pred", "label"} of the batch; the rater mask stays in the batch."""
    return Engine(lambda engine, batch: {"pred": batch["pred"], "label": batch["label"]})


def test_suite_handler_publishes_stable_names_and_details():
    data, expected = batches_with_rater_mask()
    engine = engine_passing_through()
    AmbiguousSegmentationMetricsHandler().attach(engine, "ci")
    engine.run(data)
    assert set(engine.state.metrics) == set(DEFAULT_HANDLER_METRICS)
    for name in DEFAULT_HANDLER_METRICS:
        want = torch.tensor([e[name] for e in expected], dtype=torch.float64)
        assert engine.state.metrics[name] == pytest.approx(want.mean().item(), abs=1e-7), name
        assert isinstance(engine.state.metrics[name], float)
        details = engine.state.metric_details[name]
        assert details.shape == (4, 1)
        assert torch.allclose(details[:, 0], want, atol=1e-7), name
    # hand-computed means of two headline metrics, spelled out
    assert engine.state.metrics["ged"] == pytest.approx((0.5 + 0 + 1.75 + 1 / 3) / 4)
    assert engine.state.metrics["ci"] == pytest.approx((15 / 22 + 1 + 0 + 0.6) / 4)


def test_suite_handler_resets_each_epoch_and_handles_missing_rater_mask():
    data, expected = batches_with_rater_mask()
    first_batch = [{k: v for k, v in data[0].items() if k != "rater_mask"}]  # all raters real
    engine = engine_passing_through()
    AmbiguousSegmentationMetricsHandler(metrics=["ged", "s_ncc"]).attach(engine, "ged")
    engine.run(first_batch, max_epochs=2)
    assert engine.state.metrics["ged"] == pytest.approx((expected[0]["ged"] + expected[1]["ged"]) / 2)
    assert engine.state.metrics["s_ncc"] == pytest.approx((0.5 + 1.0) / 2, abs=1e-7)
    assert engine.state.metric_details["ged"].shape == (2, 1)  # second epoch only


def test_suite_handler_uses_soft_map_when_output_has_one():
    data, _ = batches_with_rater_mask()
    soft = torch.zeros(2, 1, 4)  # all-empty soft maps
    engine = Engine(lambda e, b: {"pred": b["pred"], "label": b["label"], "pred_soft": soft})
    AmbiguousSegmentationMetricsHandler(metrics=["soft_dice"]).attach(engine, "soft_dice")
    engine.run(data[:1])
    s = 1e-6
    # basic: soft GT [1,.5,0,0] vs empty: τ <= .5 -> s/(2+s), τ > .5 -> s/(1+s); both_empty: 1
    basic = (5 * s / (2 + s) + 4 * s / (1 + s)) / 9
    assert engine.state.metrics["soft_dice"] == pytest.approx((basic + 1.0) / 2)
    # soft_pred_key=None ignores the soft map and uses the sample mean
    engine = Engine(lambda e, b: {"pred": b["pred"], "label": b["label"], "pred_soft": soft})
    AmbiguousSegmentationMetricsHandler(metrics=["soft_dice"], soft_pred_key=None).attach(engine, "soft_dice")
    engine.run(data[:1])
    sample_mean = ((5 * (4 + s) / (5 + s) + 4 * s / (2 + s)) / 9 + 1.0) / 2
    assert engine.state.metrics["soft_dice"] == pytest.approx(sample_mean)


def test_suite_handler_reports_missing_output_key():
    engine = Engine(lambda e, b: {"label": b["label"]})
    AmbiguousSegmentationMetricsHandler().attach(engine, "ci")
    data, _ = batches_with_rater_mask()
    with pytest.raises(KeyError, match="no 'pred' entry"):
        engine.run(data)


def test_prefix_and_suffix_publish_a_second_set_of_names():
    """Two handlers on one engine: the samples, and the same metrics of other samples under ``*_pp``."""
    data, expected = batches_with_rater_mask()
    engine = Engine(lambda e, b: {"pred": b["pred"], "pred_pp": torch.zeros_like(b["pred"]), "label": b["label"]})
    AmbiguousSegmentationMetricsHandler(metrics=["ged", "ci"]).attach(engine, "ged")
    pp = AmbiguousSegmentationMetricsHandler(metrics=["ged", "ci"], pred_key="pred_pp", suffix="_pp")
    pp.attach(engine, "ged_pp")
    AmbiguousSegmentationMetricsHandler(metrics=["hm_iou"], prefix="val_").attach(engine, "val_hm_iou")
    engine.run(data)
    assert set(engine.state.metrics) == {"ged", "ci", "ged_pp", "ci_pp", "val_hm_iou"}
    assert set(engine.state.metric_details) == {"ged", "ci", "ged_pp", "ci_pp", "val_hm_iou"}
    assert engine.state.metrics["ged"] == pytest.approx(sum(e["ged"] for e in expected) / 4)
    assert engine.state.metrics["val_hm_iou"] == pytest.approx(sum(e["hm_iou"] for e in expected) / 4)
    # empty samples: CI 0 except on the image whose raters are all empty as well (CI 1)
    assert engine.state.metrics["ci_pp"] == pytest.approx(1 / 4)
    assert engine.state.metric_details["ged_pp"].shape == (4, 1)


def _bundle_metrics(bundle: str, files: list[str], config_id: str) -> dict:
    """The metric handlers a bundle config builds at ``config_id`` (the shared base merged in)."""
    config = merged_config([str(BUNDLES / bundle / "configs" / f) for f in files], root=BUNDLES.parent)
    return ConfigParser(config).get_parsed_content(config_id)


@pytest.mark.parametrize(
    "files, config_id, names",
    [
        (["train.json"], "validate#additional_metrics", {"ged_pp", "ci_pp", "cross_pair_dice_pp"}),
        (
            ["train.json", "evaluate.json"],
            "evaluate#n4#additional_metrics",
            {"ged_pp", "ci_pp", "dmax_pp", "cross_pair_dice_pp"},
        ),
    ],
)
def test_ambdiffseg_post_processed_metrics_keep_their_names(files, config_id, names):
    """AmbDiffSeg's extra metrics of the post-processed samples (``pred_pp``): the names MLflow, the reports
    and the bundle docs use, with the values of the samples they are computed on."""
    data, expected = batches_with_rater_mask()
    engine = Engine(lambda e, b: {"pred": torch.zeros_like(b["pred"]), "pred_pp": b["pred"], "label": b["label"]})
    for name, handler in _bundle_metrics("ambdiffseg", files, config_id).items():
        handler.attach(engine, name)
    engine.run(data)
    assert set(engine.state.metrics) == names
    for name in names:
        metric = name.removesuffix("_pp")
        assert engine.state.metrics[name] == pytest.approx(sum(e[metric] for e in expected) / 4, abs=1e-7), name
    details = set(getattr(engine.state, "metric_details", {}))
    assert details == (names if "evaluate" in config_id else set())  # per-image tables only in the evaluation


@pytest.mark.parametrize(
    "files, config_id",
    [(["train.json"], "validate#additional_metrics"), (["train.json", "evaluate.json"], "evaluate#additional_metrics")],
)
def test_consensus_soft_dice_5_reads_the_soft_map(files, config_id):
    """consensus diffusion's ``soft_dice_5``: the five-threshold soft Dice of the output's soft map."""
    data, _ = batches_with_rater_mask()
    soft = torch.tensor([[[0.0, 0.3, 0.55, 1.0]], [[0.2, 0.2, 0.8, 0.4]]])  # B x 1 x 4
    engine = Engine(lambda e, b: {"pred": b["pred"], "label": b["label"], "pred_soft": soft})
    for name, handler in _bundle_metrics("consensus_diffusion", files, config_id).items():
        handler.attach(engine, name)
    engine.run(data[:1])
    want = soft_dice(soft, data[0]["label"], CONSENSUS_PAPER_THRESHOLDS, rater_mask=data[0]["rater_mask"])
    assert set(engine.state.metrics) == {"soft_dice_5"}
    assert engine.state.metrics["soft_dice_5"] == pytest.approx(want.mean().item(), abs=1e-12)
    # not the soft Dice of the samples' mean: the handler reads the output's soft map
    of_samples = soft_dice(data[0]["pred"].float().mean(1), data[0]["label"], CONSENSUS_PAPER_THRESHOLDS,
                           rater_mask=data[0]["rater_mask"])  # fmt: skip
    assert not torch.allclose(of_samples, want)


class FixedSamplesInferer(Inferer):
    """Returns pre-stored B x N x H x W samples, looked up by the case index written in the image."""

    def __init__(self, samples: torch.Tensor) -> None:
        super().__init__()
        self.samples = samples

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        return self.samples[inputs[:, 0, 0, 0].long()]


def test_supervised_evaluator_with_metrics_saver(tmp_path):
    """A MONAI SupervisedEvaluator (decollated outputs) with the suite as key metric and a per-image CSV."""
    data, expected = batches_with_rater_mask()
    samples = torch.cat([d["pred"] for d in data])
    labels = torch.cat([d["label"] for d in data])
    masks = torch.cat([d["rater_mask"] for d in data])
    items = [
        {"image": torch.full((1, 1, 4), float(i)), "label": labels[i], "rater_mask": masks[i], "case_id": CASE_IDS[i]}
        for i in range(4)
    ]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(items, batch_size=2),
        network=torch.nn.Identity(),
        inferer=FixedSamplesInferer(samples),
        key_val_metric={"ci": AmbiguousSegmentationMetricsHandler()},
        additional_metrics={"ged_alone": AmbiguousSegmentationMetricsHandler(metrics=["ged"], suffix="_alone")},
        val_handlers=[
            MetricsSaver(save_dir=str(tmp_path), metric_details="*", batch_transform=CaseIdMeta()),
            PerImageMetricsWriter(tmp_path / "eval", prefix="n4_"),
        ],
    )
    evaluator.run()
    for name in DEFAULT_HANDLER_METRICS:
        want = sum(e[name] for e in expected) / 4
        assert evaluator.state.metrics[name] == pytest.approx(want, abs=1e-7), name
    assert evaluator.state.metrics["ged_alone"] == pytest.approx(evaluator.state.metrics["ged"], abs=1e-6)
    assert evaluator.state.best_metric == pytest.approx(evaluator.state.metrics["ci"])
    with open(tmp_path / "ci_raw.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "class0", "mean"]
    assert [r[0] for r in rows[1:]] == CASE_IDS
    assert [float(r[1]) for r in rows[1:]] == pytest.approx([round(e["ci"], 4) for e in expected], abs=1e-4)
    metrics_csv = (tmp_path / "metrics.csv").read_text()
    assert "hm_iou," in metrics_csv and "ged_alone," in metrics_csv
    # the reporting's table: one row per case, one column per published metric, full precision
    with open(tmp_path / "eval" / "n4_per_image.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["case_id"] for r in table] == CASE_IDS
    assert set(table[0]) == {"case_id", "ged_alone", *DEFAULT_HANDLER_METRICS}
    assert [float(r["ci"]) for r in table] == pytest.approx([e["ci"] for e in expected], abs=1e-6)
    summary = json.loads((tmp_path / "eval" / "n4_summary.json").read_text())
    assert summary["ged"]["num_images"] == 4
    assert summary["ged"]["mean"] == pytest.approx(evaluator.state.metrics["ged"], abs=1e-6)


def test_per_image_writer_needs_details_and_case_ids(tmp_path):
    data, _ = batches_with_rater_mask()
    engine = engine_passing_through()
    AmbiguousSegmentationMetricsHandler(save_details=False).attach(engine, "ci")
    PerImageMetricsWriter(tmp_path).attach(engine)
    with pytest.raises(RuntimeError, match="no per-image metric details"):
        engine.run(data)
    engine = engine_passing_through()
    AmbiguousSegmentationMetricsHandler().attach(engine, "ci")
    PerImageMetricsWriter(tmp_path, id_key="patient").attach(engine)
    with pytest.raises(KeyError, match="no 'patient' entry"):
        engine.run(data)


def test_case_id_meta_accepts_collated_and_decollated_batches():
    assert CaseIdMeta()({"case_id": ["a", "b"]}) == [{"filename_or_obj": "a"}, {"filename_or_obj": "b"}]
    assert CaseIdMeta("id")([{"id": 3}, {"id": 4}]) == [{"filename_or_obj": "3"}, {"filename_or_obj": "4"}]
    with pytest.raises(KeyError, match="no 'case_id' entry"):
        CaseIdMeta()({"image": torch.zeros(1)})


def test_mlflow_handler_logs_every_published_metric(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from monai.handlers import MLFlowHandler

    data, expected = batches_with_rater_mask()
    engine = engine_passing_through()
    AmbiguousSegmentationMetricsHandler().attach(engine, "ci")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MLFlowHandler(
        tracking_uri=tracking_uri,
        experiment_name="metrics_test",
        iteration_log=False,
        output_transform=lambda output: None,
        artifacts=None,
    ).attach(engine)
    engine.run(data)
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("metrics_test").experiment_id])[0]
    assert set(DEFAULT_HANDLER_METRICS) <= set(run.data.metrics)
    assert run.data.metrics["ged"] == pytest.approx(sum(e["ged"] for e in expected) / 4)
