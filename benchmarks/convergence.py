"""Do the methods learn the rater distribution, and how fast? Score every bundle against the demo truth while it trains.

The demo dataset stores each test image's true rater distribution (K candidate masks with
probabilities; the lobes a rater includes independently). Each method is trained from its own
bundle config (``bundles/<method>/configs/train.json`` plus any ``--overlays``; checkpointing,
validation and tracking handlers removed, everything else as the bundle has it: EMA, learning-rate
schedule, gradient clipping). At each of the log-spaced ``--iterations`` the training clock stops and
the network the bundle's ``inference.json`` would load (the EMA weights where the bundle keeps an
EMA) is sampled by **that inference.json's own evaluator** (its inferer, step count, sampler and
post-processing), ``--samples`` masks per test image, and scored with
:func:`~ambiseg_monai.metrics.truth_scores`:

- GED to the true distribution; mode TV (total variation between the modes' sampled frequencies and
  their probabilities, unmatched samples counting as error); lobe error (mean ``|f_l - p_l|`` over the
  lobes, each lobe's inclusion frequency among the non-empty samples: the frequency figure that does
  not depend on the shape quality); empty error (``|sampled - true empty fraction|``); isolated pixels
  (speckle, share of the foreground).

Reference rows with the same N: ``truth`` (N draws from the true distribution: the finite-sample
floor), ``truth, 1-px jitter`` (the same draws with each mask randomly eroded or dilated by one pixel:
how much shape noise alone costs the mode metrics), and ``consensus construction`` (what consensus
diffusion samples when its every level is perfect: a uniform level c and ``M^c`` of R rater draws;
its mode frequencies differ from the raters' by construction).

Sampling steps (issue #20): ``--sampling-steps 1 2 5 10 25 50`` scores the same weights once per step
count at every scored point (or of ``--checkpoint``), by setting the key the bundle's ``inference.json``
feeds its inferer's ``num_inference_steps`` (``inference_steps`` in every bundle; AmbDiffSeg's refers to
``num_inference_steps`` of its train.json). ``--samplers`` switches the sampling scheduler of the same
weights: ``ddpm`` / ``ddim`` for a discrete (CIMD, consensus) or continuous-time (AmbDiffSeg) VP bundle,
``euler`` / ``heun`` / ``sde`` for a flow-matching one; ``bundle`` (the default) is the bundle's own. A
sampler that does not fit a variant's scheduler is skipped for it. ``--variants NAME=FILE[,FILE]``
trains and scores each method once per variant (its overlay files after ``--overlays``, ``{method}``
replaced by the method's name; ``NAME=`` is the bundle as it is), so DDPM and flow matching of one
method share one table and plot. Every row says its ``variant`` (default: the overlay files' names, or
``bundle``), ``sampler``, ``sampling_steps``, ``network_calls`` (Heun: 2K - 1) and ``sample_s`` (the
evaluator's run: sampling, thresholding and post-processing of ``samples`` x ``images`` masks).
The scored points do not change the training: scoring runs with the random state saved and restored.

    python benchmarks/convergence.py                                  # all methods, CPU defaults
    python benchmarks/convergence.py --methods cimd --iterations 250 500 1000 --samples 64
    python benchmarks/convergence.py --methods cimd --overlays bundles/cimd/configs/ddpm_prob_seg.json
    python benchmarks/convergence.py --methods cimd ambdiffseg --iterations 250 1000 4000 \
        --variants ddpm= flow=bundles/{method}/configs/flow_matching.json --sampling-steps 1 2 5 10 25 50

Writes ``--json`` (every row) and ``--plot`` (PNG: the four errors against iterations, floors dashed;
with more than one step count a second row of panels against the sampling steps, at the last scored
point) and prints a Markdown table, then (with a steps sweep) the speed at equal quality: per
variant and sampler, the fewest steps whose GED to truth and lobe error are within ``--tolerance`` of
its best over the sweep (``--reference last``: of its largest step count), and per method the fewest
steps of each variant that reach a common target (the worst variant's reference plus the tolerance),
with the sampling seconds per mask.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from monai.utils import set_determinism
from scipy.ndimage import binary_dilation, binary_erosion

from ambiseg_monai.bundle.config import resolve_macros
from ambiseg_monai.data.datalist import load_split
from ambiseg_monai.data.demo import ensure_demo_dataset
from ambiseg_monai.handlers.truth import TruthMetricsHandler
from ambiseg_monai.metrics import isolated_pixel_fraction, truth_scores
from ambiseg_monai.transforms.loading import LoadTruthd

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
METHODS = ("cimd", "ambdiffseg", "consensus_diffusion", "prob_unet", "phiseg", "ssn")
SCORES = ("ged", "mode_tv", "lobe_error", "empty_error", "isolated_pixels")
# training handlers that only log, checkpoint or validate: a pure training run drops them
DROPPED_HANDLERS = (
    "ResumableCheckpointer",
    "ValidationHandler",
    "StatsHandler",
    "MLFlowHandler",
    "mlflow_handler",
    "MLflowModelLogger",
    "ProvenanceHandler",
    "CheckpointSaver",
    "TrainingSummary",  # it names the MLflow run and the validator: both would be built for nothing
)
#: the variant name of a run without overlays: the bundle as it is
BUNDLE_VARIANT = "bundle"
#: sampler name -> scheduler class, per scheduler family (the module of the bundle's sampling scheduler)
SAMPLER_CLASSES = {
    "respaced": {"ddpm": "RespacedDDPMScheduler", "ddim": "RespacedDDIMScheduler"},
    "continuous": {"ddpm": "ContinuousDDPMScheduler", "ddim": "ContinuousDDIMScheduler"},
    "flow": {
        "euler": "RectifiedFlowScheduler",
        "heun": "RectifiedFlowHeunScheduler",
        "sde": "RectifiedFlowSDEScheduler",
    },
}
SAMPLERS = ("bundle", "ddpm", "ddim", "euler", "heun", "sde")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a number of sampling steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a number of sampling steps (give integers >= 1)")
    return value


def variant_spec(text: str) -> tuple[str, list[str]]:
    """argparse type: ``NAME=FILE[,FILE...]`` (``NAME=``: no overlay) -> (name, files)."""
    name, sep, files = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise argparse.ArgumentTypeError(
            "a variant is NAME=FILE[,FILE...] (NAME=: the bundle without overlays; NAME: letters, digits, _.+-), "
            f"got {text!r}"
        )
    return name, [f for f in files.split(",") if f]


def _parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--overlays", nargs="*", default=[], help="config files stacked on every method's train.json")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="config overrides, e.g. batch_size=32")
    parser.add_argument("--dataset-dir", default=None, help="demo dataset (default: generated in a temporary folder)")
    parser.add_argument(
        "--iterations",
        type=int,
        nargs="+",
        default=[125, 250, 500, 1000, 2000, 4000],
        help="training iterations at which the network is scored (log-spaced)",
    )
    parser.add_argument("--samples", type=int, default=64, help="samples per test image at each score")
    parser.add_argument("--final-samples", type=int, default=None, help="samples at the last score (default --samples)")
    parser.add_argument("--images", type=int, default=None, help="test images scored (default: the whole test split)")
    parser.add_argument(
        "--save-dir",
        default=None,
        help="also write the scored weights to <dir>/<method>[_<variant>]_it<N>.pt (read back by --checkpoint, "
        "which takes N from the name)",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="score this saved bundle model (e.g. runs/cimd/models/model.pt) instead of training; one method",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        type=variant_spec,
        default=None,
        metavar="NAME=FILE[,FILE]",
        help="train and score each method once per variant: its overlays after --overlays; {method} in a "
        "path is the method's name; NAME= is the bundle without overlays (default: one variant, "
        "named after the --overlays files)",
    )
    parser.add_argument(
        "--sampling-steps",
        nargs="+",
        type=positive_int,
        default=None,
        metavar="K",
        help="score the same weights once per step count (default: the bundle's inference steps)",
    )
    parser.add_argument(
        "--samplers",
        nargs="+",
        default=["bundle"],
        choices=SAMPLERS,
        help="sampling schedulers the weights are scored with; one that does not fit a variant's "
        "scheduler family (VP: ddpm, ddim; flow: euler, heun, sde) is skipped for it",
    )
    parser.add_argument(
        "--tolerance",
        nargs=2,
        type=float,
        default=[0.01, 0.02],
        metavar=("GED", "LOBE"),
        help="speed at equal quality: GED to truth and lobe error within these of the reference",
    )
    parser.add_argument(
        "--reference",
        choices=("best", "last"),
        default="best",
        help="speed at equal quality: a variant's best value over the swept steps, or its value at "
        "the largest step count",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the training and of the truth draws; the sampling seed is the bundle's: --set seed=N",
    )
    parser.add_argument("--json", default=None, help="write every row to this JSON file")
    parser.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="FILE",
        help="train nothing: print the table and the speed at equal quality (and --plot) of the rows "
        "in these --json files of earlier runs",
    )
    parser.add_argument("--plot", default=None, help="write the convergence plot (PNG) here")
    return parser.parse_args(argv)


def parse_overrides(pairs: Sequence[str]) -> dict:
    """``["batch_size=32", "learning_rate=1e-3"]`` -> ``{"batch_size": 32, "learning_rate": 0.001}`` (JSON values)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"an override is KEY=JSON, got {pair!r}")
        overrides[key] = json.loads(value)
    return overrides


def _is_dropped(handler) -> bool:
    text = (
        handler if isinstance(handler, str) else str(handler.get("_target_", "")) if isinstance(handler, dict) else ""
    )
    return any(name in text for name in DROPPED_HANDLERS)


def training_config(
    method: str, dataset_dir: str, overlays: Sequence[str], overrides: dict, iterations: int
) -> ConfigParser:
    """The bundle's training config for a pure training run (no checkpoints, validation or tracking).

    ``max_epochs`` covers ``iterations``, so that a learning-rate schedule defined over the bundle's
    run (AmbDiffSeg's warm-up and cosine decay) spans the study's run, as it would for a user
    training that long.
    """
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / method / "configs" / "train.json"), *overlays])
    parser.update({"dataset_dir": dataset_dir, "demo_dir": None, **overrides})  # main() ensured the dataset
    resolve_macros(parser, BUNDLES.parent)  # the pieces from bundles/common, to edit them by path below
    batches_per_epoch = math.ceil(len(load_split(dataset_dir, "training")) / parser.get_parsed_content("batch_size"))
    parser["max_epochs"] = math.ceil(iterations / batches_per_epoch)
    parser["device"] = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
    parser["train#handlers"] = [h for h in parser["train#handlers"] if not _is_dropped(h)]
    return parser


class WithTruth:
    """Apply a bundle's preprocessing and add the item's truth tensors (``LoadTruthd``) next to its output."""

    def __init__(self, preprocessing) -> None:
        self.preprocessing = preprocessing
        self.load_truth = LoadTruthd()

    def __call__(self, item: dict) -> dict:
        truth = {k: v for k, v in self.load_truth(dict(item)).items() if str(k).startswith("truth_")}
        return {**self.preprocessing(item), **truth}


def inference_config(method: str, dataset_dir: str, overlays: Sequence[str], overrides: dict) -> ConfigParser:
    """The bundle's inference config as the bundle runs it: train.json, the overlays, then inference.json.

    The overlays come before inference.json (a flow-matching overlay replaces the schedulers the inferer
    samples with), the overrides after everything; the ``%`` macros are resolved, so ids can be edited.
    """
    parser = ConfigParser()
    configs = BUNDLES / method / "configs"
    parser.read_config([str(configs / "train.json"), *overlays, str(configs / "inference.json")])
    parser.update({"dataset_dir": dataset_dir, "demo_dir": None, **overrides})  # main() ensured the dataset
    parser["device"] = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
    resolve_macros(parser, BUNDLES.parent)  # the pieces from bundles/common, to read them by path below
    return parser


def _referenced_id(parser: ConfigParser, config_id: str) -> str | None:
    """The id that ``config_id`` refers to when its value is a plain ``@id`` reference, else None."""
    value = parser.get(config_id)
    return value[1:] if isinstance(value, str) and re.fullmatch(r"@[\w#]+", value) else None


def steps_id(parser: ConfigParser) -> str | None:
    """The config id that sets the inference inferer's step count (None: the inferer takes no steps).

    The id ``infer#inferer#num_inference_steps`` refers to: ``inference_steps`` in every diffusion bundle
    (AmbDiffSeg's is itself ``@num_inference_steps``, its train.json's setting, which overriding
    ``inference_steps`` leaves alone); the inferer's own entry when it holds a number.
    """
    if not isinstance(parser.get("infer#inferer"), dict) or "num_inference_steps" not in parser["infer#inferer"]:
        return None
    return _referenced_id(parser, "infer#inferer#num_inference_steps") or "infer#inferer#num_inference_steps"


def scheduler_id(parser: ConfigParser) -> str | None:
    """The config id of the scheduler the inference inferer samples with (``sampling_scheduler``), or None."""
    if not isinstance(parser.get("infer#inferer"), dict):
        return None
    return _referenced_id(parser, "infer#inferer#scheduler")


def sampler_of(parser: ConfigParser) -> tuple[str, str] | None:
    """(family, sampler name) of the inference scheduler, e.g. ("flow", "heun"); None without a known one."""
    config_id = scheduler_id(parser)
    config = parser.get(config_id) if config_id else None
    if not isinstance(config, dict):
        return None
    class_name = str(config.get("_target_", "")).rsplit(".", 1)[-1]
    for family, classes in SAMPLER_CLASSES.items():
        for name, known in classes.items():
            if known == class_name:
                return family, name
    return None


def use_sampler(parser: ConfigParser, sampler: str) -> None:
    """Point the inference scheduler at ``sampler`` of its family (same schedule, same other settings).

    ``bundle`` keeps the bundle's. Raises ValueError when the sampler is not of the scheduler's family.
    """
    if sampler == "bundle":
        return
    current = sampler_of(parser)
    if current is None or sampler not in SAMPLER_CLASSES[current[0]]:
        fits = sorted(SAMPLER_CLASSES[current[0]]) if current else []
        raise ValueError(
            f"sampler {sampler!r} does not fit this bundle's sampling scheduler (it takes {fits or 'none'})."
        )
    family, _ = current
    config_id = scheduler_id(parser)
    config = dict(parser[config_id])
    config["_target_"] = f"ambiseg_monai.schedulers.{family}.{SAMPLER_CLASSES[family][sampler]}"  # module = family
    if family == "respaced" and sampler == "ddim":
        config.pop("variance_type", None)  # DDIM ignores a learned variance and takes no variance_type
    parser[config_id] = config


def inference_evaluator(
    method: str,
    dataset_dir: str,
    overlays: Sequence[str],
    overrides: dict,
    num_samples: int,
    num_images: int | None,
    split: str = "test",
    steps: int | None = None,
    sampler: str = "bundle",
) -> tuple[ConfigParser, object, TruthMetricsHandler, str]:
    """The bundle's inference evaluator on ``split`` (the first ``num_images`` of it), scoring against the truth.

    ``steps`` sets the bundle's inference step count (:func:`steps_id`; ignored by an inferer without
    steps), ``sampler`` its sampling scheduler (:func:`use_sampler`).
    Returns (parser, evaluator, truth handler, the checkpoint key its ``inference.json`` loads: "ema" or "network").
    """
    parser = inference_config(method, dataset_dir, overlays, overrides)
    use_sampler(parser, sampler)
    if steps is not None and steps_id(parser) is not None:
        parser[steps_id(parser)] = int(steps)
    weights_key = checkpoint_key(parser)
    if "progress" in parser["infer#inferer"]:
        parser["infer#inferer#progress"] = False
    if method == "consensus_diffusion":
        # C levels x G generations: the per-level draws are the sample set
        levels = parser.get_parsed_content("num_raters")
        parser["inference_generations"] = max(1, math.ceil(num_samples / levels))
        parser["infer#inferer#return_samples"] = True
        pred_key = "samples"
    else:
        parser["num_inference_samples"] = num_samples
        pred_key = "pred"
    # the items inference.json reads (engines.inference_items: image, image_path, case_id), with their truth
    items = [{**item, "image_path": item["image"]} for item in load_split(dataset_dir, split)[:num_images]]
    dataset = Dataset(items, WithTruth(parser.get_parsed_content("infer#preprocessing")))
    parser["infer#dataloader"] = DataLoader(dataset, batch_size=4, shuffle=False, num_workers=0)
    handler = TruthMetricsHandler(pred_key=pred_key)
    parser["infer#handlers"] = [handler]
    return parser, parser.get_parsed_content("infer#evaluator"), handler, weights_key


def score_network(evaluator, handler: TruthMetricsHandler, network: torch.nn.Module, weights: dict) -> dict[str, float]:
    """Load ``weights`` into the inference network, run the evaluator once, return the mean truth scores."""
    network.load_state_dict(weights)
    evaluator.run()
    results = handler.results()
    return {name: results.get(f"truth_{name}", results.get(name, float("nan"))) for name in SCORES}


# ------------------------------------------------------------------------------------------------
# reference rows
# ------------------------------------------------------------------------------------------------
def _truth_items(dataset_dir: str, num_images: int | None) -> list[dict]:
    load = LoadTruthd()
    return [load(dict(item)) for item in load_split(dataset_dir, "test")[:num_images]]


def truth_draws(item: dict, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """N x H x W masks drawn from an item's true distribution."""
    picks = torch.multinomial(item["truth_probabilities"], num_samples, replacement=True, generator=generator)
    return item["truth_modes"][picks] > 0.5


def jitter(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each mask randomly eroded, kept or dilated by one pixel (cross-shaped structuring element)."""
    choices = torch.randint(-1, 2, (len(masks),), generator=generator).tolist()
    out = []
    for mask, choice in zip(masks.numpy(), choices, strict=True):
        out.append(binary_erosion(mask) if choice < 0 else binary_dilation(mask) if choice > 0 else mask)
    return torch.as_tensor(np.stack(out))


def consensus_construction_draws(item: dict, num_samples: int, raters: int, generator: torch.Generator) -> torch.Tensor:
    """What a perfect consensus model samples: a uniform level c, then ``M^c = 1[Σ_i A_i >= c]`` of R rater draws."""
    draws = truth_draws(item, num_samples * raters, generator).reshape(
        num_samples, raters, *item["truth_modes"].shape[1:]
    )
    levels = torch.randint(1, raters + 1, (num_samples,), generator=generator)
    return draws.sum(1) >= levels[:, None, None]


def score_sample_sets(items: list[dict], samples: list[torch.Tensor]) -> dict[str, float]:
    """Mean truth scores of per-image N x H x W sample sets."""
    rows = {name: [] for name in SCORES}
    for item, preds in zip(items, samples, strict=True):
        real = item["truth_region_mask"]
        scores = truth_scores(
            preds[None],
            item["truth_modes"][None] > 0.5,
            item["truth_probabilities"][None],
            item["truth_mode_mask"][None],
            regions=item["truth_regions"][None] > 0.5 if bool(real.any()) else None,
            region_probabilities=item["truth_region_probabilities"][None],
            region_mask=real[None],
        )
        scores["isolated_pixels"] = isolated_pixel_fraction(preds[None])
        for name in SCORES:
            value = float(scores[name][0])
            if not math.isnan(value):
                rows[name].append(value)
    return {name: float(np.mean(values)) if values else float("nan") for name, values in rows.items()}


def reference_rows(dataset_dir: str, num_images: int | None, num_samples: int, raters: int, seed: int) -> list[dict]:
    items = _truth_items(dataset_dir, num_images)
    generator = torch.Generator().manual_seed(seed)
    draws = [truth_draws(item, num_samples, generator) for item in items]
    return [
        {"method": "truth", "samples": num_samples, **score_sample_sets(items, draws)},
        {"method": "truth, 1-px jitter", "samples": num_samples,
         **score_sample_sets(items, [jitter(d, generator) for d in draws])},
        {"method": "consensus construction", "samples": num_samples,
         **score_sample_sets(items, [consensus_construction_draws(i, num_samples, raters, generator) for i in items])},
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# one method
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """Run the block and restore the global random states (Python, NumPy, torch) it consumed.

    Building and running an evaluator draws from them (network initialisation, the data loader's base
    seed); kept, the training after a scored point does not depend on how many settings were scored.
    """
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()  # noqa: NPY002 (the global state is kept)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])  # noqa: NPY002 (restoring the global state)
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def variant_name(overlays: Sequence[str]) -> str:
    """A variant named after its overlay files (``flow_matching``, ``lidc+flow_matching``), or ``bundle``."""
    return "+".join(Path(o).stem for o in overlays) or BUNDLE_VARIANT


def sampling_settings(
    method: str, dataset_dir: str, overlays: Sequence[str], args: argparse.Namespace, variant: str | None = None
) -> list[tuple[str, int | None]]:
    """The (sampler, steps) settings every scored point of ``method`` with ``overlays`` is scored with.

    The ``--samplers`` that fit the bundle's sampling scheduler (``bundle`` always does; one naming the
    bundle's own sampler again is dropped), each with every ``--sampling-steps`` (None: the bundle's
    steps). A method without a sampling scheduler and steps (Prob. U-Net, PHiSeg, SSN) is scored once.
    """
    parser = inference_config(method, dataset_dir, overlays, parse_overrides(args.set))
    current = sampler_of(parser)
    if current is None or steps_id(parser) is None:
        return [("bundle", None)]  # nothing to switch or sweep
    samplers, seen = [], set()
    for name in args.samplers:
        fits = name == "bundle" or name in SAMPLER_CLASSES[current[0]]
        effective = current[1] if name == "bundle" else name
        if fits and effective not in seen:
            samplers.append(name)
            seen.add(effective)
        elif not fits:
            print(
                f"{method} ({variant or variant_name(overlays)}): sampler {name!r} does not fit its scheduler; skipped"
            )
    if not samplers:
        family = f"{current[0]}: {', '.join(SAMPLER_CLASSES[current[0]])}"
        raise SystemExit(f"{method} with overlays {list(overlays)}: none of --samplers {args.samplers} fits its "
                         f"sampling scheduler ({family}); add 'bundle' or a fitting one.")  # fmt: skip
    return [(sampler, k) for sampler in samplers for k in args.sampling_steps or [None]]


def score_settings(
    head: dict,
    weights: dict,
    settings: Sequence[tuple[str, int | None]],
    build,
    samples: int,
    images: int,
    extra: dict | None = None,
) -> list[dict]:
    """Score ``weights`` once per (sampler, steps) setting; one row each, printed as it is made.

    ``build(samples, steps, sampler)`` returns :func:`inference_evaluator`'s tuple. Building and scoring
    run with the random state kept; ``sample_s`` is the evaluator's run alone.
    """
    rows = []
    for sampler, steps in settings:
        with kept_random_state():
            parser, evaluator, handler, _ = build(samples, steps, sampler)
            start = time.perf_counter()
            scores = score_network(evaluator, handler, parser.get_parsed_content("network"), weights)
            seconds = time.perf_counter() - start
        scheduler = getattr(getattr(evaluator, "inferer", None), "scheduler", None)
        key = steps_id(parser)
        setting = {
            "sampler": sampler_of(parser)[1] if sampler_of(parser) else None,
            "sampling_steps": None if key is None else int(parser.get_parsed_content(key)),
            "network_calls": len(scheduler.timesteps) if scheduler is not None and key is not None else None,
        }
        measured = {"samples": samples, "images": images, "sample_s": round(seconds, 3)}
        row = {**head, **setting, **(extra or {}), **measured, **scores}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _builder(method: str, dataset_dir: str, overlays: Sequence[str], args: argparse.Namespace):
    overrides = parse_overrides(args.set)

    def build(samples: int, steps: int | None, sampler: str):
        return inference_evaluator(method, dataset_dir, overlays, overrides, samples, args.images,
                                   steps=steps, sampler=sampler)  # fmt: skip

    return build


def _num_images(dataset_dir: str, args: argparse.Namespace) -> int:
    return len(load_split(dataset_dir, "test")[: args.images])


def study_method(
    method: str,
    dataset_dir: str,
    args: argparse.Namespace,
    variant: str | None = None,
    overlays: Sequence[str] | None = None,
    settings: Sequence[tuple[str, int | None]] | None = None,
) -> list[dict]:
    """Train ``method`` (with ``overlays``, default ``--overlays``) up to the last of ``args.iterations``
    and score it at each of them, once per sampling setting (default: :func:`sampling_settings`)."""
    overlays = list(args.overlays if overlays is None else overlays)
    variant = variant or variant_name(overlays)
    overrides = parse_overrides(args.set)
    set_determinism(seed=args.seed)
    train = training_config(method, dataset_dir, overlays, overrides, max(args.iterations))
    trainer = train.get_parsed_content("train#trainer")
    scored = {"network": train.get_parsed_content("network")}
    checkpoints = sorted(set(args.iterations))
    final_samples = args.final_samples or args.samples
    with kept_random_state():
        settings = settings or sampling_settings(method, dataset_dir, overlays, args, variant)
        weights_key = checkpoint_key(inference_config(method, dataset_dir, overlays, overrides))
    build, images = _builder(method, dataset_dir, overlays, args), _num_images(dataset_dir, args)
    if weights_key == "ema":
        scored["ema"] = train.get_parsed_content("ema_network")
    rows: list[dict] = []
    clock = {"train_s": 0.0, "start": time.perf_counter()}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _score(engine) -> None:
        iteration = engine.state.iteration
        if iteration not in checkpoints:
            return
        clock["train_s"] += time.perf_counter() - clock["start"]
        samples = final_samples if iteration == checkpoints[-1] else args.samples
        weights = {k: v.detach().clone() for k, v in scored[weights_key].state_dict().items()}
        if args.save_dir:
            name = method if variant == BUNDLE_VARIANT else f"{method}_{variant}"
            save_weights(Path(args.save_dir) / f"{name}_it{iteration}.pt", {weights_key: weights})
        point = {"iterations": iteration, "epochs": engine.state.epoch, "train_s": round(clock["train_s"], 1)}
        rows.extend(
            score_settings({"method": method, "variant": variant}, weights, settings, build, samples, images, point)
        )
        if iteration >= checkpoints[-1]:
            engine.terminate()
        clock["start"] = time.perf_counter()

    trainer.run()
    return rows


def checkpoint_key(parser: ConfigParser) -> str:
    """The key of the model file that the inference config's CheckpointLoader loads ("ema" or "network")."""
    loader = next(h for h in parser["infer#handlers"] if "CheckpointLoader" in str(h.get("_target_", "")))
    load_dict = loader["load_dict"]
    load_dict = parser[load_dict[1:]] if isinstance(load_dict, str) else load_dict  # "@ckpt_load_dict"
    return next(iter(load_dict))


def save_weights(path: Path, model_file: dict) -> None:
    """Write a model file like the bundle's ``model.pt`` (``{"ema" or "network": state dict}``), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(model_file, partial)
    os.replace(partial, path)  # a killed study leaves no half-written model file under the final name


def score_checkpoint(
    method: str,
    dataset_dir: str,
    path: str,
    args: argparse.Namespace,
    variant: str | None = None,
    overlays: Sequence[str] | None = None,
    settings: Sequence[tuple[str, int | None]] | None = None,
) -> list[dict]:
    """Score a model file written by the bundle's training (the weights its inference.json loads), once
    per sampling setting (default: :func:`sampling_settings`)."""
    overlays = list(args.overlays if overlays is None else overlays)
    variant = variant or variant_name(overlays)
    settings = settings or sampling_settings(method, dataset_dir, overlays, args, variant)
    weights_key = checkpoint_key(inference_config(method, dataset_dir, overlays, parse_overrides(args.set)))
    weights = torch.load(path, map_location="cpu", weights_only=True)[weights_key]
    build = _builder(method, dataset_dir, overlays, args)
    point: dict = {"checkpoint": path}
    saved = re.search(r"_it(\d+)\.pt$", Path(path).name)  # a --save-dir file: <method>[_<variant>]_it<N>.pt
    if saved:
        point["iterations"] = int(saved.group(1))
    return score_settings({"method": method, "variant": variant}, weights, settings, build, args.samples,
                          _num_images(dataset_dir, args), point)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
TITLES = {"ged": "GED to truth", "mode_tv": "mode TV", "lobe_error": "lobe frequency error",
          "empty_error": "empty-fraction error"}  # fmt: skip


def _model_rows(rows: list[dict]) -> list[dict]:
    """The rows of trained or loaded models (not the truth reference rows)."""
    return [r for r in rows if "iterations" in r or "checkpoint" in r]


def _curve_key(row: dict) -> tuple:
    return row["method"], row.get("variant"), row.get("sampler")


def _label(key: tuple) -> str:
    method, variant, sampler = key
    return " · ".join(str(p) for p in (method, None if variant == BUNDLE_VARIANT else variant, sampler) if p)


def _point(row: dict):
    return row["iterations"] if "iterations" in row else row.get("checkpoint")


def _steps(row: dict) -> int:
    return -1 if row.get("sampling_steps") is None else row["sampling_steps"]


def _curves(group: list[dict], name: str, kind: str, swept: bool) -> list[tuple[list[tuple], str]]:
    """A group's curves: (x, score) points and a label suffix each.

    ``kind`` "iterations": one curve against the training iterations, at the group's largest step count.
    "steps": against the sampling steps, one curve at the group's most training iterations, and one for
    each model file scored whose name does not say its iterations.
    """
    if kind == "iterations":
        largest = max(_steps(r) for r in group)
        points = sorted((r["iterations"], r[name]) for r in group if "iterations" in r and _steps(r) == largest)
        return [(points, f" ({largest} steps)" if swept and largest > 0 else "")]
    swept_rows = [r for r in group if r.get("sampling_steps")]
    trained = [r for r in swept_rows if "iterations" in r]
    points = {(max(r["iterations"] for r in trained), "")} if trained else set()
    points |= {(r["checkpoint"], Path(r["checkpoint"]).stem) for r in swept_rows if "iterations" not in r}
    curves = []
    for point, stem in sorted(points, key=str):
        rows = [r for r in swept_rows if _point(r) == point]
        label = f" ({stem})" if stem else f" ({point} it)"
        curves.append((sorted((r["sampling_steps"], r[name]) for r in rows), label))
    return curves


def plot(rows: list[dict], path: str) -> None:
    """The four errors against training iterations (each curve at its largest step count) and, when more
    than one step count was scored, against the sampling steps (each curve at its last scored point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = _model_rows(rows)
    order = {m: i for i, m in enumerate(METHODS)}
    curves: dict[tuple, list[dict]] = {}
    for row in sorted(models, key=lambda r: order.get(r["method"], len(order))):
        curves.setdefault(_curve_key(row), []).append(row)
    trained = any("iterations" in r for r in models)
    swept = any(len({_steps(r) for r in group}) > 1 for group in curves.values())
    panels = [kind for kind, wanted in (("iterations", trained or not swept), ("steps", swept)) if wanted]
    fig, axes = plt.subplots(len(panels), 4, figsize=(17, 4 * len(panels)), squeeze=False)
    floors = {r["method"]: r for r in rows if "iterations" not in r and "checkpoint" not in r}
    for axes_row, kind in zip(axes, panels, strict=True):
        for ax, (name, title) in zip(axes_row, TITLES.items(), strict=True):
            for key, group in curves.items():
                for points, label in _curves(group, name, kind, swept):
                    if points:
                        ax.plot(*zip(*points, strict=True), marker="o", label=_label(key) + label)
            for label, style in (("truth", "--"), ("consensus construction", ":")):
                if label in floors and not math.isnan(floors[label][name]):
                    floor = floors[label]
                    ax.axhline(floor[name], color="0.3", ls=style, lw=1, label=f"{label} ({floor['samples']})")
            axis = "iterations" if kind == "iterations" else "sampling_steps"
            ticks = sorted({r[axis] for r in models if r.get(axis)})
            xlabel = "training iterations" if kind == "iterations" else "sampling steps"
            ax.set(xscale="log", xlabel=xlabel, title=title, ylim=(0, None))
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        axes_row[0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def print_table(rows: list[dict]) -> None:
    print("| method | variant | sampler | steps | iterations | train s | sample s | samples | GED to truth | mode TV "
          "| lobe error | empty error | isolated px |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        values = " | ".join(_cell(r[n], "{:.3f}") for n in SCORES)
        head = " | ".join(_cell(r.get(k)) for k in ("method", "variant", "sampler", "sampling_steps", "iterations"))
        print(f"| {head} | {_cell(r.get('train_s'), '{:.0f}')} | {_cell(r.get('sample_s'), '{:.1f}')} "
              f"| {r['samples']} | {values} |")  # fmt: skip


def seconds_per_mask(row: dict) -> float:
    """The scored point's sampling seconds per mask (the evaluator's run over ``samples`` x ``images``)."""
    return row["sample_s"] / (row["samples"] * row["images"])


def _within(row: dict, limits: dict[str, float]) -> bool:
    return all(
        math.isnan(limit) or (not math.isnan(row[name]) and row[name] <= limit) for name, limit in limits.items()
    )


def _reference(group: list[dict], reference: str) -> dict[str, float]:
    if reference == "last":
        return {name: group[-1][name] for name in ("ged", "lobe_error")}
    values = {name: [r[name] for r in group if not math.isnan(r[name])] for name in ("ged", "lobe_error")}
    return {name: min(v) if v else float("nan") for name, v in values.items()}


def equal_quality(rows: list[dict], tolerance: Sequence[float] = (0.01, 0.02), reference: str = "best") -> list[dict]:
    """Speed at equal quality over a sampling-steps sweep.

    Rows are grouped by (method, variant, sampler, scored point, samples); groups with one step count are
    left out. For each group (``target`` "own"): the fewest steps whose GED to truth is within
    ``tolerance[0]`` and lobe error within ``tolerance[1]`` of the group's reference (``"best"``: its
    lowest value over the steps, each score on its own; ``"last"``: its value at the largest step count).
    For each method, scored point and sample count with more than one group (``target`` "common"): the
    fewest steps of each group that reach the same limits, the worst group's reference plus the
    tolerance. A NaN reference drops that criterion; ``steps`` is None when no step count meets the
    limits. ``s_per_mask`` is the chosen row's sampling seconds per mask, ``speedup`` the largest step
    count's over it.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("sampling_steps") is not None:
            groups.setdefault((*_curve_key(row), _point(row), row["samples"]), []).append(row)
    groups = {key: sorted(group, key=_steps) for key, group in groups.items() if len({_steps(r) for r in group}) > 1}
    references = {key: _reference(group, reference) for key, group in groups.items()}

    def pick(key: tuple, target: str, ref: dict[str, float]) -> dict:
        group = groups[key]
        limits = {"ged": ref["ged"] + tolerance[0], "lobe_error": ref["lobe_error"] + tolerance[1]}
        chosen = next((r for r in group if _within(r, limits)), None)
        method, variant, sampler, point, samples = key
        out = {"method": method, "variant": variant, "sampler": sampler,
               "checkpoint" if isinstance(point, str) else "iterations": point, "samples": samples, "target": target,
               "ged_limit": limits["ged"], "lobe_limit": limits["lobe_error"], "steps": None}  # fmt: skip
        if chosen is not None:
            out.update(steps=chosen["sampling_steps"], network_calls=chosen.get("network_calls"), ged=chosen["ged"],
                       lobe_error=chosen["lobe_error"], mode_tv=chosen["mode_tv"], empty_error=chosen["empty_error"],
                       s_per_mask=seconds_per_mask(chosen), largest_steps=group[-1]["sampling_steps"],
                       speedup=seconds_per_mask(group[-1]) / max(seconds_per_mask(chosen), 1e-12))  # fmt: skip
        return out

    summary = [pick(key, "own", references[key]) for key in groups]
    compared: dict[tuple, list[tuple]] = {}
    for key in groups:
        compared.setdefault((key[0], *key[3:]), []).append(key)  # method, point, samples
    for keys in compared.values():
        if len(keys) > 1:
            worst = {name: [references[k][name] for k in keys if not math.isnan(references[k][name])]
                     for name in ("ged", "lobe_error")}  # fmt: skip
            common = {name: max(values) if values else float("nan") for name, values in worst.items()}
            summary += [pick(key, "common", common) for key in keys]
    return summary


def print_equal_quality(summary: list[dict], tolerance: Sequence[float], reference: str) -> None:
    which = "best value over the swept steps" if reference == "best" else "value at its largest step count"
    print(f"\nSpeed at equal quality: the fewest sampling steps with GED to truth <= reference + {tolerance[0]} and "
          f"lobe error <= reference + {tolerance[1]}; 'own': the reference is the variant's {which}; "
          "'common': the worst variant's, per method, scored point and sample count.")  # fmt: skip
    print(
        "| method | variant | sampler | iterations | samples | target | GED <= | lobe <= | steps | network calls "
        "| GED to truth | lobe error | mode TV | s per mask | speed-up vs largest steps |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        point = s.get("iterations", s.get("checkpoint"))
        largest = f" ({s['largest_steps']})" if s.get("largest_steps") else ""
        fields = [s["method"], s["variant"], s["sampler"], point, s["samples"], s["target"]]
        fields += [_cell(s[k], "{:.3f}") for k in ("ged_limit", "lobe_limit")]
        fields += [_cell(s["steps"]), _cell(s.get("network_calls"))]
        fields += [_cell(s.get(k), "{:.3f}") for k in ("ged", "lobe_error", "mode_tv")]
        fields += [_cell(s.get("s_per_mask"), "{:.4f}"), _cell(s.get("speedup"), "{:.1f}x") + largest]
        print("| " + " | ".join(str(f) for f in fields) + " |")


def _variants(args: argparse.Namespace, method: str) -> list[tuple[str, list[str]]]:
    """(name, overlay files) of each variant of ``method``: ``--overlays`` then the variant's own files."""
    if not args.variants:
        return [(variant_name(args.overlays), list(args.overlays))]
    return [(name, [*args.overlays, *(f.replace("{method}", method) for f in files)]) for name, files in args.variants]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    if args.from_json:
        loaded = [row for path in args.from_json for row in json.loads(Path(path).read_text())]
        unique = {json.dumps(row, sort_keys=True): row for row in reversed(loaded)}  # each file repeats the truth rows
        rows = [row for row in loaded if unique.get(json.dumps(row, sort_keys=True)) is row]
    else:
        rows = run(args)
    device = "cuda" if torch.cuda.is_available() else f"cpu, {args.threads} threads"
    if not args.from_json:
        print(f"\n{device}; {args.images or 'all'} test images; overlays {args.overlays or '-'}; "
              f"variants {args.variants or '-'}; overrides {args.set or '-'}")  # fmt: skip
    print_table(rows)
    summary = equal_quality(rows, args.tolerance, args.reference)
    if summary:
        print_equal_quality(summary, args.tolerance, args.reference)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot)
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    """Reference rows, then every method x variant trained and scored (or the ``--checkpoint`` scored)."""
    if args.checkpoint and (len(args.methods) != 1 or len(args.variants or [None]) != 1):
        raise SystemExit(
            "--checkpoint scores one method's model: pass --methods with one name and at most one variant."
        )
    for method in args.methods:
        for name, overlays in _variants(args, method):
            missing = [o for o in overlays if not Path(o).is_file()]
            if missing:
                raise SystemExit(f"{method}, variant {name}: no such overlay file {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        dataset_dir = ensure_demo_dataset(args.dataset_dir or f"{tmp}/demo")
        raters = json.loads((Path(dataset_dir) / "datalist.json").read_text())["num_raters"]
        rows = []
        for samples in sorted({args.samples, args.final_samples or args.samples}):
            rows += reference_rows(dataset_dir, args.images, samples, raters, args.seed)
        # every method x variant's sampling settings first: a sampler that fits none of a variant stops the
        # run before any training
        plan = [(method, name, overlays, sampling_settings(method, dataset_dir, overlays, args, name))
                for method in args.methods for name, overlays in _variants(args, method)]  # fmt: skip
        for method, name, overlays, settings in plan:
            if args.checkpoint:
                rows += score_checkpoint(method, dataset_dir, args.checkpoint, args, name, overlays, settings)
            else:
                rows += study_method(method, dataset_dir, args, name, overlays, settings)
    return rows


if __name__ == "__main__":
    main()
