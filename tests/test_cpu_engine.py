"""The N-sample inferer's CPU engines (``engine="onnxruntime"`` / ``"openvino"``): same masks as PyTorch.

Tolerance (float32 engines vs the PyTorch path, same seeds): the soft output (``sample_values=
"continuous"``) within 1e-3 everywhere, and at most 0.1 % of the binary mask pixels different (a pixel
whose final x_0 lies within rounding of the threshold may flip; on the networks here none does).
The engine tests skip when the engine's package is absent; the missing-package error is tested always.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
from _bundle_runner import bundle_parser

import ambiseg_monai.inferers.cpu_engine as cpu_engine
from ambiseg_monai.inferers.cpu_engine import ENGINE_PACKAGES, CPUEngineDenoiser, require_engine
from ambiseg_monai.inferers.diffusion import DiffusionSamplingInferer
from ambiseg_monai.networks.cimd import CIMDNetwork
from ambiseg_monai.networks.denoisers import ConcatConditionedDenoiser
from ambiseg_monai.schedulers.respaced import RespacedDDPMScheduler

REPO = Path(__file__).resolve().parents[1]
SOFT_TOLERANCE = 1e-3
MAX_DIFFERENT_PIXELS = 1e-3


def _installed(engine: str) -> bool:
    try:
        require_engine(engine)
    except ImportError:
        return False
    return True


ENGINES = [
    pytest.param(
        engine,
        marks=pytest.mark.skipif(
            not _installed(engine), reason=f"{engine} (or onnx) not installed: the cpu-engines extra"
        ),
    )
    for engine in ("onnxruntime", "openvino")
]


def _randomise(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (the U-Net's output convolution starts at zero, which would hide differences)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return network


@pytest.fixture(scope="module")
def cimd_network():
    denoiser = ConcatConditionedDenoiser(
        image_channels=1, mask_channels=1, channels=(8, 16), norm_num_groups=4, num_head_channels=8
    )
    return _randomise(CIMDNetwork(denoiser), 0).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def _inferer(engine: str, sample_values: str = "binary", **kwargs) -> DiffusionSamplingInferer:
    scheduler = RespacedDDPMScheduler(num_train_timesteps=100, variance_type="learned_range", clip_sample=True)
    return DiffusionSamplingInferer(
        scheduler, num_samples=4, num_inference_steps=5, seed=3, engine=engine, sample_values=sample_values, **kwargs
    )


def _assert_close_masks(engine_masks: torch.Tensor, torch_masks: torch.Tensor) -> None:
    assert engine_masks.shape == torch_masks.shape
    assert (engine_masks != torch_masks).float().mean().item() <= MAX_DIFFERENT_PIXELS


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_masks_match_the_pytorch_path(engine, cimd_network, images):
    ids = ["a", "b"]
    expected = _inferer("torch")(images, cimd_network, image_ids=ids)
    masks = _inferer(engine, max_rows=4)(images, cimd_network, image_ids=ids)
    assert set(masks.unique().tolist()) <= {0.0, 1.0} and 0.0 < expected.mean().item() < 1.0
    _assert_close_masks(masks, expected)
    soft_expected = _inferer("torch", "continuous")(images, cimd_network, image_ids=ids)
    soft = _inferer(engine, "continuous")(images, cimd_network, image_ids=ids)
    assert (soft - soft_expected).abs().max().item() <= SOFT_TOLERANCE
    # another image size runs on the same export (height and width are dynamic axes)
    larger = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    _assert_close_masks(_inferer(engine)(larger, cimd_network), _inferer("torch")(larger, cimd_network))


@pytest.mark.parametrize("engine", ENGINES)
def test_new_weights_are_exported_again(engine, images):
    denoiser = ConcatConditionedDenoiser(channels=(8, 16), norm_num_groups=4, num_head_channels=8)
    network = _randomise(CIMDNetwork(denoiser), 1).eval()
    inferer = _inferer(engine)
    inferer(images, network, image_ids=["a", "b"])
    network.load_state_dict(_randomise(CIMDNetwork(denoiser), 2).state_dict())  # a new checkpoint, in place
    _assert_close_masks(
        inferer(images, network, image_ids=["a", "b"]), _inferer("torch")(images, network, image_ids=["a", "b"])
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_class_labels_reach_the_engine(engine, images):
    denoiser = ConcatConditionedDenoiser(channels=(8, 16), norm_num_groups=4, num_head_channels=8, num_class_embeds=3)
    network = _randomise(denoiser, 4).eval()
    labels = [0, 1, 2, 0]
    expected = _inferer("torch", sample_labels=labels)(images, network, image_ids=["a", "b"])
    _assert_close_masks(_inferer(engine, sample_labels=labels)(images, network, image_ids=["a", "b"]), expected)


def _failing_import(package: str):
    """``importlib.import_module`` as if ``package`` were not installed."""
    real_import = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name == package:
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    return import_module


@pytest.mark.parametrize(
    "engine, package", [("onnxruntime", "onnxruntime"), ("openvino", "openvino"), ("onnxruntime", "onnx")]
)
def test_a_missing_engine_names_the_package_and_the_pip_command(engine, package, monkeypatch):
    monkeypatch.setattr(cpu_engine.importlib, "import_module", _failing_import(package))
    scheduler = RespacedDDPMScheduler(num_train_timesteps=100, variance_type="learned_range")
    with pytest.raises(ImportError) as raised:
        DiffusionSamplingInferer(scheduler, engine=engine)  # at construction, before any image
    message = str(raised.value)
    assert f"'{package}'" in message and "pip install" in message and f"{package}==" in message
    assert "\n" not in message and len(message) < 200


def test_the_cimd_inference_config_passes_its_engine_switch_to_the_inferer(monkeypatch):
    monkeypatch.chdir(REPO)  # the bundles name their shared configs relative to the repository root
    parser = bundle_parser(REPO / "bundles" / "cimd" / "configs", "inference.json")
    assert parser["engine"] == "torch" and parser.get_parsed_content("infer#inferer").engine == "torch"
    monkeypatch.setattr(cpu_engine.importlib, "import_module", _failing_import("onnxruntime"))
    parser["engine"] = "onnxruntime"  # what `--engine onnxruntime` on the command line sets
    with pytest.raises(RuntimeError) as raised:  # MONAI's "Failed to instantiate component", from our error
        parser.get_parsed_content("infer#inferer")
    assert isinstance(raised.value.__cause__, ImportError) and "pip install" in str(raised.value.__cause__)


def test_the_pins_in_the_error_are_those_of_the_setup_extra():
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    extra = re.search(r"CPU_ENGINES_REQUIRES = \[(.*?)\]", setup).group(1)
    pins = {f'"{package}=={version}"' for packages in ENGINE_PACKAGES.values() for package, version in packages.items()}
    assert pins == {pin.strip() for pin in extra.split(",")}


def test_unknown_engine_and_precision_are_named():
    scheduler = RespacedDDPMScheduler(num_train_timesteps=100)
    with pytest.raises(ValueError, match="engine must be one of"):
        DiffusionSamplingInferer(scheduler, engine="tensorrt")
    with pytest.raises(ValueError, match="float32"):
        DiffusionSamplingInferer(scheduler, engine="onnxruntime", autocast_dtype="bfloat16")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        DiffusionSamplingInferer(scheduler, engine="openvino", autocast_dtype="float16")


@pytest.mark.skipif(not _installed("onnxruntime"), reason="onnxruntime (or onnx) not installed: the cpu-engines extra")
def test_a_condition_that_is_not_one_tensor_is_refused(cimd_network):
    engine = CPUEngineDenoiser(cimd_network, "onnxruntime")
    with pytest.raises(TypeError, match="engine='torch'"):
        engine(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), cond=(torch.zeros(1, 1, 8, 8),))
