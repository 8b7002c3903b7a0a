"""The deploy app's CPU inference engine option (``--engine``, ``--precision``): same masks as the torch path.

Tolerance (float32 engines vs the torch path, same seeds): that of tests/test_cpu_engine.py, at most
``MAX_DIFFERENT_PIXELS`` (0.1 %) of the mask pixels different; on the tiny exported model here they are
identical. The engine runs skip when the engine's package is absent; the missing-package and
unknown-name errors are tested always (tests marked ``deploy_sdk`` need the deploy extra, see
tests/conftest.py).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from test_cpu_engine import ENGINES, MAX_DIFFERENT_PIXELS, _failing_import, _installed
from test_deploy import model_path  # noqa: F401 - the module's tiny exported CIMD-style model.ts (a fixture)
from test_export import DIFFUSION_CONFIG, write_bundle

import ambiseg_monai.inferers.cpu_engine as cpu_engine
from ambiseg_monai.deploy.__main__ import main as deploy_main
from ambiseg_monai.deploy.export import export_bundle
from ambiseg_monai.deploy.predictor import AmbiguousSlicePredictor
from ambiseg_monai.deploy.volumes import write_nifti_volume

needs_onnxruntime = pytest.mark.skipif(
    not _installed("onnxruntime"), reason="onnxruntime (or onnx) not installed: the cpu-engines extra"
)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """2 x 16 x 16 HU slices: the model's own grid."""
    return np.random.default_rng(0).uniform(-1000, 400, size=(2, 16, 16)).astype(np.float32)


def _assert_close_masks(engine_masks: np.ndarray, torch_masks: np.ndarray) -> None:
    assert engine_masks.shape == torch_masks.shape
    assert (engine_masks != torch_masks).mean() <= MAX_DIFFERENT_PIXELS


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_masks_match_the_torch_path(engine, model_path, volume):  # noqa: F811
    expected = AmbiguousSlicePredictor(model_path).predict(volume)
    predictor = AmbiguousSlicePredictor(model_path, engine=engine, batch_size=1)
    assert predictor.inferer.engine == engine and predictor.inferer.autocast_dtype is None  # float32
    prediction = predictor.predict(volume)
    assert 0 < expected.samples.mean() < 1  # masks that can differ
    _assert_close_masks(prediction.samples, expected.samples)
    np.testing.assert_allclose(prediction.mean, prediction.samples.mean(axis=1), atol=1e-6)


@needs_onnxruntime
def test_class_labels_reach_the_engine(tmp_path, volume):
    config = json.loads(json.dumps(DIFFUSION_CONFIG))
    config["network_def"]["num_class_embeds"] = 3
    model = tmp_path / "model.ts"
    export_bundle(write_bundle(tmp_path / "bundle", config), model, class_label=1)
    for label in (0, 2):
        expected = AmbiguousSlicePredictor(model, class_label=label).predict(volume)
        masks = AmbiguousSlicePredictor(model, class_label=label, engine="onnxruntime").predict(volume).samples
        _assert_close_masks(masks, expected.samples)
    with pytest.raises(ValueError, match="traced with class labels"):
        AmbiguousSlicePredictor(model, engine="onnxruntime").predict(volume)  # the exported model's own check


def test_the_defaults_leave_the_bundle_inferer_unchanged(model_path):  # noqa: F811
    inferer = AmbiguousSlicePredictor(model_path).inferer
    assert inferer.engine == "torch" and inferer.autocast_dtype is None
    assert AmbiguousSlicePredictor(model_path, precision="bfloat16").inferer.autocast_dtype == torch.bfloat16


@pytest.mark.skipif(not _installed("openvino"), reason="openvino (or onnx) not installed: the cpu-engines extra")
def test_openvino_bfloat16_reaches_the_inferer(model_path):  # noqa: F811
    inferer = AmbiguousSlicePredictor(model_path, engine="openvino", precision="bfloat16").inferer
    assert inferer.engine == "openvino" and inferer.autocast_dtype == torch.bfloat16


@pytest.mark.parametrize("package", ["onnxruntime", "onnx"])
def test_a_missing_engine_fails_before_the_model_is_read(package, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_engine.importlib, "import_module", _failing_import(package))
    with pytest.raises(ImportError) as raised:
        AmbiguousSlicePredictor(tmp_path / "no_model.ts", engine="onnxruntime")  # not FileNotFoundError
    message = str(raised.value)
    assert f"'{package}'" in message and "pip install onnxruntime==" in message and "\n" not in message


def test_unknown_or_impossible_engine_settings_are_named(model_path, tmp_path):  # noqa: F811
    for kwargs, match in [
        ({"engine": "tensorrt"}, r"engine must be one of \('torch', 'onnxruntime', 'openvino'\), got 'tensorrt'"),
        ({"precision": "float16"}, "precision must be one of"),
        ({"engine": "onnxruntime", "precision": "bfloat16"}, "bfloat16 is available with engine='openvino'"),
        ({"engine": "openvino", "device": "cuda"}, "runs on the CPU"),
    ]:
        with pytest.raises(ValueError, match=match):
            AmbiguousSlicePredictor(model_path, **kwargs)
    with pytest.raises(SystemExit):  # argparse: the choices, exit status 2
        deploy_main(["-i", str(tmp_path), "-m", str(model_path), "--engine", "tensorrt"])


def test_a_latent_model_refuses_engine_settings(tmp_path):
    config = {
        "network_def": {
            "_target_": "ambiseg_monai.networks.prob_unet.ProbabilisticUNet",
            "in_channels": 1,
            "channels": [4, 8],
            "num_res_units": 1,
        },
        "inferer": {"_target_": "ambiseg_monai.inferers.latent.LatentSampleInferer", "num_samples": 2},
    }
    model = tmp_path / "model.ts"
    export_bundle(write_bundle(tmp_path / "bundle", config), model)
    # a precision is refused the same way (and needs no engine package)
    with pytest.raises(ValueError, match="apply to diffusion models; this exported model is a 'latent' one"):
        AmbiguousSlicePredictor(model, precision="bfloat16")
    assert AmbiguousSlicePredictor(model).inferer.num_samples == 2  # the defaults run it as before


# ----------------------------------------------------------------------------------- the application


@pytest.mark.deploy_sdk
@pytest.mark.parametrize("how", ["option", "environment"])
def test_launcher_names_a_missing_engine_before_any_work(how, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cpu_engine.importlib, "import_module", _failing_import("onnxruntime"))
    args = ["-i", str(tmp_path / "no_input"), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "no_model.ts")]
    if how == "option":
        args += ["--engine", "onnxruntime"]
    else:
        monkeypatch.setenv("AMBISEG_DEPLOY_ENGINE", "onnxruntime")
    assert deploy_main(args) == 1
    error = capsys.readouterr().err
    assert error.startswith("ambiseg-deploy: error: engine='onnxruntime' needs 'onnxruntime'")
    assert "pip install onnxruntime==" in error and error.count("\n") == 1  # one line, before input and model
    assert not (tmp_path / "out").exists()


@pytest.mark.deploy_sdk
def test_launcher_names_an_unknown_engine_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AMBISEG_DEPLOY_ENGINE", "tensorrt")  # argparse does not check a default
    assert deploy_main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path)]) == 1
    assert "engine must be one of" in capsys.readouterr().err


@pytest.mark.deploy_sdk
@needs_onnxruntime
def test_application_with_onnxruntime_writes_the_torch_masks(model_path, tmp_path):  # noqa: F811
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    volume = np.random.default_rng(1).uniform(-1000, 400, size=(2, 20, 24)).astype(np.float32)  # D x H x W
    write_nifti_volume(tmp_path / "ct.nii.gz", volume, affine)
    masks = {}
    for engine in ("torch", "onnxruntime"):
        out = tmp_path / engine
        args = ["-i", str(tmp_path / "ct.nii.gz"), "-o", str(out), "-m", str(model_path), "-l", "WARNING"]
        assert deploy_main([*args, "--engine", engine]) == 0
        masks[engine] = np.asarray(nib.load(out / "samples.nii.gz").dataobj)
    assert 0 < masks["torch"].mean() < 1
    _assert_close_masks(masks["onnxruntime"], masks["torch"])
