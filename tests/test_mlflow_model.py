"""The trained model as an MLflow model (issue #18): a ``pyfunc`` with a signature that draws N masks per image with
the bundle's own sampler, returns them with their mean and variance maps, and loads in a fresh process without the
bundle's files. (Serving over REST: test_mlflow_serving.py; logging at the end of a training:
test_mlflow_tracking.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from _bundle_runner import REPO, SMALL_SETTINGS, bundle_parser
from _tiny_mlflow_model import COMPONENTS, bundle_parsers, log_tiny_model
from mlflow.exceptions import MlflowException

from ambiseg_monai.reporting.mlflow_model import (
    checkpoint_state_dict,
    model_bundle_config,
    segmentation_outputs,
)

# the small networks are trained with 20 (cimd) timesteps: requests use fewer steps than the bundle's 50
STEPS = 2


@pytest.fixture(scope="module")
def cimd_model(small_demo_dataset, tmp_path_factory):
    return log_tiny_model("cimd", small_demo_dataset, tmp_path_factory.mktemp("cimd_model"))


@pytest.fixture(scope="module")
def cimd_pyfunc(cimd_model):
    return mlflow.pyfunc.load_model(cimd_model.folder, model_config={"device": "cpu"})


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 1, 16, 16), dtype=np.float32)


def test_logged_model_is_an_output_of_the_run_with_a_signature(cimd_model):
    client = mlflow.MlflowClient(cimd_model.tracking_uri)
    model = client.get_logged_model(cimd_model.logged.model_id)
    assert model.status == mlflow.entities.LoggedModelStatus.READY
    assert model.name == "model" and model.source_run_id == cimd_model.logged.run_id
    run = client.get_run(cimd_model.logged.run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [cimd_model.logged.model_id]
    info = mlflow.models.Model.load(cimd_model.folder)  # (get_model_info would look the id up in the default store)
    assert info.model_id == cimd_model.logged.model_id
    assert info.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # no pickle
    signature = info.signature
    (image,) = signature.inputs.inputs
    assert image.type == np.dtype(np.float32) and image.shape == (-1, 1, 16, 16)
    outputs = {spec.name: (spec.type, spec.shape) for spec in signature.outputs.inputs}
    assert outputs == {
        "masks": (np.dtype(np.uint8), (-1, -1, 16, 16)),
        "mean": (np.dtype(np.float32), (-1, 16, 16)),
        "variance": (np.dtype(np.float32), (-1, 16, 16)),
    }
    # the params are the bundle's inference settings (bundles/cimd/configs/inference.json)
    assert {p.name: p.default for p in signature.params.params} == {
        "num_samples": 16,
        "num_inference_steps": 50,
        "seed": 0,
    }
    serving_example = json.loads((Path(cimd_model.folder) / "serving_input_example.json").read_text())
    assert np.asarray(serving_example["inputs"]).shape == (1, 1, 16, 16)
    assert serving_example["params"] == {"num_samples": 16, "num_inference_steps": 50, "seed": 0}


def test_predict_returns_masks_mean_and_variance(cimd_pyfunc):
    out = cimd_pyfunc.predict(_images(2), params={"num_samples": 5, "num_inference_steps": STEPS, "seed": 3})
    assert sorted(out) == ["masks", "mean", "variance"]
    masks, mean, variance = out["masks"], out["mean"], out["variance"]
    assert masks.shape == (2, 5, 16, 16) and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    assert mean.shape == variance.shape == (2, 16, 16) and mean.dtype == variance.dtype == np.float32
    np.testing.assert_allclose(mean, masks.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(variance, mean * (1 - mean), atol=1e-6)  # binary masks: p (1 - p)
    assert 0 < masks.mean() < 1  # untrained, but not constant: the N samples differ
    one = cimd_pyfunc.predict(_images(1), params={"num_samples": 2, "num_inference_steps": STEPS})
    assert one["masks"].shape == (1, 2, 16, 16)


def test_predict_is_the_bundle_inference_sampler(cimd_model, cimd_pyfunc):
    """The same masks as the bundle's infer#inferer on the eager network (the evaluator passes dataset positions
    as image ids; the model passes the positions in the request)."""
    images = _images(3, seed=1)
    out = cimd_pyfunc.predict(images, params={"num_samples": 4, "num_inference_steps": STEPS, "seed": 7})
    configs = REPO / "bundles" / "cimd" / "configs"
    parser = bundle_parser(configs, "inference.json")  # as `monai.bundle run inferring` reads them
    parser.update({**SMALL_SETTINGS["cimd"], "dataset_dir": cimd_model.parser["dataset_dir"], "demo_dir": None})
    parser.update({"num_inference_samples": 4, "inference_steps": STEPS, "seed": 7, "infer#inferer#progress": False})
    previous = os.getcwd()
    os.chdir(REPO)  # the configs' %bundles/common/... macros
    try:
        inferer = parser.get_parsed_content("infer#inferer", instantiate=True)
    finally:
        os.chdir(previous)
    with torch.no_grad():
        expected = inferer(torch.from_numpy(images), cimd_model.network, image_ids=[0, 1, 2])
    np.testing.assert_array_equal(out["masks"], expected.numpy().astype(np.uint8))
    assert segmentation_outputs(expected)["mean"].tolist() == out["mean"].tolist()


def test_masks_depend_on_the_seed_and_position_not_on_the_batch(cimd_pyfunc):
    images = _images(2, seed=2)
    params = {"num_samples": 3, "num_inference_steps": STEPS}
    both = cimd_pyfunc.predict(images, params={**params, "seed": 11})["masks"]
    again = cimd_pyfunc.predict(images, params={**params, "seed": 11})["masks"]
    first_alone = cimd_pyfunc.predict(images[:1], params={**params, "seed": 11})["masks"]
    other_seed = cimd_pyfunc.predict(images, params={**params, "seed": 12})["masks"]
    np.testing.assert_array_equal(both, again)
    np.testing.assert_array_equal(both[:1], first_alone)
    assert (both != other_seed).any()


def test_bad_input_gives_a_short_error_naming_the_expected_shape(cimd_pyfunc):
    model = cimd_pyfunc.unwrap_python_model()
    with pytest.raises(MlflowException, match=r"takes images B x 1 x 16 x 16 .*got shape \(1, 2, 16, 16\)"):
        model.check_images(np.zeros((1, 2, 16, 16), np.float32))
    with pytest.raises(MlflowException, match=r"got shape \(16, 16\)"):
        model.check_images(np.zeros((16, 16), np.float32))
    with pytest.raises(MlflowException, match="NaN or infinite"):
        model.check_images(np.full((1, 1, 16, 16), np.nan, np.float32))
    # through the pyfunc, MLflow's signature check answers first, with the expected shape
    with pytest.raises(MlflowException, match=r"expected shape \(-1, 1, 16, 16\)"):
        cimd_pyfunc.predict(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(MlflowException, match="num_samples=0: sample, generation and step counts must be >= 1"):
        cimd_pyfunc.predict(_images(1), params={"num_samples": 0, "num_inference_steps": STEPS})
    # the bundle's scheduler checks the steps: this small model was trained with 20 timesteps
    with pytest.raises(MlflowException, match=r"num_inference_steps must be in \[1, 20\].*got 50"):
        cimd_pyfunc.predict(_images(1), params={"num_samples": 1})


def test_a_fresh_process_loads_the_model_by_its_uri_without_the_bundle_files(cimd_model, tmp_path):
    """``models:/<id>`` in a new interpreter, from a folder without ``bundles/``: the model carries its config."""
    script = (
        "import json, sys, numpy as np, mlflow\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = model.predict(np.full((2, 1, 16, 16), 0.5, np.float32), params={'num_samples': 3, "
        f"'num_inference_steps': {STEPS}, 'seed': 1}})\n"
        "print(json.dumps({k: [list(v.shape), str(v.dtype), float(v.min()), float(v.max())]\n"
        "                  for k, v in out.items()}))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": cimd_model.tracking_uri, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script, cimd_model.logged.model_uri],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "bundles").exists()
    shapes = json.loads(result.stdout.strip().splitlines()[-1])
    assert shapes["masks"][:2] == [[2, 3, 16, 16], "uint8"] and shapes["masks"][2:] in ([0, 1], [0, 0], [1, 1])
    assert shapes["mean"][:2] == [[2, 16, 16], "float32"] and 0 <= shapes["mean"][2] <= shapes["mean"][3] <= 1
    assert shapes["variance"][:2] == [[2, 16, 16], "float32"] and 0 <= shapes["variance"][3] <= 0.25


def test_consensus_model_fixes_the_rater_count_and_returns_one_mask_per_level(small_demo_dataset, tmp_path):
    """Consensus diffusion's inferer has one level per rater (``num_raters``, counted in the dataset): the model's
    config has the count written in; its requests set generations, not samples."""
    parser, inference = bundle_parsers("consensus_diffusion", small_demo_dataset)
    config = model_bundle_config(parser.get(), inference.get(), COMPONENTS, parser.get_parsed_content)
    assert config["num_raters"] == 4 and config["infer"]["inferer"]["num_levels"] == "@num_raters"
    assert config["dataset_path"].startswith("$")  # left as written: nothing the model builds refers to it
    with pytest.raises(ValueError, match="'num_raters'.*is computed from the dataset"):
        model_bundle_config(parser.get(), inference.get(), COMPONENTS)
    with pytest.raises(ValueError, match="has no 'infer#missing'"):
        model_bundle_config(parser.get(), inference.get(), ["infer#missing"], parser.get_parsed_content)

    tiny = log_tiny_model("consensus_diffusion", small_demo_dataset, tmp_path)
    model = mlflow.pyfunc.load_model(tiny.folder, model_config={"device": "cpu"})
    params = {p.name for p in model.metadata.signature.params.params}
    assert params == {"num_generations", "num_inference_steps", "seed"}
    out = model.predict(_images(2), params={"num_generations": 2, "num_inference_steps": STEPS})
    assert out["masks"].shape == (2, 4, 16, 16)  # the 4 consensus levels, from the union to the intersection
    np.testing.assert_allclose(out["mean"], out["masks"].mean(axis=1), atol=1e-6)


def test_latent_model_draws_the_requested_number_of_masks(small_demo_dataset, tmp_path):
    tiny = log_tiny_model("prob_unet", small_demo_dataset, tmp_path)
    model = mlflow.pyfunc.load_model(tiny.folder, model_config={"device": "cpu"})
    assert {p.name: p.default for p in model.metadata.signature.params.params} == {"num_samples": 16, "seed": 0}
    out = model.predict(_images(3), params={"num_samples": 6, "seed": 2})
    assert out["masks"].shape == (3, 6, 16, 16) and out["variance"].max() <= 0.25 + 1e-6
    again = model.predict(_images(3), params={"num_samples": 6, "seed": 2})
    np.testing.assert_array_equal(out["masks"], again["masks"])


def test_checkpoint_state_dict_takes_the_entry_and_drops_the_ddp_prefix(tmp_path):
    weights = {"layer.weight": torch.ones(2, 2), "layer.bias": torch.zeros(2)}
    path = tmp_path / "model.pt"
    torch.save({"ema": {f"module.{k}": v for k, v in weights.items()}, "network": weights}, path)
    assert checkpoint_state_dict(path, "ema").keys() == weights.keys()
    assert torch.equal(checkpoint_state_dict(path, "network")["layer.weight"], weights["layer.weight"])
    with pytest.raises(ValueError, match=r"has no 'model' entry \(it holds ema, network\)"):
        checkpoint_state_dict(path, "model")
    with pytest.raises(ValueError, match="has no plain state dict"):
        checkpoint_state_dict(path)  # the whole checkpoint is a dict of dicts
    # a best_model_dict of one entry ({"network": net}) is saved by Ignite as the plain state dict, as loaded
    torch.save(weights, path)
    assert torch.equal(checkpoint_state_dict(path, "network")["layer.bias"], weights["layer.bias"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoint_state_dict(tmp_path / "missing.pt", "ema")
