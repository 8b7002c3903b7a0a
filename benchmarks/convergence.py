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

    python benchmarks/convergence.py                                  # all methods, CPU defaults
    python benchmarks/convergence.py --methods cimd --iterations 250 500 1000 --samples 64
    python benchmarks/convergence.py --methods cimd --overlays bundles/cimd/configs/ddpm_prob_seg.json

Writes ``--json`` (every row) and ``--plot`` (PNG: the four errors against iterations, floors dashed)
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
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
    "ProvenanceHandler",
    "CheckpointSaver",
    "TrainingSummary",  # it names the MLflow run and the validator: both would be built for nothing
)


def _parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--overlays", nargs="*", default=[], help="config files stacked on every method's train.json")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="config overrides, e.g. batch_size=32")
    parser.add_argument("--dataset-dir", default=None, help="demo dataset (default: generated in a temporary folder)")
    parser.add_argument("--iterations", type=int, nargs="+", default=[125, 250, 500, 1000, 2000, 4000],
                        help="training iterations at which the network is scored (log-spaced)")
    parser.add_argument("--samples", type=int, default=64, help="samples per test image at each score")
    parser.add_argument("--final-samples", type=int, default=None, help="samples at the last score (default --samples)")
    parser.add_argument("--images", type=int, default=None, help="test images scored (default: the whole test split)")
    parser.add_argument("--save-dir", default=None,
                        help="also write the scored weights to <dir>/<method>_it<N>.pt (read back by --checkpoint)")
    parser.add_argument("--checkpoint", default=None,
                        help="score this saved bundle model (e.g. runs/cimd/models/model.pt) instead of training; one method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every row to this JSON file")
    parser.add_argument("--plot", default=None, help="write the convergence plot (PNG) here")
    return parser.parse_args(argv)


def parse_overrides(pairs: Sequence[str]) -> dict:
    """``["batch_size=32", "learning_rate=1e-3"]`` -> ``{"batch_size": 32, "learning_rate": 0.001}`` (values are JSON)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"an override is KEY=JSON, got {pair!r}")
        overrides[key] = json.loads(value)
    return overrides


def _is_dropped(handler) -> bool:
    text = handler if isinstance(handler, str) else str(handler.get("_target_", "")) if isinstance(handler, dict) else ""
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


def inference_evaluator(
    method: str,
    dataset_dir: str,
    overlays: Sequence[str],
    overrides: dict,
    num_samples: int,
    num_images: int | None,
    split: str = "test",
) -> tuple[ConfigParser, object, TruthMetricsHandler, str]:
    """The bundle's inference evaluator on ``split`` (the first ``num_images`` of it), scoring against the truth.

    Returns (parser, evaluator, truth handler, the checkpoint key its ``inference.json`` loads: "ema" or "network").
    """
    parser = ConfigParser()
    configs = BUNDLES / method / "configs"
    parser.read_config([str(configs / "train.json"), *overlays, str(configs / "inference.json")])
    parser.update({"dataset_dir": dataset_dir, "demo_dir": None, **overrides})  # main() ensured the dataset
    parser["device"] = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
    resolve_macros(parser, BUNDLES.parent)  # the pieces from bundles/common, to read them by path below
    loader = next(h for h in parser["infer#handlers"] if "CheckpointLoader" in str(h.get("_target_", "")))
    load_dict = loader["load_dict"]
    load_dict = parser[load_dict[1:]] if isinstance(load_dict, str) else load_dict  # "@ckpt_load_dict"
    weights_key = next(iter(load_dict))
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
    for mask, choice in zip(masks.numpy(), choices):
        out.append(binary_erosion(mask) if choice < 0 else binary_dilation(mask) if choice > 0 else mask)
    return torch.as_tensor(np.stack(out))


def consensus_construction_draws(item: dict, num_samples: int, raters: int, generator: torch.Generator) -> torch.Tensor:
    """What a perfect consensus model samples: a uniform level c, then ``M^c = 1[Σ_i A_i >= c]`` of R rater draws."""
    draws = truth_draws(item, num_samples * raters, generator).reshape(num_samples, raters, *item["truth_modes"].shape[1:])
    levels = torch.randint(1, raters + 1, (num_samples,), generator=generator)
    return draws.sum(1) >= levels[:, None, None]


def score_sample_sets(items: list[dict], samples: list[torch.Tensor]) -> dict[str, float]:
    """Mean truth scores of per-image N x H x W sample sets."""
    rows = {name: [] for name in SCORES}
    for item, preds in zip(items, samples):
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
def study_method(method: str, dataset_dir: str, args: argparse.Namespace) -> list[dict]:
    """Train ``method`` up to the last of ``args.iterations`` and score it at each of them."""
    overrides = parse_overrides(args.set)
    set_determinism(seed=args.seed)
    train = training_config(method, dataset_dir, args.overlays, overrides, max(args.iterations))
    trainer = train.get_parsed_content("train#trainer")
    scored = {"network": train.get_parsed_content("network")}
    checkpoints = sorted(set(args.iterations))
    final_samples = args.final_samples or args.samples
    evaluators = {}
    for samples in {args.samples, final_samples}:
        evaluators[samples] = inference_evaluator(method, dataset_dir, args.overlays, overrides, samples, args.images)
    weights_key = evaluators[args.samples][3]
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
        parser, evaluator, handler, _ = evaluators[samples]
        start = time.perf_counter()
        weights = {k: v.detach().clone() for k, v in scored[weights_key].state_dict().items()}
        if args.save_dir:
            save_weights(Path(args.save_dir) / f"{method}_it{iteration}.pt", {weights_key: weights})
        scores = score_network(evaluator, handler, parser.get_parsed_content("network"), weights)
        row = {"method": method, "iterations": iteration, "epochs": engine.state.epoch, "samples": samples,
               "train_s": round(clock["train_s"], 1), "sample_s": round(time.perf_counter() - start, 1), **scores}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        if iteration >= checkpoints[-1]:
            engine.terminate()
        clock["start"] = time.perf_counter()

    trainer.run()
    return rows


def save_weights(path: Path, model_file: dict) -> None:
    """Write a model file like the bundle's ``model.pt`` (``{"ema" or "network": state dict}``), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(model_file, partial)
    os.replace(partial, path)  # a killed study leaves no half-written model file under the final name


def score_checkpoint(method: str, dataset_dir: str, path: str, args: argparse.Namespace) -> list[dict]:
    """Score a model file written by the bundle's training (the weights its inference.json loads)."""
    parser, evaluator, handler, weights_key = inference_evaluator(
        method, dataset_dir, args.overlays, parse_overrides(args.set), args.samples, args.images
    )
    weights = torch.load(path, map_location="cpu", weights_only=True)[weights_key]
    start = time.perf_counter()
    scores = score_network(evaluator, handler, parser.get_parsed_content("network"), weights)
    row = {"method": method, "checkpoint": path, "samples": args.samples,
           "sample_s": round(time.perf_counter() - start, 1), **scores}  # fmt: skip
    print(json.dumps(row), flush=True)
    return [row]


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"ged": "GED to truth", "mode_tv": "mode TV", "lobe_error": "lobe frequency error",
              "empty_error": "empty-fraction error"}  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    floors = {r["method"]: r for r in rows if "iterations" not in r}
    for ax, (name, title) in zip(axes, titles.items()):
        for method in methods:
            curve = sorted((r["iterations"], r[name]) for r in rows if r["method"] == method)
            ax.plot(*zip(*curve), marker="o", label=method)
        for label, style in (("truth", "--"), ("consensus construction", ":")):
            if label in floors and not math.isnan(floors[label][name]):
                ax.axhline(floors[label][name], color="0.3", ls=style, lw=1, label=f"{label} ({floors[label]['samples']})")
        ax.set(xscale="log", xlabel="training iterations", title=title, ylim=(0, None))
        ticks = sorted({r["iterations"] for r in rows if "iterations" in r})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    print("| method | iterations | train s | samples | GED to truth | mode TV | lobe error | empty error | isolated px |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        train = f"{r['iterations']} | {r['train_s']:.0f}" if "iterations" in r else "- | -"
        values = " | ".join("-" if math.isnan(r[n]) else f"{r[n]:.3f}" for n in SCORES)
        print(f"| {r['method']} | {train} | {r['samples']} | {values} |")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        dataset_dir = ensure_demo_dataset(args.dataset_dir or f"{tmp}/demo")
        raters = json.loads((Path(dataset_dir) / "datalist.json").read_text())["num_raters"]
        rows = []
        for samples in sorted({args.samples, args.final_samples or args.samples}):
            rows += reference_rows(dataset_dir, args.images, samples, raters, args.seed)
        if args.checkpoint:
            if len(args.methods) != 1:
                raise SystemExit("--checkpoint scores one method's model: pass --methods with one name.")
            rows += score_checkpoint(args.methods[0], dataset_dir, args.checkpoint, args)
        for method in [] if args.checkpoint else args.methods:
            rows += study_method(method, dataset_dir, args)
    device = "cuda" if torch.cuda.is_available() else f"cpu, {args.threads} threads"
    print(f"\n{device}; {args.images or 'all'} test images; overlays {args.overlays or '-'}; overrides {args.set or '-'}")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
