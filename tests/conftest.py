"""Shared pytest fixtures: a small demo dataset generated once per test session."""

from __future__ import annotations

import pytest
import torch

from ambiseg_monai.data.demo import DemoConfig, generate_demo_dataset

# Tests run on 2 CPU cores; extra intra-op threads only add contention between tiny ops.
torch.set_num_threads(1)

SMALL_DEMO = DemoConfig(image_size=16, num_training=8, num_validation=4, num_test=4, num_raters=4, seed=3)


@pytest.fixture(scope="session")
def small_demo_dataset(tmp_path_factory) -> str:
    """Path of a tiny demo dataset (16 x 16, 8/4/4 cases, 4 raters). Treat it as read-only."""
    out = tmp_path_factory.mktemp("demo") / "small_demo"
    generate_demo_dataset(out, SMALL_DEMO)
    return str(out)
