"""Do the methods learn the rater distribution? Train each bundle on the demo dataset, score against the truth.

The demo dataset stores each test image's true rater distribution (K candidate masks with
probabilities, ``truth`` in datalist.json). Each method is trained from its own bundle config
(``bundles/<method>/configs/train.json``, only sizes overridden: epochs, no handlers) for a fixed
budget, then draws many samples per test image, scored with :mod:`ambiseg_monai.metrics.truth`:

- GED to the true distribution (probability-weighted, ``generalized_energy_distance_to_truth``);
- mode frequency error: ``Σ_k |f_k - p_k| / 2`` (total variation between the sampled mode
  frequencies and the true probabilities; samples matching no mode count as error);
- empty fraction of the samples against the true empty probability.

Two reference rows bound the numbers: ``truth (N draws)`` samples the true distribution itself (the
floor due to finite N) and ``raters (4 draws)`` uses the stored rater masks as the samples.

CPU default (reduced budget, minutes per method): 32 x 32 demo images, 50 epochs x 8 iterations (400),
200 samples on the 16 test images, 25 respaced steps::

    python benchmarks/quality.py                         # all methods
    python benchmarks/quality.py --methods cimd prob_unet --epochs 200 --samples 1000 --images 16
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

from ambiseg_monai.data.datalist import load_split
from ambiseg_monai.data.demo import ensure_demo_dataset
from ambiseg_monai.data.nifti import load_channel_first_nifti
from ambiseg_monai.metrics import (
    empty_fraction,
    generalized_energy_distance_to_truth,
    mode_frequency_error,
)

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
METHODS = ("cimd", "ambdiffseg", "consensus_diffusion", "prob_unet", "phiseg")
DIFFUSION = {"cimd", "ambdiffseg", "consensus_diffusion"}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--dataset-dir", default=None, help="demo dataset (generated if missing; default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=50, help="training epochs (64 images / batch 8 = 8 it/epoch)")
    parser.add_argument("--samples", type=int, default=200, help="samples per test image")
    parser.add_argument("--images", type=int, default=16, help="test images scored")
    parser.add_argument("--steps", type=int, default=25, help="respaced sampling steps (diffusion methods)")
    parser.add_argument("--compare-steps", type=int, default=1000,
                        help="CIMD only: also sample with this many steps (the paper's 1000) to check the fast "
                        "setting loses no GED (0: skip)")
    parser.add_argument("--compare-images", type=int, default=4, help="test images for the steps comparison")
    parser.add_argument("--compare-samples", type=int, default=32, help="samples per image for the steps comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the table rows to this JSON file")
    return parser.parse_args()


def load_truth(dataset_dir: str, count: int) -> list[dict]:
    """The first ``count`` test items with image (C x H x W), raters (R x H x W), modes (K x H x W), p (K)."""
    items = []
    for item in load_split(dataset_dir, "test")[:count]:
        image, _ = load_channel_first_nifti(Path(dataset_dir) / item["image"])
        raters, _ = load_channel_first_nifti(Path(dataset_dir) / item["label"])
        modes, _ = load_channel_first_nifti(Path(dataset_dir) / item["truth"]["masks"])
        items.append(
            {
                "case_id": item["case_id"],
                "image": torch.as_tensor(np.asarray(image, dtype=np.float32)),
                "raters": torch.as_tensor(np.asarray(raters) > 0),
                "modes": torch.as_tensor(np.asarray(modes) > 0),
                "probabilities": torch.tensor(item["truth"]["probabilities"], dtype=torch.float64),
            }
        )
    return items


def score(samples: torch.Tensor, item: dict) -> dict[str, float]:
    """Truth metrics of one image's N x H x W binary samples."""
    preds, modes, p = samples.bool()[None], item["modes"][None], item["probabilities"][None]
    return {
        "ged": float(generalized_energy_distance_to_truth(preds, modes, p)),
        "mode_tv": float(mode_frequency_error(preds, modes, p).sum() / 2),
        "empty": float(empty_fraction(preds)),
        "true_empty": float(empty_fraction(modes, p)),
    }


def _configure(method: str, dataset_dir: str, output_dir: str, epochs: int, samples: int, steps: int) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / method / "configs" / "train.json"))
    parser["dataset_dir"] = dataset_dir
    parser["demo_dir"] = dataset_dir
    parser["output_dir"] = output_dir
    parser["max_epochs"] = epochs
    parser["device"] = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
    # a pure training run: no checkpoints, validation, MLflow or EMA (the raw network is sampled)
    parser["train#trainer#train_handlers"] = []
    if method == "consensus_diffusion":
        # C levels x G generations per image; the level masks of uniform random levels are the sample set
        parser["consensus_inferer#num_generations"] = max(1, math.ceil(samples / parser.get_parsed_content("num_raters")))
        parser["consensus_inferer#num_inference_steps"] = steps
        parser["consensus_inferer#max_rows"] = None
    else:
        parser["validate#inferer#num_samples"] = samples
        if method in DIFFUSION:
            parser["validate#inferer#num_inference_steps"] = steps
    return parser


def sample_method(method: str, parser: ConfigParser, network: torch.nn.Module, item: dict, samples: int) -> torch.Tensor:
    """N x H x W binary samples for one test image."""
    device = next(network.parameters()).device
    image = item["image"][None].to(device)
    if method == "consensus_diffusion":
        inferer = parser.get_parsed_content("consensus_inferer")
        out = inferer(image, network, image_ids=[item["case_id"]])["samples"][0]  # C x G x H x W
        return out.transpose(0, 1).reshape(-1, *out.shape[-2:])[:samples].cpu()
    inferer = parser.get_parsed_content("validate#inferer")
    out = inferer(image, network, image_ids=[item["case_id"]])
    out = out["pred"] if isinstance(out, dict) else out
    return out[0].cpu()


def truth_draws(item: dict, samples: int, seed: int = 0) -> torch.Tensor:
    """N x H x W masks drawn from the true distribution (the finite-N floor of every metric)."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.multinomial(item["probabilities"], samples, replacement=True, generator=generator)
    return item["modes"][picks]


def compare_steps(parser: ConfigParser, network: torch.nn.Module, items: list[dict], args) -> list[dict]:
    """CIMD rows at the paper's step count and at the fast one, same network, images and sample count."""
    rows = []
    for steps in (args.compare_steps, args.steps):
        parser["validate#inferer#num_samples"] = args.compare_samples
        parser["validate#inferer#num_inference_steps"] = steps
        start = time.perf_counter()
        scores = [score(sample_method("cimd", parser, network, item, args.compare_samples), item) for item in items]
        rows.append({"method": f"cimd, {steps} steps ({args.compare_samples} samples x {len(items)} images)",
                     **_mean_scores(scores), "sample_s": time.perf_counter() - start})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def _mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        dataset_dir = ensure_demo_dataset(args.dataset_dir or f"{tmp}/demo")
        items = load_truth(dataset_dir, args.images)
        table = []
        table.append({"method": f"truth ({args.samples} draws)", **_mean_scores([score(truth_draws(i, args.samples), i) for i in items])})
        table.append({"method": "raters (4 draws)", **_mean_scores([score(i["raters"], i) for i in items])})
        for method in args.methods:
            torch.manual_seed(0)
            parser = _configure(method, dataset_dir, f"{tmp}/{method}", args.epochs, args.samples, args.steps)
            trainer = parser.get_parsed_content("train#trainer")
            start = time.perf_counter()
            trainer.run()
            train_s = time.perf_counter() - start
            network = parser.get_parsed_content("network").eval()
            start = time.perf_counter()
            scores = [score(sample_method(method, parser, network, item, args.samples), item) for item in items]
            sample_s = time.perf_counter() - start
            row = {"method": method, **_mean_scores(scores), "iterations": trainer.state.iteration,
                   "train_s": train_s, "sample_s": sample_s}  # fmt: skip
            table.append(row)
            print(f"{method}: {row}", flush=True)
            if method == "cimd" and args.compare_steps:
                table.extend(compare_steps(parser, network, items[: args.compare_images], args))
    print(f"\nreduced budget: {args.epochs} epochs, {args.samples} samples x {args.images} test images, "
          f"{args.steps} steps, device={'cuda' if torch.cuda.is_available() else 'cpu'} threads={args.threads}")  # fmt: skip
    print("| method | GED to truth | mode TV error | empty fraction (true) | iterations | train s | sample s |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        extra = f"{r['iterations']} | {r['train_s']:.0f}" if "iterations" in r else "- | -"
        extra += f" | {r['sample_s']:.0f}" if "sample_s" in r else " | -"
        print(f"| {r['method']} | {r['ged']:.3f} | {r['mode_tv']:.3f} | {r['empty']:.3f} ({r['true_empty']:.3f}) | {extra} |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
