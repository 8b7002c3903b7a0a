"""`ambiseg export`: traced bundle networks with embedded configs, verified against the eager network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import save_net_with_metadata

from ambiseg_monai.cli import main as cli_main
from ambiseg_monai.deploy.export import ExportVerificationError, export_bundle
from ambiseg_monai.deploy.exported import ExportedDenoiser, ExportedLatentModel, load_exported_bundle

TINY_DENOISER = {
    "_target_": "ambiseg_monai.networks.denoisers.ConcatConditionedDenoiser",
    "image_channels": 1, "channels": [8, 16], "norm_num_groups": 8, "num_head_channels": 8,
    "attention_levels": [False, False], "learn_variance": True,
}
DIFFUSION_CONFIG = {
    "imports": ["$import torch"],
    "num_samples": 3,
    "network_def": TINY_DENOISER,
    "scheduler": {"_target_": "ambiseg_monai.schedulers.respaced.RespacedDDPMScheduler",
                  "num_train_timesteps": 50, "variance_type": "learned_range"},
    "inferer": {"_target_": "ambiseg_monai.inferers.diffusion.DiffusionSamplingInferer",
                "scheduler": "@scheduler", "num_samples": "@num_samples", "num_inference_steps": 3, "seed": 0},
}
METADATA = {
    "version": "0.0.1", "name": "tiny_test_bundle",
    "network_data_format": {"inputs": {"image": {"type": "image", "modality": "CT", "num_channels": 1,
                                                 "spatial_shape": [16, 16], "value_range": [0, 1]}}},
}


class BranchyDenoiser(torch.nn.Module):
    """Follows the denoiser protocol but branches on the batch size: a trace records one branch only."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def encode_condition(self, image):
        return image

    def forward(self, x_t, timesteps, cond=None, class_labels=None, image=None, target=None):
        if x_t.shape[0] <= 3:  # Python control flow: the trace keeps the branch of the recorded step (3 rows)
            return torch.cat([x_t, cond], dim=1) * self.scale
        return -torch.cat([x_t, cond], dim=1) * self.scale


def write_bundle(root: Path, config: dict, metadata: dict | None = METADATA, nested_key: str | None = None) -> Path:
    """A bundle folder with configs/inference.json, configs/metadata.json and models/model.pt (random weights)."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    if metadata is not None:
        (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    parser = ConfigParser(config)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    with torch.no_grad():  # "trained" weights: MONAI zero-initialises the UNet's output convolution
        for parameter in network.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    state = network.state_dict()
    torch.save({nested_key: state, "optimizer": {}} if nested_key else state, root / "models" / "model.pt")
    return root


REPO = Path(__file__).resolve().parents[1]
# the real CIMD bundle made tiny through its own top-level config values (no file of the bundle is changed)
CIMD_OVERRIDES = {"unet_channels": [32, 32], "unet_norm_groups": 8, "num_train_timesteps": 20,
                  "num_inference_samples": 3, "inference_steps": 2, "infer#inferer#progress": False}


def export_tiny_cimd(tmp: Path, **kwargs) -> tuple[Path, object]:
    """Build bundles/cimd's network_def (tiny), save perturbed weights as a training checkpoint, export it."""
    bundle = REPO / "bundles" / "cimd"
    configs = [bundle / "configs" / "train.json", bundle / "configs" / "inference.json"]
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser.update(CIMD_OVERRIDES)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({"network": network.state_dict(), "ema": network.state_dict()}, tmp / "checkpoint.pt")
    out = tmp / "models" / "model.ts"
    report = export_bundle(bundle, out, ckpt_file=tmp / "checkpoint.pt", overrides=CIMD_OVERRIDES,
                           spatial_shape=(16, 16), **kwargs)
    return out, report


@pytest.fixture
def diffusion_bundle(tmp_path) -> Path:
    return write_bundle(tmp_path / "bundle", DIFFUSION_CONFIG, nested_key="ema")


def test_export_diffusion_bundle_round_trip(diffusion_bundle, tmp_path):
    out = tmp_path / "export" / "model.ts"
    report = export_bundle(diffusion_bundle, out, overrides={"num_samples": 2}, check_sampling=True)
    assert out.is_file() and report.kind == "diffusion"
    assert report.max_abs_diff <= 1e-6 and set(report.checks) == {
        "recorded sampling step", "random step (batch 3)", "encode_condition"}  # 2 rows recorded, 3 fresh
    assert report.sample_agreement == 1.0  # the sampler on the exported model gives the eager model's masks
    assert not list(out.parent.glob(".*"))  # no temporary file left

    bundle = load_exported_bundle(out)
    assert isinstance(bundle.network, ExportedDenoiser) and not bundle.network.uses_class_labels
    assert bundle.spatial_shape == (16, 16) and bundle.image_channels == 1
    assert bundle.export["modalities"] == ["CT"]
    assert bundle.export["intensity"] == {"mode": "window", "window": [-1000.0, 400.0]}  # CT default (LIDC importer)
    assert bundle.metadata["name"] == "tiny_test_bundle" and bundle.metadata["MONAI"]  # MONAI version values
    assert bundle.export["bundle_name"] == "bundle"  # no `bundle_name` in the config: the folder's name
    assert bundle.inference_config["num_samples"] == 2  # overrides travel with the model
    assert bundle.inference_config["network_def"] == TINY_DENOISER

    # the traced model matches the eager one (with the EMA weights of the nested checkpoint) at another size
    eager = ConfigParser(DIFFUSION_CONFIG).get_parsed_content("network_def")
    eager.load_state_dict(torch.load(diffusion_bundle / "models" / "model.pt")["ema"])
    x, t, image = torch.randn(5, 1, 32, 32), torch.randint(0, 50, (5,)), torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        expected = eager.eval()(x, t, image=image)
        got = bundle.network(x, t, image=image)
    assert got.shape == (5, 2, 32, 32)
    assert torch.allclose(got, expected, atol=1e-5)

    # the bundle's own N-sample inferer runs on the exported model: B x N x H x W binary masks
    inferer = ConfigParser(bundle.inference_config).get_parsed_content("inferer")
    samples = inferer(torch.rand(2, 1, 16, 16), bundle.network)
    assert samples.shape == (2, 2, 16, 16) and set(samples.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.skipif(not (REPO / "bundles/cimd/configs/inference.json").is_file(), reason="CIMD bundle not present")
def test_export_real_cimd_bundle(tmp_path):
    out, report = export_tiny_cimd(tmp_path, check_sampling=True)
    assert report.kind == "diffusion" and report.max_abs_diff <= 1e-5 and report.sample_agreement == 1.0
    bundle = load_exported_bundle(out)
    assert bundle.export["inferer_id"] == "infer#inferer"  # found in the bundle's `infer` section
    assert bundle.export["network_class"] == "ambiseg_monai.networks.cimd.CIMDNetwork"
    assert bundle.export["bundle_name"] == "cimd" and bundle.metadata["name"].startswith("CIMD")
    assert bundle.spatial_shape == (16, 16)  # --spatial-size wins over the metadata's 32 x 32
    inferer = ConfigParser(bundle.inference_config).get_parsed_content("infer#inferer")
    assert inferer.num_samples == 3
    samples = inferer(torch.rand(1, 1, 16, 16), bundle.network)
    assert samples.shape == (1, 3, 16, 16)


def test_export_with_class_labels(tmp_path):
    config = json.loads(json.dumps(DIFFUSION_CONFIG))
    config["network_def"]["num_class_embeds"] = 3
    bundle_dir = write_bundle(tmp_path / "bundle", config)
    report = export_bundle(bundle_dir, tmp_path / "model.ts", class_label=1)
    assert report.max_abs_diff <= 1e-6
    network = load_exported_bundle(tmp_path / "model.ts").network
    assert network.uses_class_labels
    x, t, image = torch.randn(2, 1, 16, 16), torch.tensor([3, 40]), torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        level0 = network(x, t, image=image, class_labels=torch.tensor([0, 0]))
        level2 = network(x, t, image=image, class_labels=torch.tensor([2, 2]))
    assert not torch.allclose(level0, level2)  # the label reaches the traced embedding
    with pytest.raises(ValueError, match="traced with class labels"):
        network(x, t, image=image)


def test_export_latent_model(tmp_path):
    config = {
        "network_def": {"_target_": "ambiseg_monai.networks.prob_unet.ProbabilisticUNet",
                        "in_channels": 1, "channels": [4, 8], "num_res_units": 1},
        "inferer": {"_target_": "ambiseg_monai.inferers.latent.LatentSampleInferer", "num_samples": 2},
    }
    bundle_dir = write_bundle(tmp_path / "bundle", config)
    report = export_bundle(bundle_dir, tmp_path / "model.ts", check_sampling=True)
    assert report.kind == "latent" and report.max_abs_diff <= 1e-5 and report.sample_agreement == 1.0
    bundle = load_exported_bundle(tmp_path / "model.ts")
    assert isinstance(bundle.network, ExportedLatentModel) and bundle.network.traced_num_samples == 2
    # any N: independent prior draws of the traced N = 2 are concatenated
    image = torch.rand(3, 1, 16, 16)
    assert bundle.network.sample(image, 5).shape == (3, 5, 16, 16)
    # per-row generators (what LatentSampleInferer passes) make the traced draws reproducible
    generators = [torch.Generator().manual_seed(k) for k in range(6)]
    first, again = (bundle.network.sample(image, 2, generators) for _ in range(2))
    assert torch.equal(first, again) and not torch.equal(first, bundle.network.sample(image, 2, generators[::-1]))
    inferer = ConfigParser(bundle.inference_config).get_parsed_content("inferer")
    assert inferer(torch.rand(1, 1, 16, 16), bundle.network).shape == (1, 2, 16, 16)


def test_export_fails_when_trace_differs_and_writes_nothing(tmp_path):
    config = json.loads(json.dumps(DIFFUSION_CONFIG))
    config["network_def"] = {"_target_": "test_export.BranchyDenoiser"}
    bundle_dir = write_bundle(tmp_path / "bundle", config)
    out = tmp_path / "model.ts"
    with pytest.raises(ExportVerificationError, match=r"differs from the eager one by .*random step \(batch 4\).*nothing was written"):
        export_bundle(bundle_dir, out)  # the random check uses 4 rows: eager takes the other branch
    assert not out.exists() and not list(tmp_path.glob(".model.ts*"))


@pytest.mark.parametrize(
    "change, error, message",
    [
        ("no_checkpoint", FileNotFoundError, "checkpoint not found: .*model.pt"),
        ("wrong_weights", ValueError, "does not fit the bundle's network"),
        ("no_spatial_shape", ValueError, "spatial shape"),
        ("out_exists", FileExistsError, "already exists; pass --overwrite"),
        ("no_inferer", ValueError, "the bundle config has no 'inferer'"),
    ],
)
def test_export_bad_inputs(change, error, message, tmp_path):
    config = json.loads(json.dumps(DIFFUSION_CONFIG))
    metadata = json.loads(json.dumps(METADATA))
    if change == "no_spatial_shape":
        del metadata["network_data_format"]["inputs"]["image"]["spatial_shape"]
    if change == "no_inferer":
        del config["inferer"]
    bundle_dir = write_bundle(tmp_path / "bundle", config, metadata)
    out = tmp_path / "model.ts"
    if change == "no_checkpoint":
        (bundle_dir / "models" / "model.pt").unlink()
    if change == "wrong_weights":
        torch.save({"unet.conv_in.conv.weight": torch.zeros(1)}, bundle_dir / "models" / "model.pt")
    if change == "out_exists":
        out.write_bytes(b"keep me")
    with pytest.raises(error, match=message):
        export_bundle(bundle_dir, out)
    if change == "out_exists":
        assert out.read_bytes() == b"keep me"


def test_load_exported_bundle_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_exported_bundle(tmp_path / "missing.ts")
    not_ts = tmp_path / "notes.ts"
    not_ts.write_text("not a model")
    with pytest.raises(ValueError, match="is not a TorchScript model file"):
        load_exported_bundle(not_ts)
    plain = tmp_path / "plain.ts"
    save_net_with_metadata(torch.jit.script(torch.nn.Linear(2, 2)), str(plain), meta_values={"name": "x"})
    with pytest.raises(ValueError, match="not written by `ambiseg export`"):
        load_exported_bundle(plain)


def test_cli_export(diffusion_bundle, tmp_path, capsys):
    out = tmp_path / "cli.ts"
    argv = ["export", "--bundle-root", str(diffusion_bundle), "--out", str(out), "--override", "num_samples=2",
            "--window", "-160", "240", "--modality", "CT", "MR"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "exported diffusion model to" in printed and "max abs diff 0 " in printed
    export = load_exported_bundle(out).export
    assert export["intensity"] == {"mode": "window", "window": [-160.0, 240.0]}
    assert export["modalities"] == ["CT", "MR"]
    assert cli_main(["export", "--bundle-root", str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "ambiseg: error: bundle folder not found" in capsys.readouterr().err
