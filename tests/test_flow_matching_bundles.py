"""The flow-matching overlays of the CIMD and AmbDiffSeg bundles: what they change, and train / evaluate / infer.

``flow_matching.json`` replaces the schedulers (and, for AmbDiffSeg, the prediction type and the x-space
weighting) and nothing else: same denoiser, conditioning, label strategy and rater-posterior targets. A
short demo training with each overlay lowers the velocity loss; evaluation and inference run with the
overlay stacked before ``evaluate.json`` / ``inference.json``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import nibabel as nib
import numpy as np
import pytest
from _bundle_runner import SMALL_SETTINGS, bundle_parser
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow

from ambiseg_monai.schedulers import RectifiedFlowHeunScheduler, RectifiedFlowScheduler

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
OVERLAY = "flow_matching.json"
TINY = {
    "cimd": {**SMALL_SETTINGS["cimd"], "amp": False, "inference_steps": 2, "num_inference_samples": 2},
    "ambdiffseg": {**SMALL_SETTINGS["ambdiffseg"], "num_inference_steps": 2, "num_inference_samples": 2},
}
EPOCHS, ITERATIONS = 12, 3


def _configs(bundle: str, *names: str) -> list[str]:
    return [str(BUNDLES / bundle / "configs" / name) for name in names]


def _run(bundle: str, files: list[str], run_id: str, **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=_configs(bundle, *files), workflow_type=None, run_id=run_id, **{**TINY[bundle], **overrides}
    )
    workflow.initialize()
    return workflow


@pytest.mark.parametrize("bundle", ["cimd", "ambdiffseg"])
def test_overlay_changes_the_schedulers_only(bundle):
    base, flow = bundle_parser(BUNDLES / bundle / "configs"), bundle_parser(BUNDLES / bundle / "configs", OVERLAY)
    for parser in (base, flow):
        parser.update({"unet_channels": [8, 16], "unet_norm_groups": 4, "unet_head_channels": 8})
    for name in ("noise_scheduler", "sampling_scheduler"):
        scheduler = flow.get_parsed_content(name)
        assert isinstance(scheduler, RectifiedFlowScheduler) and scheduler.prediction_type == "flow"
    assert flow.get_parsed_content("train#inferer").weighting is None  # the velocity MSE
    assert flow["label_strategy"] == base["label_strategy"]
    assert flow["rater_posterior_targets"] is True and flow["train#inferer"] == base["train#inferer"] | (
        {"weighting": None} if bundle == "ambdiffseg" else {}
    )
    base_net, flow_net = base.get_parsed_content("network_def"), flow.get_parsed_content("network_def")
    assert type(base_net) is type(flow_net)
    if bundle == "cimd":
        # the same U-Net and AMN / ACN, without the learned-variance channel (no VLB under flow matching)
        assert base_net.denoiser.out_channels == 2 and flow_net.denoiser.out_channels == 1
        assert flow_net.amn is not None and flow.get_parsed_content("sampling_scheduler").time_scale == 1000
        assert flow.get_parsed_content("output_dir") == "runs/cimd_flow_matching"
    else:
        assert sum(p.numel() for p in base_net.parameters()) == sum(p.numel() for p in flow_net.parameters())
        assert flow.get_parsed_content("sampling_scheduler").shift == 10.0
        assert flow.get_parsed_content("output_dir") == "runs/ambdiffseg_flow_matching"


@pytest.mark.parametrize("bundle, key", [("cimd", "noise_scheduler"), ("ambdiffseg", "sampling_scheduler")])
def test_the_solver_is_one_override_as_the_docs_say(bundle, key):
    parser = bundle_parser(BUNDLES / bundle / "configs", OVERLAY, "inference.json")
    parser.update({f"{key}#_target_": "ambiseg_monai.schedulers.RectifiedFlowHeunScheduler"})
    assert isinstance(parser.get_parsed_content("infer#inferer").scheduler, RectifiedFlowHeunScheduler)


@pytest.mark.parametrize("bundle", ["cimd", "ambdiffseg"])
def test_train_evaluate_and_infer_with_the_overlay(bundle, small_demo_dataset, tmp_path):
    settings = {
        "dataset_dir": small_demo_dataset, "demo_dir": None, "output_dir": str(tmp_path / "run"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
    }  # fmt: skip
    training = _run(
        bundle, ["train.json", OVERLAY], "training", max_epochs=EPOCHS, iterations_per_epoch=ITERATIONS,
        val_interval=EPOCHS, **settings,
    )  # fmt: skip
    trainer = training.parser.get_parsed_content("train#trainer")
    loss_terms = training.parser.get_parsed_content("train#loss_terms")
    terms: list[dict[str, float]] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: terms.append(loss_terms(engine.state.output)))
    training.run()
    training.finalize()
    assert len(terms) == EPOCHS * ITERATIONS
    assert "l_vlb" not in terms[0] and ("l_amb" in terms[0]) == (bundle == "cimd")
    first, last = (np.mean([t["l_simple"] for t in part]) for part in (terms[:6], terms[-6:]))
    assert last < 0.8 * first, f"velocity loss {first:.3f} -> {last:.3f}"

    # the MLflow model logged at the end samples with the flow solver (it carries the executed config)
    client = mlflow.MlflowClient(settings["tracking_uri"])
    experiment = client.get_experiment_by_name(training.parser.get_parsed_content("experiment_name"))
    (run,) = client.search_runs([experiment.experiment_id])
    model = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    pyfunc = mlflow.pyfunc.load_model(
        url2pathname(urlparse(model.artifact_location).path), model_config={"device": "cpu"}
    )
    served = ConfigParser(pyfunc.unwrap_python_model().config).get_parsed_content("infer#inferer")
    assert isinstance(served.scheduler, RectifiedFlowScheduler)
    out = pyfunc.predict(np.random.default_rng(0).random((1, 1, 16, 16), np.float32), params={"num_samples": 2})
    assert out["masks"].shape == (1, 2, 16, 16)

    evaluation = _run(bundle, ["train.json", OVERLAY, "evaluate.json"], "evaluating", **settings)
    assert isinstance(evaluation.parser.get_parsed_content("evaluate#n4#inferer").scheduler, RectifiedFlowScheduler)
    evaluation.run()
    evaluation.finalize()
    for n in (4, 16):
        rows = list(csv.DictReader((tmp_path / "run" / "eval" / f"n{n}_per_image.csv").open(encoding="utf-8")))
        assert len(rows) == 4 and all(0.0 <= float(r["ged"]) <= 2.0 for r in rows)

    out = tmp_path / "inference"
    inference = _run(bundle, ["train.json", OVERLAY, "inference.json"], "inferring", inference_dir=str(out), **settings)
    inference.run()
    inference.finalize()
    samples = sorted(out.glob("*_samples.nii.gz"))
    assert len(samples) == 4
    for path in samples:
        masks = np.asanyarray(nib.load(path).dataobj)
        assert masks.shape == (16, 16, 1, 2) and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}

    if bundle == "cimd":  # the flow network has no variance channel: the DDPM configs cannot load it silently
        with pytest.raises(Exception) as raised:  # MONAI wraps the loading error: its cause is checked below
            _run(bundle, ["train.json", "evaluate.json"], "evaluating", **settings).run()
        error, messages = raised.value, []
        while error is not None:
            messages.append(str(error))
            error = error.__cause__ or error.__context__
        assert "size mismatch for denoiser.unet.out" in " | ".join(messages)
