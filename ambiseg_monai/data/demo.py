"""Generate the demo dataset: small synthetic multi-rater images with a known ground truth.

Each image shows a bright lesion-like structure: an elliptical core with one or two attached
lobes. Raters always agree on the core but include each lobe with a known probability, and the
image tells how ambiguous it is: a lobe drawn at intensity ``p`` (relative to the core) is
included with probability ``p``. Faint lesions (a dim core) are missed entirely (an empty mask,
a valid opinion, as in LIDC) with probability ``p_empty``. The true rater distribution of an
image is therefore a finite set of candidate masks with probabilities (empty, core, core + lobe
1, ...); the raters' masks are independent draws from it.

Written through :class:`~ambiseg_monai.data.datalist.DatasetWriter`, so the dataset follows the
data contract. Each item carries ``truth``: ``{"masks": "truth/<case>.nii.gz", "probabilities":
[...], "modes": [...]}``, the K x H x W candidate masks and their probabilities (summing to 1).

Usage::

    ambiseg prepare demo --out data/demo          # or
    from ambiseg_monai.data.demo import ensure_demo_dataset
    ensure_demo_dataset("data/demo")               # generate only if missing (bundles do this)
"""

from __future__ import annotations

import argparse
import itertools
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from ambiseg_monai.data.datalist import (
    DATALIST_FILENAME,
    DatasetExistsError,
    DatasetWriter,
    load_datalist,
    validate_datalist,
)

__all__ = [
    "DemoConfig",
    "DemoCase",
    "make_demo_case",
    "generate_demo_dataset",
    "ensure_demo_dataset",
    "lobe_regions",
]

LOBE_PROBABILITIES = (0.25, 0.5, 0.75)  # inclusion probability = lobe intensity relative to the core
FAINT_EMPTY_PROBABILITY = 0.25  # a faint lesion is missed by a rater with this probability
FAINT_CORE_INTENSITY = 0.55
SPLIT_OFFSETS = {"training": 0, "validation": 1, "test": 2}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and counts of the demo dataset (defaults keep CPU demo training to minutes).

    1024 training images: with 4 raters per image, 64 images (the earlier default) let a model
    memorise each image's 4 draws instead of learning how a lobe's intensity sets its probability
    (docs/benchmarks.md, "CIMD"); generating 1024 takes about 3 s.
    """

    image_size: int = 32
    num_training: int = 1024
    num_validation: int = 16
    num_test: int = 16
    num_raters: int = 4
    image_channels: int = 1
    faint_fraction: float = 0.25  # fraction of images whose lesion raters may miss entirely
    noise_std: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        for name in ("num_training", "num_raters", "image_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_validation", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.faint_fraction <= 1.0:
            raise ValueError(f"faint_fraction must be in [0, 1], got {self.faint_fraction}")

    def split_sizes(self) -> dict[str, int]:
        return {"training": self.num_training, "validation": self.num_validation, "test": self.num_test}


@dataclass
class DemoCase:
    """One generated case: image C x H x W, rater masks R x H x W, true modes K x H x W."""

    image: np.ndarray
    raters: np.ndarray
    modes: np.ndarray
    probabilities: list[float]
    mode_names: list[str]
    lobe_probabilities: list[float] = field(default_factory=list)
    empty_probability: float = 0.0


def _disc(grid_y: np.ndarray, grid_x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((grid_y - cy) / ry) ** 2 + ((grid_x - cx) / rx) ** 2 <= 1.0


def make_demo_case(rng: np.random.Generator, config: DemoConfig) -> DemoCase:
    """Draw one case from ``rng``: geometry, ambiguity, the true modes and the raters' draws."""
    size = config.image_size
    grid_y, grid_x = np.mgrid[0:size, 0:size].astype(np.float64)

    centre = rng.uniform(0.4, 0.6, size=2) * size
    radii = rng.uniform(0.11, 0.17, size=2) * size
    core = _disc(grid_y, grid_x, centre[0], centre[1], radii[0], radii[1])

    num_lobes = int(rng.integers(1, 3))
    first_angle = rng.uniform(0, 2 * np.pi)
    lobes, lobe_probabilities = [], []
    for index in range(num_lobes):
        angle = first_angle + index * np.pi * rng.uniform(0.7, 1.3)  # lobes on opposite-ish sides
        direction = np.array([np.sin(angle), np.cos(angle)])
        lobe_radius = rng.uniform(0.09, 0.13) * size
        distance = np.sqrt(np.prod(radii)) + 0.6 * lobe_radius
        lobe_centre = centre + distance * direction
        lobes.append(_disc(grid_y, grid_x, lobe_centre[0], lobe_centre[1], lobe_radius, lobe_radius) & ~core)
        lobe_probabilities.append(float(rng.choice(LOBE_PROBABILITIES)))

    faint = bool(rng.random() < config.faint_fraction)
    empty_probability = FAINT_EMPTY_PROBABILITY if faint else 0.0
    core_intensity = FAINT_CORE_INTENSITY if faint else 1.0

    # The finite true distribution: empty (if faint) plus core with every subset of lobes.
    modes, probabilities, names = [], [], []
    if empty_probability > 0:
        modes.append(np.zeros((size, size), dtype=bool))
        probabilities.append(empty_probability)
        names.append("empty")
    for included in itertools.product((False, True), repeat=num_lobes):
        mask = core.copy()
        probability = 1.0 - empty_probability
        for lobe, p, keep in zip(lobes, lobe_probabilities, included, strict=True):
            if keep:
                mask |= lobe
            probability *= p if keep else 1.0 - p
        modes.append(mask)
        probabilities.append(probability)
        names.append("core" + "".join(f"+lobe{i + 1}" for i, keep in enumerate(included) if keep))
    modes_array = np.stack(modes).astype(np.uint8)

    choices = rng.choice(len(modes), size=config.num_raters, p=np.asarray(probabilities))
    raters = modes_array[choices]

    # The image: smooth background texture, the lesion (lobes at their probability's intensity),
    # a slight blur for soft edges, and noise. Extra channels are differently scaled views.
    lesion = core_intensity * core.astype(np.float64)
    for lobe, p in zip(lobes, lobe_probabilities, strict=True):
        lesion += core_intensity * p * lobe
    background = gaussian_filter(rng.normal(size=(size, size)), sigma=size / 8)
    background = 0.08 * background / (np.abs(background).max() + 1e-8)
    clean = 0.15 + background + 0.7 * gaussian_filter(lesion, sigma=0.6)
    channels = []
    for channel in range(config.image_channels):
        gain = 1.0 - 0.2 * channel / max(1, config.image_channels)
        channels.append(gain * clean + config.noise_std * rng.normal(size=(size, size)))
    image = np.stack(channels).astype(np.float32)

    return DemoCase(
        image=image,
        raters=raters,
        modes=modes_array,
        probabilities=[float(p) for p in probabilities],
        mode_names=names,
        lobe_probabilities=lobe_probabilities,
        empty_probability=empty_probability,
    )


def lobe_regions(modes: np.ndarray, mode_names: list[str], num_lobes: int) -> np.ndarray:
    """The lobes of a demo truth as L x H x W masks: mode ``core+lobe<l>`` minus mode ``core``.

    A rater who sees the lesion includes lobe l with probability ``lobe_probabilities[l]``
    independently of the other lobes, so a model's inclusion frequency of each lobe among its
    non-empty samples estimates exactly that probability
    (:func:`~ambiseg_monai.metrics.region_inclusion_frequency`).

    Args:
        modes: K x H x W candidate masks of one image (the stored truth).
        mode_names: the K names (``"empty"``, ``"core"``, ``"core+lobe1"``, ...).
        num_lobes: L, the length of the item's ``lobe_probabilities``.
    """
    masks = np.asarray(modes) > 0
    try:
        core = masks[mode_names.index("core")]
        return np.stack([masks[mode_names.index(f"core+lobe{i + 1}")] & ~core for i in range(num_lobes)])
    except ValueError as error:
        raise ValueError(f"the truth has no mode named as the demo's ('core', 'core+lobe<l>'): {error}") from error


def generate_demo_dataset(
    out_dir: str | os.PathLike, config: DemoConfig | None = None, overwrite: bool = False
) -> dict:
    """Write the demo dataset to ``out_dir`` (atomically) and return the validation summary.

    The same ``config`` (seed included) always gives byte-identical arrays.
    """
    config = config or DemoConfig()
    metadata = {
        "description": "Synthetic lesions with a known rater distribution (ambiseg-monai demo dataset)",
        "generator": {"name": "ambiseg_monai.data.demo", **asdict(config)},
    }
    writer = DatasetWriter(
        out_dir,
        name="demo",
        modality="synthetic",
        num_raters=config.num_raters,
        image_channels=config.image_channels,
        overwrite=overwrite,
        required_splits=("training",),
        metadata=metadata,
    )
    with writer:
        for split, count in config.split_sizes().items():
            for index in range(count):
                # One independent stream per case: a case does not change when counts change.
                rng = np.random.default_rng([config.seed, SPLIT_OFFSETS[split], index])
                case = make_demo_case(rng, config)
                case_id = f"demo_{split[:3]}_{index:04d}"
                truth_file = writer.write_array(f"truth/{case_id}.nii.gz", case.modes)
                writer.add_item(
                    split,
                    case_id,
                    patient_id=f"demo_patient_{split[:3]}_{index:04d}",
                    image=case.image,
                    label=case.raters,
                    truth={
                        "masks": truth_file,
                        "probabilities": case.probabilities,
                        "modes": case.mode_names,
                        "empty_probability": case.empty_probability,
                        "lobe_probabilities": case.lobe_probabilities,
                    },
                )
    return writer.summary or {}


def ensure_demo_dataset(dataset_dir: str | os.PathLike, warn_if_different: bool = False, **config_overrides) -> str:
    """Return ``dataset_dir``, generating the demo dataset there first if it has no datalist.

    Bundles call this for their default ``dataset_dir`` so a fresh checkout trains without any
    download. Safe when several processes (distributed ranks) call it at once. With
    ``warn_if_different`` (the bundles' default location), a demo generated with other parameters
    than ``config_overrides`` ask for (e.g. by an older version) is kept, with a warning that says
    how to regenerate it.
    """
    dataset_dir = Path(dataset_dir)
    config = DemoConfig(**config_overrides)
    if not (dataset_dir / DATALIST_FILENAME).exists():
        try:
            generate_demo_dataset(dataset_dir, config)
        except DatasetExistsError:
            if not (dataset_dir / DATALIST_FILENAME).exists():  # someone else's files, not a dataset
                raise
    validate_datalist(dataset_dir, check_files=False)
    if warn_if_different:
        _warn_if_other_demo(dataset_dir, config)
    return str(dataset_dir)


def _warn_if_other_demo(dataset_dir: Path, config: DemoConfig) -> None:
    """Warn when ``dataset_dir`` holds a demo generated with other settings (e.g. an older default)."""
    generator = load_datalist(dataset_dir).get("generator")
    if not isinstance(generator, dict) or generator.get("name") != __name__:
        return  # not generated by this module: the user's own data
    wanted = asdict(config)
    differences = [
        f"{key}={generator.get(key)!r} (wanted {value!r})"
        for key, value in wanted.items()
        if generator.get(key) != value
    ]
    if differences:
        warnings.warn(
            f"{dataset_dir} holds a demo dataset generated with {', '.join(differences)}; results will differ "
            f"from the documented ones. Regenerate it with: ambiseg prepare demo --out {dataset_dir} --overwrite",
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# command line: ambiseg prepare demo
# --------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ambiseg prepare demo``."""
    defaults = DemoConfig()
    parser.add_argument("--out", required=True, help="output folder (must not hold a dataset unless --overwrite)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (same seed, same files)")
    parser.add_argument("--image-size", type=_positive_int, default=defaults.image_size, help="H = W in pixels")
    parser.add_argument("--num-training", type=_positive_int, default=defaults.num_training)
    parser.add_argument("--num-validation", type=_non_negative_int, default=defaults.num_validation)
    parser.add_argument("--num-test", type=_non_negative_int, default=defaults.num_test)
    parser.add_argument("--num-raters", type=_positive_int, default=defaults.num_raters)
    parser.add_argument("--channels", type=_positive_int, default=defaults.image_channels, help="image channels")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")


def main(args: argparse.Namespace) -> int:
    """Run ``ambiseg prepare demo``."""
    config = DemoConfig(
        image_size=args.image_size,
        num_training=args.num_training,
        num_validation=args.num_validation,
        num_test=args.num_test,
        num_raters=args.num_raters,
        image_channels=args.channels,
        seed=args.seed,
    )
    summary = generate_demo_dataset(args.out, config, overwrite=args.overwrite)
    counts = ", ".join(f"{split}: {n}" for split, n in summary["num_items"].items())
    print(f"demo dataset written to {args.out} ({counts}; {config.num_raters} raters, {config.image_size}px)")
    return 0
