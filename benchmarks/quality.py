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

from ambiseg_monai.bundle.config import resolve_macros
from ambiseg_monai.data.datalist import load_split
from ambiseg_monai.data.demo import ensure_demo_dataset
from ambiseg_monai.data.nifti import load_channel_first_nifti
from ambiseg_monai.metrics import (
    empty_fraction,
    generalized_energy_distance_to_truth,
    mode_frequency_error,
)

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
METHODS = ("cimd", "ambdiffseg", "consensus_diffusion", "prob_unet", "phiseg", "ssn")
DIFFUSION = {"cimd", "ambdiffseg", "consensus_diffusion"}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--dataset-dir", default=None, help="demo dataset (generated if missing; default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=50, help="training epochs (64 images / batch 8 = 8 it/epoch)")
    parser.add_argument("--samples", type=int, default=200, help="samples per test image")
    parser.add_argument("--images", type=int, default=16, help="test images scored")
    parser.add_argument("--steps", type=int, default=25, help="respaced sampling steps (diffusion methods)")
    parser.add_argument("--compare-steps", nargs="*", default=["ddpm:1000", "ddpm:25"], metavar="SAMPLER:STEPS",
                        help="CIMD only: also sample the same network with each of these settings (ddpm or ddim, "
                        "respaced steps) to check the fast setting loses no GED against the paper's ddpm:1000 "
                        "(none: skip)")
    parser.add_argument("--compare-images", type=int, default=4, help="test images for the steps comparison")
    parser.add_argument("--compare-samples", type=int, default=32, help="samples per image for the steps comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the table rows to this JSON file")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="reuse <dir>/<method>.pt instead of training when it exists; else train and save it there")
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
    resolve_macros(parser, BUNDLES.parent)  # the pieces from bundles/common, to edit them by path below
    parser["dataset_dir"] = dataset_dir
    parser["demo_dir"] = None  # main() ensured the dataset
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


def parse_sampler_setting(spec: str) -> tuple[str, int, bool]:
    """``"ddim:25"`` -> ("ddim", 25, False); ``"ddpm:25:amp"`` also runs the network under autocast.

    The sampler is ``ddpm`` (ancestral, learned range) or ``ddim`` (eta 0); ``amp`` is bfloat16 autocast
    on the CPU and float16 on CUDA (the scheduler arithmetic stays float32).
    """
    parts = spec.split(":")
    sampler, steps, precision = (parts + ["", ""])[:3]
    if (
        len(parts) > 3
        or sampler not in ("ddpm", "ddim")
        or not steps.isdigit()
        or int(steps) < 1
        or precision not in ("", "amp")
    ):
        raise ValueError(f"a sampler setting is 'ddpm:STEPS' or 'ddim:STEPS' (STEPS >= 1), optionally ':amp'; got {spec!r}.")
    return sampler, int(steps), precision == "amp"


def autocast(device: torch.device, enabled: bool):
    """Mixed precision for the network calls: bfloat16 on the CPU, float16 on CUDA."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def use_sampler(parser: ConfigParser, sampler: str) -> None:
    """Point the CIMD bundle's ``sampling_scheduler`` at the respaced DDPM or DDIM scheduler (same schedule)."""
    resolve_macros(parser, BUNDLES.parent)  # "sampling_scheduler": "%noise_scheduler" -> its copy
    config = dict(parser["sampling_scheduler"])
    config.pop("variance_type", None)
    if sampler == "ddim":
        config["_target_"] = "ambiseg_monai.schedulers.respaced.RespacedDDIMScheduler"
    else:
        config["_target_"] = "ambiseg_monai.schedulers.respaced.RespacedDDPMScheduler"
        config["variance_type"] = "learned_range"
    parser["sampling_scheduler"] = config


def compare_steps(parser: ConfigParser, network: torch.nn.Module, items: list[dict], args) -> list[dict]:
    """CIMD rows for each ``--compare-steps`` setting: same network, images, sample count and seeds."""
    rows = []
    device = next(network.parameters()).device
    for sampler, steps, amp in map(parse_sampler_setting, args.compare_steps):
        use_sampler(parser, sampler)
        parser["validate#inferer#num_samples"] = args.compare_samples
        parser["validate#inferer#num_inference_steps"] = steps
        start = time.perf_counter()
        with autocast(device, amp):
            scores = [score(sample_method("cimd", parser, network, item, args.compare_samples), item) for item in items]
        precision = ", AMP" if amp else ""
        label = f"cimd, {sampler.upper()} {steps} steps{precision} ({args.compare_samples} samples x {len(items)} images)"
        rows.append({"method": label, **_mean_scores(scores), "sample_s": time.perf_counter() - start})
        print(rows[-1], flush=True)
    use_sampler(parser, "ddpm")
    return rows


def train_or_load(method: str, parser: ConfigParser, checkpoint_dir: str | None) -> tuple[torch.nn.Module, dict]:
    """The bundle's network after the training budget (or loaded from ``checkpoint_dir``) and the training row."""
    network = parser.get_parsed_content("network")
    saved = Path(checkpoint_dir) / f"{method}.pt" if checkpoint_dir else None
    if saved is not None and saved.exists():
        stored = torch.load(saved, map_location=next(network.parameters()).device, weights_only=True)
        network.load_state_dict(stored["network"])
        return network.eval(), stored["row"]
    trainer = parser.get_parsed_content("train#trainer")
    start = time.perf_counter()
    trainer.run()
    row = {"iterations": trainer.state.iteration, "train_s": time.perf_counter() - start}
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"network": network.state_dict(), "row": row}, saved)
    return network.eval(), row


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
            network, train_row = train_or_load(method, parser, args.checkpoint_dir)
            start = time.perf_counter()
            scores = [score(sample_method(method, parser, network, item, args.samples), item) for item in items]
            row = {"method": method, **_mean_scores(scores), **train_row, "sample_s": time.perf_counter() - start}
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
