"""Where in diffusion time does a trained denoiser get the rater frequencies wrong? Compare it with the exact one.

On the demo dataset every test image's true distribution is known, so the exact denoiser of that
image (:class:`~ambiseg_monai.diffusion.MixtureOracleDenoiser`, ``E[x_0 | x_t]`` in closed form) is
available next to the trained network. Two measurements, both through the bundle's own
``inference.json`` (network, scheduler, step count):

- ``--calibration-times``: at each time t, x_t is drawn from the true process (x_0 from the truth,
  fresh noise) and both denoisers estimate each lobe's posterior inclusion probability
  ``q = (mean of x̂_0 over the lobe + 1) / 2``. A slope below 1 of ``logit q_net`` against
  ``logit q_oracle`` means the network under-uses the evidence in x_t; the mean ``|q_net - q_oracle|``
  says how far off it is, and the mean q per true lobe probability shows a prior bias. At the last
  time (t = T - 1, x_t pure noise) q is the network's marginal inclusion probability of each lobe
  given the image: its reading of the lobe's probability. Faint lesions, whose empty mode is part of
  q (q = (1 - p_empty) p), get rows of their own.
- ``--bands``: the reverse chain is run with the oracle's prediction inside a time band and the
  network's outside; the lobe error and the signed error per true probability, for normal and for
  faint lesions, show which band the frequency error comes from (if the oracle in band B brings the
  lobe error to the truth's finite-sample floor, the network's error is made in B).

``--lesions normal`` or ``faint`` reads only those images among the first ``--images``; a demo made
with more test images (``ambiseg prepare demo --out D --num-test 320``: the first 16 test images and the
training split stay the standard ones) gives many faint lesions where the standard split has one.

    python benchmarks/denoiser_vs_oracle.py --checkpoint runs/cimd/models/model.pt \\
        --calibration-times 400 500 600 700 800 999 --bands 700-1000 400-700 0-400

Times are in the scheduler's units (training timesteps 0..T-1 for the discrete bundles, [0, 1] for
continuous time). Methods whose inferer samples one distribution per image (cimd, ambdiffseg).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

try:
    from benchmarks.convergence import inference_evaluator, parse_overrides
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from convergence import inference_evaluator, parse_overrides  # type: ignore[no-redef]

from ambiseg_monai.data.demo import ensure_demo_dataset
from ambiseg_monai.diffusion import MixtureOracleDenoiser
from ambiseg_monai.metrics.truth import region_inclusion_frequency
from ambiseg_monai.networks.denoisers import ConditionalDenoiser
from ambiseg_monai.schedulers.respaced import split_model_output

PROBABILITIES = (0.25, 0.5, 0.75)
#: ``--lesions`` choice -> which images it reads (by whether the lesion is faint)
LESIONS = {"all": (False, True), "normal": (False,), "faint": (True,)}


class OracleInBand(ConditionalDenoiser):
    """The network's output, with its mean part replaced by the oracle's for times in [low, high)."""

    def __init__(self, network: ConditionalDenoiser, oracle: MixtureOracleDenoiser, low: float, high: float) -> None:
        super().__init__()
        self.network, self.oracle, self.low, self.high = network, oracle, float(low), float(high)

    def encode_condition(self, image):
        return self.network.encode_condition(image)

    def denoise(self, x_t, timesteps, cond, class_labels=None):
        out = self.network.denoise(x_t, timesteps, cond, class_labels)
        inside = (timesteps >= self.low) & (timesteps < self.high)
        if not bool(inside.any()):
            return out
        exact = self.oracle.denoise(x_t, timesteps, None).to(out.dtype)
        channels = x_t.shape[1]
        out = out.clone()
        out[:, :channels] = torch.where(inside.reshape(-1, 1, 1, 1), exact, out[:, :channels])
        return out


def _image_truth(batch: dict, i: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(K x 1 x H x W modes, K probabilities, whether the lesion is faint) of image i of a batch."""
    real = batch["truth_mode_mask"][i].bool()
    modes = batch["truth_modes"][i][real].float()
    faint = bool((modes.flatten(1).sum(1) == 0).any())
    return modes[:, None], batch["truth_probabilities"][i][real].double(), faint


def _lobes(batch: dict, i: int):
    """(region H x W bool, true probability) of each real lobe of image i."""
    for lobe in range(batch["truth_regions"].shape[1]):
        if bool(batch["truth_region_mask"][i, lobe]):
            yield batch["truth_regions"][i, lobe] > 0.5, float(batch["truth_region_probabilities"][i, lobe])


def calibration(
    network, scheduler, loader, times: Sequence[float], draws: int, seed: int, lesions: Sequence[bool] = (False, True)
) -> list[dict]:
    """Per time and kind of lesion: the logit slope of the network's lobe posterior on the oracle's, mean |Δq|,
    mean q per p (exact -> network)."""
    # faint lesions draw from a stream of their own, so that the normal rows do not depend on reading them
    generators = {faint: torch.Generator().manual_seed(seed + int(faint)) for faint in (False, True)}
    per_time: dict[tuple[float, bool], list[tuple[float, torch.Tensor, torch.Tensor]]] = {}
    for batch in loader:
        for i in range(len(batch["image"])):
            modes, probabilities, faint = _image_truth(batch, i)
            if faint not in lesions:
                continue
            generator = generators[faint]
            oracle = MixtureOracleDenoiser.for_scheduler(scheduler, modes, probabilities)
            x0 = 2 * modes[torch.multinomial(probabilities, draws, replacement=True, generator=generator)] - 1
            with torch.no_grad():
                cond = network.encode_condition(batch["image"][i : i + 1].expand(draws, -1, -1, -1))
                for t in times:
                    timesteps = torch.full((draws,), t, dtype=torch.float32 if isinstance(t, float) else torch.long)
                    alpha, sigma = scheduler.coefficients(timesteps, x0)
                    x_t = alpha * x0 + sigma * torch.randn(x0.shape, generator=generator)
                    mean_part, _ = split_model_output(network.denoise(x_t, timesteps, cond).float(), x0.shape[1])
                    net_x0 = scheduler.parameterization.predict_x0(mean_part, x_t, alpha, sigma).clamp(-1, 1)
                    exact_x0 = oracle.posterior_mean(x_t, timesteps).float()
                    for region, p in _lobes(batch, i):
                        q_net = (net_x0[:, 0][:, region].mean(1) + 1) / 2
                        q_exact = (exact_x0[:, 0][:, region].mean(1) + 1) / 2
                        per_time.setdefault((t, faint), []).append((p, q_exact, q_net))
    rows = []
    for (t, faint), entries in sorted(per_time.items()):
        q_exact = torch.cat([e[1] for e in entries])
        q_net = torch.cat([e[2] for e in entries])
        p = torch.cat([torch.full((len(e[1]),), e[0]) for e in entries])
        undecided = (q_exact > 0.02) & (q_exact < 0.98)
        slope = float("nan")
        if int(undecided.sum()) > 10:
            x, y = torch.logit(q_exact[undecided], eps=1e-3), torch.logit(q_net[undecided], eps=1e-3)
            slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        row = {"t": t, "lesions": "faint" if faint else "normal", "logit_slope": round(slope, 2),
               "undecided": int(undecided.sum()),
               "mean_abs_dq": round(float((q_net - q_exact).abs().mean()), 3)}  # fmt: skip
        for value in PROBABILITIES:
            chosen = p == value
            if bool(chosen.any()):
                row[f"q_p{value}"] = f"{float(q_exact[chosen].mean()):.2f}->{float(q_net[chosen].mean()):.2f}"
        rows.append(row)
    return rows


def band_bisection(
    network, scheduler, inferer, loader, bands: Sequence[tuple[float, float]], lesions: Sequence[bool] = (False, True)
) -> list[dict]:
    """Lobe error and signed error per true probability with the oracle inside each band (None: nowhere)."""
    rows = []
    for band in [None, *bands]:
        inferer.reset_counter()
        errors: list[tuple[float, bool, float]] = []
        for batch in loader:
            for i in range(len(batch["image"])):
                modes, probabilities, faint = _image_truth(batch, i)
                if faint not in lesions:
                    continue
                low, high = band if band is not None else (0.0, 0.0)
                oracle = MixtureOracleDenoiser.for_scheduler(scheduler, modes, probabilities)
                hybrid = OracleInBand(network, oracle, low, high)
                with torch.no_grad():
                    preds = inferer(batch["image"][i : i + 1], hybrid, image_ids=[batch["case_id"][i]])
                preds = preds.cpu() > 0.5
                regions = batch["truth_regions"][i : i + 1] > 0.5
                real = batch["truth_region_mask"][i : i + 1].bool()
                frequencies = region_inclusion_frequency(preds, regions, real)[0]
                for lobe, p in enumerate(batch["truth_region_probabilities"][i].tolist()):
                    if bool(real[0, lobe]):
                        errors.append((p, faint, float(frequencies[lobe]) - p))
        row = {"oracle_band": "none" if band is None else f"[{band[0]:g}, {band[1]:g})",
               "lobe_error": round(float(np.mean([abs(e) for _, _, e in errors])), 3)}  # fmt: skip
        for prefix, kind in (("", False), ("faint_", True)):
            for value in PROBABILITIES:
                signed = [e for p, faint, e in errors if p == value and faint == kind]
                row[f"{prefix}signed_p{value}"] = round(float(np.mean(signed)), 3) if signed else float("nan")
        row["faint_lobes"] = [round(e, 2) for _, faint, e in errors if faint]
        rows.append(row)
        print(row, flush=True)
    return rows


def _time(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="cimd", choices=["cimd", "ambdiffseg"])
    parser.add_argument("--checkpoint", required=True, help="a model file written by the bundle's training")
    parser.add_argument("--overlays", nargs="*", default=[], help="config overlays of the training run")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="config overrides of the run")
    parser.add_argument("--dataset-dir", default="data/demo")
    parser.add_argument("--images", type=int, default=None, help="first N test images (default: all)")
    parser.add_argument("--lesions", choices=sorted(LESIONS), default="all", help="read only these images")
    parser.add_argument("--samples", type=int, default=64, help="samples per image for --bands")
    parser.add_argument("--draws", type=int, default=64, help="x_t draws per image and time for calibration")
    parser.add_argument("--calibration-times", nargs="*", type=_time, default=[])
    parser.add_argument("--bands", nargs="*", default=None, metavar="LOW-HIGH",
                        help="oracle bands; --bands alone samples the model only")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    dataset_dir = ensure_demo_dataset(args.dataset_dir)
    overrides = {"seed": args.seed, **parse_overrides(args.set)}
    parser, _, _, weights_key = inference_evaluator(
        args.method, dataset_dir, args.overlays, overrides, args.samples, args.images
    )
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True)[weights_key])
    network.eval()
    scheduler = parser.get_parsed_content("sampling_scheduler")
    loader = parser.get_parsed_content("infer#dataloader")
    results: dict[str, list[dict]] = {}
    if args.calibration_times:
        results["calibration"] = calibration(
            network, scheduler, loader, args.calibration_times, args.draws, args.seed, LESIONS[args.lesions]
        )
        for row in results["calibration"]:
            print(row, flush=True)
    if args.bands is not None:
        bands = [tuple(_time(v) for v in band.split("-", 1)) for band in args.bands]
        inferer = parser.get_parsed_content("infer#inferer")
        results["bands"] = band_bisection(
            network, scheduler, inferer, loader, bands, LESIONS[args.lesions]  # type: ignore[arg-type]
        )
    return results


if __name__ == "__main__":
    main()
