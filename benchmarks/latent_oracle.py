"""Is a latent model's frequency error in its prior, its posterior or its decoder? Swap in the oracle latent.

On the demo dataset every test image's true distribution is known (modes ``y_k`` with probabilities
``π_k``), so the posterior net of a Probabilistic U-Net or PHiSeg can be fed the true modes. Each row
below decodes ``--samples`` latents per test image with the trained decoder and is scored against the
truth like ``convergence.py`` (GED to truth, mode TV, lobe error, empty error, isolated pixels):

- ``truth``: N draws from the truth itself (the finite-sample floor);
- ``prior``: the bundle's own samples (``z ~ p(z | x)`` through its ``inference.json`` inferer and seed);
- ``oracle latent``: ``k ~ π``, then ``z ~ q(z | x, y_k)`` from the posterior net, decoded. Near the
  floor: decoder and posterior represent the distribution and the error is the prior's; far from it:
  the posterior's draws of one mode decode to others (they overlap) or the decoder cannot draw the mode;
- ``posterior mean``: ``k ~ π``, ``z`` the mean of ``q(z | x, y_k)``: does the decoder reproduce ``y_k``?
- Prob. U-Net only, a bisection of the prior (diagonal Gaussians, whatever the latent family):
  ``aggregate-moment prior``, ``z ~ N(m, v)`` with ``m, v`` the per-dimension moments of the aggregated
  posterior ``Σ_k π_k q(z | x, y_k)``: the Gaussian that minimises ``Σ_k π_k KL(q_k || p)``, i.e. what the
  prior net is trained towards when its targets' frequencies are the true ones (the best diagonal
  Gaussian prior for this posterior); and the two halves of it, ``prior mean, aggregate std`` and
  ``aggregate mean, prior std``.
- PHiSeg only, a bisection of the hierarchy: ``posterior at levels >= l``, the coarse latents from the
  posterior of a drawn mode and the finer ones from the prior conditioned on them.

Per row also the mode match (Prob. U-Net and PHiSeg posterior rows: the share of the samples drawn for
mode k whose decoded mask's best-IoU mode is k), the signed lobe error per true probability (normal
lesions; faint lesions listed), and the pair diversity ``1 - Σ_k f_k²`` (the chance two samples fall to
different modes; the truth's is ``1 - Σ_k π_k²``). Latent statistics per image (Prob. U-Net): KL of each
mode's posterior to the prior against ``-log π_k`` (the least a posterior must pay to single out its mode
when the prior's mass per mode is right), the prior's mean and std against the aggregated posterior's,
``KL(N(m, v) || p)``, how much of the aggregated variance lies between the modes, and how the decoder
depends on z (the share of prior draws decoded to another mode than the prior's mean; which true modes
any latent decodes to; the modes met along the latent's mode axis and whether its pixels switch once).
PHiSeg: the KL per latent level and mode.

    python benchmarks/latent_oracle.py --method prob_unet --checkpoint w/prob_unet_it10000.pt \\
        --dataset-dir data/demo --samples 64 --threads 1 --json latent_oracle.json

The model file is one ``convergence.py --save-dir`` writes or a bundle's ``model.pt``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.distributions import Independent, Normal

try:
    from benchmarks import convergence
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import convergence  # type: ignore[no-redef]

from ambiseg_monai.data.demo import ensure_demo_dataset
from ambiseg_monai.metrics.truth import assign_modes, region_inclusion_frequency
from ambiseg_monai.networks.latent_distributions import latent_kl_divergence, sample_with_generators

METHODS = ("prob_unet", "phiseg")
PROBABILITIES = (0.25, 0.5, 0.75)
#: the mode match per drawn mode's probability: rare (π < 0.15), middle, common (π >= 0.4)
MATCH_BINS = (("rare", 0.0, 0.15), ("middle", 0.15, 0.4), ("common", 0.4, 1.01))
TRUTH_KEYS = ("truth_modes", "truth_probabilities", "truth_mode_mask", "truth_regions",
              "truth_region_probabilities", "truth_region_mask")  # fmt: skip


# ------------------------------------------------------------------------------------------------
# helpers (tested on their own)
# ------------------------------------------------------------------------------------------------
def draw_modes(probabilities: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` mode indices drawn with replacement from ``probabilities`` (K, padded modes at 0)."""
    return torch.multinomial(probabilities.double().cpu(), num, replacement=True, generator=generator)


def best_modes(samples: torch.Tensor, modes: torch.Tensor, mode_mask: torch.Tensor) -> torch.Tensor:
    """The assigned mode of each of N x H x W binary samples (-1: overlaps no mode): the rule of the truth
    metrics, :func:`~ambiseg_monai.metrics.truth.assign_modes`, for one image."""
    return assign_modes(samples[None], modes[None], mode_mask.bool()[None])[0].cpu()


def pair_diversity(assigned: torch.Tensor) -> float:
    """``1 - Σ_k f_k²`` of the mode assignments (-1, unmatched, is a category of its own)."""
    _, counts = torch.unique(assigned, return_counts=True)
    f = counts.double() / len(assigned)
    return float(1 - (f**2).sum())


def gaussian_moments(
    means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and variance of the mixture ``Σ_k w_k N(means_k, diag stds_k²)`` (K x D inputs)."""
    w = (weights / weights.sum()).to(means.dtype)[:, None]
    m = (w * means).sum(0)
    v = (w * (stds**2 + means**2)).sum(0) - m**2
    return m, v.clamp(min=1e-12)


def diagonal_gaussian(mean: torch.Tensor, std: torch.Tensor) -> Independent:
    return Independent(Normal(mean, std), 1)


# ------------------------------------------------------------------------------------------------
# the two networks' latent paths
# ------------------------------------------------------------------------------------------------
def _normal_draw(generator: torch.Generator) -> Callable[[torch.distributions.Distribution], torch.Tensor]:
    """A sampler of a latent distribution (any family, batch shape (R,)) drawing from ``generator``."""

    def draw(distribution):
        return sample_with_generators(distribution, [generator] * distribution.batch_shape[0])

    return draw


def _mean(distribution) -> torch.Tensor:
    return distribution.mean


class ProbUNetProbe:
    """Prior, posterior and decoder of one image of a :class:`~ambiseg_monai.networks.ProbabilisticUNet`."""

    def __init__(self, network, image: torch.Tensor) -> None:
        self.network, self.image = network, image  # 1 x C x H x W
        self.features = network.unet(image)
        self.prior_params = network.prior.encode(image)  # 1 x P
        self.prior = network.latent_distribution(self.prior_params)  # batch (1,), event (D,)

    def prior_rows(self, rows: int):
        """p(z | x) repeated ``rows`` times (batch (rows,))."""
        return self.network.latent_distribution(self.prior_params.expand(rows, -1))

    def posterior(self, masks: torch.Tensor):
        """q(z | x, y) of each of M x H x W masks: batch (M,)."""
        x = self.image.expand(len(masks), -1, -1, -1)
        return self.network.posterior(torch.cat([x, masks[:, None].to(x.dtype) - 0.5], dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """M x D latents -> M x H x W binary masks (the bundle's threshold: logit > 0)."""
        return self.network.combine(self.features.expand(len(z), -1, -1, -1), z)[:, 0] > 0

    def posterior_samples(self, masks: torch.Tensor, draw) -> torch.Tensor:
        return self.decode(draw(self.posterior(masks)))


class PHiSegProbe:
    """Prior, posterior and likelihood of one image of a :class:`~ambiseg_monai.networks.PHiSeg`.

    The latent chain is walked coarse to fine one level at a time (the encoders' ``override_samples``),
    so that each level can come from the posterior or the prior, conditioned on the coarser levels drawn.
    """

    def __init__(self, network, image: torch.Tensor) -> None:
        self.network, self.image = network, image
        _, z = network.prior(image)
        self.shapes = [tuple(level.shape[1:]) for level in z]

    def chain(self, masks: torch.Tensor | None, rows: int, posterior_from: int, draw) -> list[torch.Tensor]:
        """Latents per level (0 = finest): levels >= ``posterior_from`` from q(z_l | z_{l+1}, x, y) of
        ``masks`` (rows x H x W), the finer ones from p(z_l | z_{l+1}, x); ``draw(distribution)`` samples."""
        x = self.image.expand(rows, -1, -1, -1)
        post_in = None if masks is None else torch.cat([x, masks[:, None].to(x.dtype) - 0.5], dim=1)
        samples: list[torch.Tensor | None] = [None] * len(self.shapes)
        for level in reversed(range(len(self.shapes))):
            use_posterior = level >= posterior_from
            encoder, inputs = (self.network.posterior, post_in) if use_posterior else (self.network.prior, x)
            override = [s if s is not None else x.new_zeros(rows, *self.shapes[i]) for i, s in enumerate(samples)]
            distributions, _ = encoder(inputs, override_samples=override)
            samples[level] = draw(distributions[level])
        return [s for s in samples if s is not None]

    def decode(self, z: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.network.likelihood(z, self.image.shape[2:])[:, 0] > 0

    def posterior_samples(self, masks: torch.Tensor, draw, posterior_from: int = 0) -> torch.Tensor:
        return self.decode(self.chain(masks, len(masks), posterior_from, draw))

    def level_kl(self, masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """M x L: KL(q(z_l | z_{l+1}, x, y) || p(z_l | z_{l+1}, x)) with z from the posterior (the training KL)."""
        x = self.image.expand(len(masks), -1, -1, -1)
        z = self.chain(masks, len(masks), 0, _normal_draw(generator))
        posteriors, _ = self.network.posterior(torch.cat([x, masks[:, None].to(x.dtype) - 0.5], 1), override_samples=z)
        priors, _ = self.network.prior(x, override_samples=z)
        return torch.stack([latent_kl_divergence(q, p) for q, p in zip(posteriors, priors, strict=True)], dim=1)


# ------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------
class Row:
    """One row's per-image sample sets, lobe errors and (posterior rows) mode matches."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.samples: list[torch.Tensor] = []
        self.lobes: list[tuple[float, bool, float]] = []  # (p, faint, f - p)
        self.matches: list[float] = []  # per image: share of draws of mode k decoded to mode k
        self.match_by_pi: list[tuple[float, bool]] = []  # per draw: (π of the drawn mode, decoded to it)
        self.diversity: list[float] = []

    def add(self, item: dict, samples: torch.Tensor, drawn: torch.Tensor | None = None) -> None:
        samples = samples.cpu().bool()
        self.samples.append(samples)
        assigned = best_modes(samples, item["truth_modes"] > 0.5, item["truth_mode_mask"])
        self.diversity.append(pair_diversity(assigned))
        if drawn is not None:
            self.matches.append(float((assigned == drawn).double().mean()))
            pi = item["truth_probabilities"][drawn].tolist()
            self.match_by_pi += list(zip(pi, (assigned == drawn).tolist(), strict=True))
        real = item["truth_region_mask"].bool()
        if bool(real.any()):
            f = region_inclusion_frequency(samples[None], item["truth_regions"][None] > 0.5, real[None])[0]
            for lobe in torch.nonzero(real).flatten().tolist():
                p = float(item["truth_region_probabilities"][lobe])
                self.lobes.append((p, _faint(item), float(f[lobe]) - p))

    def result(self, items: list[dict]) -> dict:
        out = {"row": self.name, "samples": int(self.samples[0].shape[0]),
               **convergence.score_sample_sets(items, self.samples)}  # fmt: skip
        out["mode_match"] = float(np.mean(self.matches)) if self.matches else float("nan")
        out["pair_diversity"] = float(np.mean(self.diversity))
        for name, low, high in MATCH_BINS:
            hits = [hit for pi, hit in self.match_by_pi if low <= pi < high]
            out[f"mode_match_{name}"] = float(np.mean(hits)) if hits else float("nan")
        for value in PROBABILITIES:
            signed = [e for p, faint, e in self.lobes if p == value and not faint]
            out[f"signed_p{value}"] = float(np.mean(signed)) if signed else float("nan")
        out["faint_lobes"] = [round(e, 2) for _, faint, e in self.lobes if faint]
        return out


def _faint(item: dict) -> bool:
    modes, real = item["truth_modes"], item["truth_mode_mask"].bool()
    return bool(((modes.flatten(1).sum(1) == 0) & real).any())


def _items(batch: dict) -> list[dict]:
    return [{key: batch[key][i] for key in TRUTH_KEYS} for i in range(len(batch["image"]))]


def _oracle_rows(probe, image, item, n: int, generator, rows: dict[str, Row]):
    """The rows both methods share: draw n true modes by their probabilities, decode the posterior's samples
    (``oracle latent``) and means (``posterior mean``) of them. Returns (modes, real, pi, draw, k, masks)."""
    modes, real = item["truth_modes"] > 0.5, item["truth_mode_mask"].bool()
    pi = item["truth_probabilities"].double()
    draw = _normal_draw(generator)
    k = draw_modes(pi, n, generator)
    masks = modes[k].to(image.device)
    rows["oracle latent"].add(item, probe.posterior_samples(masks, draw), k)
    rows["posterior mean"].add(item, probe.posterior_samples(masks, _mean), k)
    return modes, real, pi, draw, k, masks


def prob_unet_image(network, image, item, n: int, generator, rows: dict[str, Row], stats: list[dict]) -> None:
    """Every Prob. U-Net row and the latent statistics of one image."""
    probe = ProbUNetProbe(network, image)
    modes, real, pi, draw, k, masks = _oracle_rows(probe, image, item, n, generator, rows)
    # the aggregated posterior over the true modes, its moments, and the prior
    index = torch.nonzero(real).flatten()
    q = probe.posterior(modes[index].to(image.device))
    mu_k, sd_k, w = q.mean.double(), q.stddev.double(), pi[index]
    m, v = gaussian_moments(mu_k, sd_k, w)
    mu_p, sd_p = probe.prior.mean[0].double(), probe.prior.stddev[0].double()
    swaps = {"aggregate-moment prior": (m, v.sqrt()), "prior mean, aggregate std": (mu_p, v.sqrt()),
             "aggregate mean, prior std": (m, sd_p)}  # fmt: skip
    for name, (mean, std) in swaps.items():
        z = mean + std * torch.randn(n, len(mean), generator=generator, dtype=torch.float64)
        rows[name].add(item, probe.decode(z.to(image.dtype)))
    # per mode: KL to the prior, the decoded posterior mean's IoU with the mode
    kl_modes = latent_kl_divergence(q, probe.prior_rows(len(index))).double()
    decoded = probe.decode(mu_k.to(image.dtype)).cpu()
    inter = (decoded & modes[index]).flatten(1).sum(1).double()
    union = (decoded | modes[index]).flatten(1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    between = (w[:, None] / w.sum() * (mu_k - m) ** 2).sum(0)  # per-dimension variance of the modes' means
    # how the decoder depends on z: the share of prior draws decoded to another mode than the prior mean
    z_prior = mu_p + sd_p * torch.randn(n, len(mu_p), generator=generator, dtype=torch.float64)
    at_mean = best_modes(probe.decode(mu_p[None].to(image.dtype)).cpu(), modes, real)
    changed = best_modes(probe.decode(z_prior.to(image.dtype)).cpu(), modes, real) != at_mean
    reachable, sweep, multi_flip = _decoder_reach(probe, modes[index], mu_p, sd_p, m, between, generator)
    stats.append({
        "pi": [round(float(p), 3) for p in w],
        "kl_modes": [round(float(x), 2) for x in kl_modes],
        "reachable": reachable,
        "axis_sweep": sweep,
        "axis_multi_flip_pixels": multi_flip,
        "minus_log_pi": [round(float(-math.log(p)), 2) for p in w],
        "kl_weighted": float((w * kl_modes).sum()),
        "entropy_pi": float(-(w * w.log()).sum()),
        "posterior_mean_iou": [round(float(x), 3) for x in iou],
        "posterior_mean_exact": [bool((decoded[j] == modes[index][j]).all()) for j in range(len(index))],
        "prior_mean_shift": float(((mu_p - m).abs() / v.sqrt()).mean()),  # in aggregated std units
        "prior_std_ratio": float((sd_p / v.sqrt()).mean()),
        "kl_aggregate_to_prior": float(
            torch.distributions.kl_divergence(diagonal_gaussian(m, v.sqrt()), diagonal_gaussian(mu_p, sd_p))
        ),
        "between_share": float(between.sum() / v.sum()),  # share of the aggregated variance between modes
        "mode_dims": int((between / v > 0.5).sum()),  # dimensions where the modes' means dominate
        "prior_draws_changed": float(changed.double().mean()),  # the truth's: 1 - π of the prior mean's mode
        "posterior_std": float(sd_k.mean()),
        "prior_std": float(sd_p.mean()),
    })  # fmt: skip


def _decoder_reach(probe, modes, mu_p, sd_p, m, between, generator, draws: int = 4096, steps: int = 161):
    """Which true modes can the decoder draw at all, and what does it draw along the latent's mode axis?

    ``reachable``: per mode, whether any of ``draws`` latents from the prior widened 3x decodes to a mask with
    IoU >= 0.9 with it. Along the axis of the largest between-mode variance (the other coordinates at the
    aggregated mean ``m``, ``± 4`` prior stds around it): the sequence of decoded best modes (-1: none,
    repeats dropped) and the share of the pixels that switch more than once along the axis (0: the axis
    decodes to a nested chain of masks, each pixel turning on or off once).
    """
    z = mu_p + 3 * sd_p * torch.randn(draws, len(mu_p), generator=generator, dtype=torch.float64)
    decoded = probe.decode(z.to(probe.image.dtype)).cpu().flatten(1).double()
    flat = modes.flatten(1).double()
    inter = decoded @ flat.T
    union = decoded.sum(1)[:, None] + flat.sum(1)[None] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    reachable = [bool(x) for x in (iou >= 0.9).any(0)]
    axis = int(between.argmax())
    line = m.repeat(steps, 1)
    line[:, axis] = m[axis] + torch.linspace(-4, 4, steps, dtype=torch.float64) * sd_p[axis]
    masks = probe.decode(line.to(probe.image.dtype)).cpu()
    assigned = best_modes(masks, modes, torch.ones(len(modes), dtype=torch.bool)).tolist()
    sweep = [a for i, a in enumerate(assigned) if i == 0 or a != assigned[i - 1]]
    flips = (masks[1:] != masks[:-1]).flatten(1).sum(0)
    multi_flip = float((flips > 1).double().sum() / (flips > 0).double().sum().clamp(min=1))
    return reachable, sweep, multi_flip


def phiseg_image(network, image, item, n: int, generator, rows: dict[str, Row], stats: list[dict]) -> None:
    """Every PHiSeg row (oracle, posterior mean, the level bisection) and its KL per level of one image."""
    probe = PHiSegProbe(network, image)
    modes, real, pi, draw, k, masks = _oracle_rows(probe, image, item, n, generator, rows)
    levels = len(probe.shapes)
    for start in range(1, levels):
        rows[f"posterior at levels >= {start}"].add(item, probe.posterior_samples(masks, draw, start), k)
    index = torch.nonzero(real).flatten()
    kl = probe.level_kl(modes[index].to(image.device), generator)  # M x L
    w = pi[index]
    stats.append({
        "pi": [round(float(p), 3) for p in w],
        "minus_log_pi": [round(float(-math.log(p)), 2) for p in w],
        "kl_modes_levels": [[round(float(x), 2) for x in row] for row in kl],
        "kl_weighted": float((w * kl.double().sum(1)).sum()),
        "kl_weighted_levels": [float((w * kl[:, level].double()).sum()) for level in range(levels)],
        "entropy_pi": float(-(w * w.log()).sum()),
    })  # fmt: skip


def row_names(method: str, network) -> list[str]:
    names = ["truth", "prior", "oracle latent", "posterior mean"]
    if method == "prob_unet":
        return [*names, "aggregate-moment prior", "prior mean, aggregate std", "aggregate mean, prior std"]
    return [*names, *(f"posterior at levels >= {level}" for level in range(1, network.latent_levels))]


@torch.no_grad()
def latent_oracle(method: str, checkpoint: str, dataset_dir: str, samples: int, images: int | None,
                  seed: int = 0, overrides: dict | None = None, overlays: Sequence[str] = ()) -> dict:  # fmt: skip
    """Rows and latent statistics of ``method``'s weights in ``checkpoint`` on the first ``images`` test images."""
    parser, _, _, key = convergence.inference_evaluator(method, dataset_dir, overlays, overrides or {}, samples, images)
    torch.manual_seed(seed)  # Monte Carlo KL of the mixture families
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)[key])
    network.eval()
    device = next(network.parameters()).device
    inferer = parser.get_parsed_content("infer#inferer")  # the bundle's prior sampling, seed and per-image streams
    loader = parser.get_parsed_content("infer#dataloader")
    generator = torch.Generator().manual_seed(seed)
    rows = {name: Row(name) for name in row_names(method, network)}
    items: list[dict] = []
    stats: list[dict] = []
    per_image = prob_unet_image if method == "prob_unet" else phiseg_image
    for batch in loader:
        images_batch = batch["image"].to(device)
        prior = inferer(images_batch, network, image_ids=list(batch["case_id"]))
        for i, item in enumerate(_items(batch)):
            items.append(item)
            rows["truth"].add(item, convergence.truth_draws(item, samples, generator))
            rows["prior"].add(item, prior[i] > 0.5)
            per_image(network, images_batch[i : i + 1], item, samples, generator, rows, stats)
            stats[-1]["case_id"] = batch["case_id"][i]
    return {"method": method, "checkpoint": checkpoint, "images": len(items),
            "rows": [row.result(items) for row in rows.values()], "latent_stats": stats}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _f(value, fmt: str = "{:.3f}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def print_rows(result: dict) -> None:
    print(f"\n{result['method']}: {result['checkpoint']}, {result['images']} test images")
    print("| row | samples | GED to truth | mode TV | lobe error | empty error | isolated px | mode match (rare "
          "/ middle / common π) | signed error p = 0.25 / 0.5 / 0.75 | faint lobes | pair diversity |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        scores = " | ".join(_f(r[n]) for n in convergence.SCORES)
        signed = " / ".join(_f(r[f"signed_p{p}"], "{:+.3f}") for p in PROBABILITIES)
        by_pi = " / ".join(_f(r[f"mode_match_{name}"], "{:.2f}") for name, _, _ in MATCH_BINS)
        match = f"{_f(r['mode_match'])} ({by_pi})" if r["mode_match"] == r["mode_match"] else "-"
        print(f"| {r['row']} | {r['samples']} | {scores} | {match} | {signed} | "
              f"{r['faint_lobes']} | {_f(r['pair_diversity'])} |")  # fmt: skip


def print_stats(result: dict) -> None:
    stats = result["latent_stats"]
    if result["method"] == "prob_unet":
        print("\n| case | π | KL(q_k || p) | -log π_k | posterior-mean IoU | prior mean shift (agg. std) | prior std "
              "/ agg. std | KL(N(m, v) || p) | between-mode share | mode dims | prior draws changed | reachable modes "
              "| modes along the mode axis | pixels switching > once |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in stats:
            print(f"| {s['case_id']} | {s['pi']} | {s['kl_modes']} | {s['minus_log_pi']} | {s['posterior_mean_iou']} "
                  f"| {s['prior_mean_shift']:.2f} | {s['prior_std_ratio']:.2f} | {s['kl_aggregate_to_prior']:.2f} "
                  f"| {s['between_share']:.2f} | {s['mode_dims']} | {s['prior_draws_changed']:.2f} | "
                  f"{''.join('y' if r else 'n' for r in s['reachable'])} | {s['axis_sweep']} "
                  f"| {s['axis_multi_flip_pixels']:.2f} |")  # fmt: skip
        names = ("kl_weighted", "entropy_pi", "prior_mean_shift", "prior_std_ratio", "kl_aggregate_to_prior",
                 "between_share", "mode_dims", "prior_draws_changed", "posterior_std", "prior_std")  # fmt: skip
        exact = [e for s in stats for e in s["posterior_mean_exact"]]
        summary = {name: round(float(np.mean([s[name] for s in stats])), 3) for name in names}
        summary["posterior_mean_exact_share"] = round(float(np.mean(exact)), 3)
        summary["reachable_modes_share"] = round(float(np.mean([r for s in stats for r in s["reachable"]])), 3)
        summary["axis_multi_flip_pixels"] = round(float(np.mean([s["axis_multi_flip_pixels"] for s in stats])), 3)
        summary["posterior_mean_iou"] = round(float(np.mean([x for s in stats for x in s["posterior_mean_iou"]])), 3)
    else:
        print("\n| case | π | KL per mode and level (finest first) | -log π_k |")
        print("|---|---|---|---|")
        for s in stats:
            print(f"| {s['case_id']} | {s['pi']} | {s['kl_modes_levels']} | {s['minus_log_pi']} |")
        levels = len(stats[0]["kl_weighted_levels"])
        summary = {name: round(float(np.mean([s[name] for s in stats])), 3) for name in ("kl_weighted", "entropy_pi")}
        summary["kl_weighted_levels"] = [round(float(np.mean([s["kl_weighted_levels"][lv] for s in stats])), 3)
                                         for lv in range(levels)]  # fmt: skip
    result["latent_summary"] = summary
    print("\nmeans over images:", json.dumps(summary))


def _parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--checkpoint", required=True, help="a model file (bundle model.pt or convergence --save-dir)")
    parser.add_argument("--dataset-dir", default="data/demo")
    parser.add_argument("--samples", type=int, default=64, help="samples per test image in every row")
    parser.add_argument("--images", type=int, default=None, help="first N test images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the truth, mode and latent draws (the prior "
                        "row keeps the bundle's sampling seed: --set seed=N)")  # fmt: skip
    parser.add_argument("--overlays", nargs="*", default=[], help="config overlays of the training run")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="config overrides of the run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the rows and the latent statistics here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    dataset_dir = ensure_demo_dataset(args.dataset_dir)
    start = time.perf_counter()
    result = latent_oracle(args.method, args.checkpoint, dataset_dir, args.samples, args.images, args.seed,
                           convergence.parse_overrides(args.set), args.overlays)  # fmt: skip
    result["seconds"] = round(time.perf_counter() - start, 1)
    print_rows(result)
    print_stats(result)
    print(f"\n{result['seconds']} s, cpu, {args.threads} threads" if not torch.cuda.is_available() else "")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
