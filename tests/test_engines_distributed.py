"""multi_gpu_train.json of every bundle on CPU: two processes with the gloo backend via torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _bundle_runner import link_bundles

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"

# Tiny networks per bundle (the method's own keys); everything else is the bundle's default.
TINY = {
    "cimd": {
        "unet_channels": [8, 8], "unet_norm_groups": 4, "unet_head_channels": 8, "num_train_timesteps": 20,
        "num_val_samples": 2, "val_inference_steps": 2,
    },
    "ambdiffseg": {
        "unet_channels": [8, 16], "unet_res_blocks": [1, 1], "unet_norm_groups": 4, "unet_head_channels": 8,
        "num_inference_steps": 2, "amp": False,
    },
    "consensus_diffusion": {
        "unet_channels": [8, 8], "unet_norm_groups": 4, "unet_head_channels": 4, "rrdb_features": 4,
        "rrdb_blocks": 1, "rrdb_growth_channels": 2, "num_val_generations": 2, "val_inference_steps": 2,
        "amp": False,
    },
    "prob_unet": {"unet_channels": [8, 16], "num_res_units": 1},
    "phiseg": {"channels": [8, 16, 16], "latent_levels": 2, "convs_per_level": 1},
    "ssn": {"unet_channels": [8, 16], "num_res_units": 1, "num_head_convs": 1},
}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("bundle", sorted(TINY))
def test_two_process_gloo_training_completes(bundle, small_demo_dataset, tmp_path):
    configs = BUNDLES / bundle / "configs"
    config_files = f"['{configs / 'train.json'}','{configs / 'multi_gpu_train.json'}']"
    overrides = {
        "dataset_dir": small_demo_dataset, "output_dir": str(tmp_path / "run"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "max_epochs": 1, "val_interval": 1, "batch_size": 2,
        "cpu_threads": 1, **TINY[bundle],
    }  # fmt: skip
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "monai.bundle", "run", "training", "--config_file", config_files,
        *[item for key, value in overrides.items() for item in (f"--{key}", json.dumps(value) if not isinstance(
            value, str) else value)],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    link_bundles(tmp_path)  # the bundles read bundles/common relative to the working directory
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=580)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    # 8 training images, 2 ranks x batch 2 -> 2 iterations per epoch on each rank (rank 0 prints the epoch line)
    assert log.count(" - epoch 1/1: ") == 1 and "[2 iterations, " in log
    assert "Key metric:" in log  # validation ran (metrics gathered across ranks)
    models = tmp_path / "run" / "models"
    assert (models / "checkpoint_epoch=1.pt").is_file() and (models / "model.pt").is_file()  # rank 0 saved once
