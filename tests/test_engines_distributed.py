"""multi_gpu_train.json on CPU: two processes with the gloo backend via torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "cimd" / "configs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_two_process_gloo_training_completes(small_demo_dataset, tmp_path):
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "monai.bundle", "run", "training", "--config_file", configs,
        "--dataset_dir", small_demo_dataset, "--output_dir", str(tmp_path / "run"),
        "--tracking_uri", f"sqlite:///{tmp_path / 'mlruns.db'}",
        "--max_epochs", "1", "--val_interval", "1", "--batch_size", "2",
        "--unet_channels", "[8,8]", "--unet_norm_groups", "4", "--unet_head_channels", "8",
        "--num_train_timesteps", "20", "--num_val_samples", "2", "--val_inference_steps", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=580)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    # 8 training images, 2 ranks x batch 2 -> 2 iterations per epoch on each rank
    assert "Epoch: 1/1, Iter: 2/2" in log and "Iter: 3/" not in log
    assert "Key metric: ged best value" in log
    models = tmp_path / "run" / "models"
    assert (models / "checkpoint_epoch=1.pt").is_file() and (models / "model.pt").is_file()  # rank 0 saved once
