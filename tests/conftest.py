"""Shared pytest fixtures: a small demo dataset generated once per test session."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ambiseg_monai.data.demo import DemoConfig, generate_demo_dataset

# Tests run on 2 CPU cores; extra intra-op threads only add contention between tiny ops.
torch.set_num_threads(1)

# the deploy extra (monai-deploy-app-sdk with Holoscan, highdicom): not in the test extra (see setup.py)
DEPLOY_SDK_MODULES = ("monai.deploy", "holoscan", "highdicom")
MISSING_DEPLOY_SDK = [name for name in DEPLOY_SDK_MODULES if importlib.util.find_spec(name) is None]


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``deploy_sdk`` where the deploy extra is not installed, saying so."""
    if not MISSING_DEPLOY_SDK:
        return
    skip = pytest.mark.skip(
        reason=f"needs the deploy extra ({', '.join(MISSING_DEPLOY_SDK)} missing): pip install -e '.[test,deploy]' "
        "in a separate environment; bash .ci/run runs these tests in its deploy environment"
    )
    for item in items:
        if "deploy_sdk" in item.keywords:
            item.add_marker(skip)


SMALL_DEMO = DemoConfig(image_size=16, num_training=8, num_validation=4, num_test=4, num_raters=4, seed=3)


@pytest.fixture(scope="session")
def small_demo_dataset(tmp_path_factory) -> str:
    """Path of a tiny demo dataset (16 x 16, 8/4/4 cases, 4 raters). Treat it as read-only."""
    out = tmp_path_factory.mktemp("demo") / "small_demo"
    generate_demo_dataset(out, SMALL_DEMO)
    return str(out)
