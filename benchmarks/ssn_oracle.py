"""Is the Stochastic Segmentation Network's frequency error its construction or its learning? Fit its family directly.

An SSN draws logit maps from a low-rank Gaussian ``N(loc, P P^T + diag(D))`` (``K = C x H x W`` values; the
bundle: 2 classes, rank 10, ``D = exp(log D) + 1e-5``) and is trained with the Monte Carlo log-likelihood
``-log (1/M) Σ_m p(y | eta_m)`` (``M = 20``). On the demo dataset every test image's true distribution is
known (modes ``y_k`` with probabilities ``π_k``), so the family can be fitted to it **without a network**:
per image the free parameters ``loc`` (K), ``P`` (K x R) and ``log D`` (K), ``D`` produced as the network
produces it, are fitted by Adam to the bundle's own loss
(:class:`~ambiseg_monai.losses.ssn.StochasticSegmentationLoss`) with a fresh batch of rater masks drawn from
the truth at every step. The fitted distribution is then sampled as the network's inference samples
(:func:`~ambiseg_monai.networks.ssn.sample_logit_maps` with the bundle inferer's per-(image, sample)
generators, foreground where the foreground logit wins) and scored like ``convergence.py``. Rows:

- ``truth``: ``--samples`` draws from the truth itself (the finite-sample floor);
- ``network`` (with ``--checkpoint``): the trained bundle's samples through its ``inference.json`` inferer;
- ``oracle fit, M = m, rank r``: the family of rank ``r`` fitted with the ``m``-sample loss from the start an
  untrained head gives (``loc = 0``, ``D = 1``, a small random factor); ``M = 20, rank 10`` is the bundle's
  construction and loss. Near the floor: the family and loss can represent and do choose the truth, so the
  network's gap is its learning; near the network: the gap is the construction. Across ``M``: what the Monte
  Carlo loss prefers (``M = 1`` is the expected cross-entropy of one draw, which Jensen's inequality makes
  favour no variance at all); across the rank: whether two independent lobes need two factor columns or fall
  to the diagonal;
- ``start at the truth, rank r`` and ``oracle fit, ..., from the truth`` (``--fits M:R:truth``): the distribution
  of the family built to draw the truth (:func:`start_at_truth`; exact but for the faint lesions, whose
  "lesion missed" event the lobes cannot follow) and the fit started from it. The start scores how close the
  family can come; the fit from it, whether the loss keeps the truth (what the loss prefers near it), while the
  fit from a random start shows also where the optimisation gets to (its lobe frequencies freeze once the
  logits are sharp: the gradient of a frequency flows only through draws near the threshold).

The fits use one foreground logit (``num_classes=1``: the same family as the bundle's two classes, see
:mod:`~ambiseg_monai.networks.ssn`, and the same loss value, at a quarter of the CPU time); ``M:R:2`` fits with
the bundle's two logit channels. Each step draws ``--batch`` raters per image (default ``80 // M`` between 1
and 8, so that ``M x batch`` logit maps per image and step stay near 80 but for ``M`` > 80), Adam with a cosine
decay of ``--lr`` to 1 % over ``--steps``.

Per row: GED to truth, mode TV, lobe error, empty error, isolated pixels; mode TV split into its two additive
terms, ``½ × unmatched`` (the share of samples that match no mode by the truth metrics' rule,
:func:`~ambiseg_monai.metrics.truth.assign_modes`: best IoU not above 0, i.e. overlapping no mode) and
``½ Σ_k |f_k - π_k|`` (frequencies of all samples, so the frequency error among the matched ones); the share
of samples equal to their assigned mode (IoU 1), with best IoU below 0.5, and with a partial lobe (a non-empty
sample covering between 10 % and 90 % of a lobe: the per-pixel-variance failure); the signed lobe error per
true probability (normal lesions; faint lesions listed); and, for the network and every fit, the share of the
foreground logit's variance in the low-rank part, ``mean diag(P_f P_f^T) / (diag(P_f P_f^T) + D_f)`` over the
lesion's pixels (any mode's foreground) and over the lobes' pixels (the ambiguous ones), with ``P_f, D_f`` the
factor and diagonal of the foreground logit ``eta_1 - eta_0`` (``P_1 - P_0``, ``D_1 + D_0``).

Each fit prints its loss over the steps (means of tenths of the run) and whether it flattened (the last tenth's
mean within 1 % of the one before, ``flat``; with the decayed learning rate a plateau, not proof of an optimum).

    python benchmarks/ssn_oracle.py --checkpoint w/ssn_it10000.pt --dataset-dir data/demo --samples 200 \\
        --mc-samples 1 20 200 --ranks 1 10 --threads 1 --json ssn_oracle.json
    python benchmarks/ssn_oracle.py --checkpoint w/ssn_it10000.pt --samples 200 --steps 1000 \\
        --fits 1:1 1:10 20:1 20:10 200:10 20:1:truth 20:10:truth 200:10:truth --threads 1

The model file is one ``convergence.py --save-dir`` writes or the bundle's ``model.pt``. The fits of all
images run as one batch (the parameters of the images do not interact; Adam is per parameter).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

try:
    from benchmarks import convergence, latent_oracle
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import convergence  # type: ignore[no-redef]
    import latent_oracle  # type: ignore[no-redef]

from ambiseg_monai.data.demo import ensure_demo_dataset
from ambiseg_monai.diffusion.sampler import make_generators
from ambiseg_monai.losses.ssn import StochasticSegmentationLoss
from ambiseg_monai.metrics.pairwise import MaskSetOverlaps
from ambiseg_monai.metrics.truth import sampled_mode_frequencies
from ambiseg_monai.networks.ssn import COVARIANCE_EPSILON, foreground_logits, sample_logit_maps

METHOD = "ssn"
BUNDLE_MC, BUNDLE_RANK, BUNDLE_CLASSES = 20, 10, 2  # bundles/ssn/configs/train.json
PARTIAL = (0.1, 0.9)  # a lobe covered strictly between these fractions is partial
BREAKDOWN = ("tv_unmatched", "tv_frequency", "unmatched", "exact", "low_iou", "partial_lobe")


# ------------------------------------------------------------------------------------------------
# helpers (tested on their own)
# ------------------------------------------------------------------------------------------------
def best_iou(samples: torch.Tensor, modes: torch.Tensor, mode_mask: torch.Tensor) -> torch.Tensor:
    """N best IoUs of N x H x W binary samples with the real modes (two empty masks: IoU 1), by the metrics' own
    overlap counts (:class:`~ambiseg_monai.metrics.pairwise.MaskSetOverlaps`)."""
    real = mode_mask.bool()[None]
    overlaps = MaskSetOverlaps.from_masks(samples.bool()[None], modes.bool()[None], real)
    return overlaps.iou_pred_rater()[0].masked_fill(~real, -1.0).max(1).values.double()


def mode_tv_breakdown(item: dict, samples: torch.Tensor) -> dict[str, float]:
    """One image's mode TV as ``tv_unmatched + tv_frequency`` and the sample-shape shares (see the module doc)."""
    samples = samples.cpu().bool()
    modes, real = item["truth_modes"] > 0.5, item["truth_mode_mask"].bool()
    assigned = latent_oracle.best_modes(samples, modes, real)  # the truth metrics' rule: -1 overlaps no mode
    frequencies = sampled_mode_frequencies(samples[None], modes[None], real[None])[0]
    pi = item["truth_probabilities"].double()
    unmatched = float((assigned < 0).double().mean())
    iou = best_iou(samples, modes, real)
    partial = torch.zeros(len(samples), dtype=torch.bool)
    regions = (item["truth_regions"] > 0.5)[item["truth_region_mask"].bool()]
    if len(regions):
        cover = samples.flatten(1).double() @ regions.flatten(1).double().T / regions.flatten(1).sum(1).double()
        partial = ((cover > PARTIAL[0]) & (cover < PARTIAL[1])).any(1)
    return {
        "tv_unmatched": 0.5 * unmatched,
        "tv_frequency": 0.5 * float(((frequencies - pi).abs() * real).sum()),
        "unmatched": unmatched,
        "exact": float((iou == 1).double().mean()),
        "low_iou": float((iou < 0.5).double().mean()),
        "partial_lobe": float(partial.double().mean()),
    }


def foreground_covariance(
    cov_factor: torch.Tensor | None, cov_diag: torch.Tensor, num_classes: int, height: int, width: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """B x K x R factor and B x K diagonal (K = C H W, channel-major) -> those of the foreground logit,
    B x HW x R and B x HW (``C = 2``: ``P_1 - P_0`` and ``D_1 + D_0``; ``C = 1``: unchanged)."""
    batch = cov_diag.shape[0]
    diag = cov_diag.reshape(batch, num_classes, height * width)
    diag = diag[:, 0] if num_classes == 1 else diag[:, 0] + diag[:, 1]
    if cov_factor is None:
        return None, diag
    factor = cov_factor.reshape(batch, num_classes, height * width, -1)
    return (factor[:, 0] if num_classes == 1 else factor[:, 1] - factor[:, 0]), diag


def low_rank_share(
    cov_factor: torch.Tensor | None, cov_diag: torch.Tensor, num_classes: int, pixels: torch.Tensor
) -> float:
    """Mean over the H x W bool ``pixels`` of the foreground logit's low-rank variance share
    ``diag(P_f P_f^T) / (diag(P_f P_f^T) + D_f)`` of one image (K x R factor, K diagonal); NaN without pixels."""
    if not bool(pixels.any()):
        return float("nan")
    height, width = pixels.shape
    factor, diag = foreground_covariance(
        None if cov_factor is None else cov_factor[None], cov_diag[None], num_classes, height, width
    )
    low = torch.zeros_like(diag[0]) if factor is None else (factor[0] ** 2).sum(-1)
    share = low.double() / (low.double() + diag[0].double())
    return float(share[pixels.flatten().to(share.device)].mean())


def variance_stats(item: dict, cov_factor: torch.Tensor | None, cov_diag: torch.Tensor, num_classes: int) -> dict:
    """The low-rank share over the lesion's pixels (any real mode) and over the lobes' pixels."""
    lesion = ((item["truth_modes"] > 0.5) & item["truth_mode_mask"].bool()[:, None, None]).any(0)
    lobes = ((item["truth_regions"] > 0.5) & item["truth_region_mask"].bool()[:, None, None]).any(0)
    return {
        "lowrank_share_lesion": low_rank_share(cov_factor, cov_diag, num_classes, lesion),
        "lowrank_share_lobes": low_rank_share(cov_factor, cov_diag, num_classes, lobes),
    }


class OracleRow(latent_oracle.Row):
    """A row of :mod:`latent_oracle` (scores, signed lobe errors) plus the mode-TV breakdown and variance shares."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.breakdown: list[dict[str, float]] = []
        self.variance: list[dict[str, float]] = []
        self.fit: dict | None = None

    def add(self, item: dict, samples: torch.Tensor, drawn: torch.Tensor | None = None) -> None:
        super().add(item, samples, drawn)
        self.breakdown.append(mode_tv_breakdown(item, samples))

    def result(self, items: list[dict]) -> dict:
        out = super().result(items)
        for name in ("mode_match", "mode_match_rare", "mode_match_middle", "mode_match_common"):
            out.pop(name)  # no drawn modes here
        out.update({name: float(np.mean([b[name] for b in self.breakdown])) for name in BREAKDOWN})
        for name in ("lowrank_share_lesion", "lowrank_share_lobes"):
            values = [v[name] for v in self.variance if not math.isnan(v[name])]
            out[name] = float(np.mean(values)) if values else float("nan")
        if self.fit is not None:
            out["fit"] = self.fit
        return out


# ------------------------------------------------------------------------------------------------
# the oracle: the SSN's family with free parameters
# ------------------------------------------------------------------------------------------------
class OracleSSN(nn.Module):
    """The distribution family of :class:`~ambiseg_monai.networks.ssn.StochasticSegmentationNetwork` with free
    parameters for ``images`` images: ``loc`` (I x K), ``cov_factor`` (I x K x R) and ``log_cov_diag`` (I x K),
    ``cov_diag = exp(log_cov_diag) + epsilon`` as the network's head. Initialised as an untrained head gives
    them, roughly: ``loc = 0``, ``D = 1``, a small random factor (``init_scale``), which breaks the symmetry."""

    def __init__(self, images: int, height: int, width: int, rank: int, num_classes: int = 1,
                 epsilon: float = COVARIANCE_EPSILON, init_scale: float = 0.1,
                 generator: torch.Generator | None = None) -> None:  # fmt: skip
        super().__init__()
        self.num_classes, self.height, self.width, self.epsilon = num_classes, height, width, float(epsilon)
        size = num_classes * height * width
        self.loc = nn.Parameter(torch.zeros(images, size))
        self.log_cov_diag = nn.Parameter(torch.zeros(images, size))
        self.cov_factor = nn.Parameter(init_scale * torch.randn(images, size, rank, generator=generator))

    def parameters_dict(self) -> dict[str, torch.Tensor]:
        """``{"loc", "cov_diag", "cov_factor"}``, as the network's ``distribution_parameters``."""
        return {"loc": self.loc, "cov_diag": self.log_cov_diag.exp() + self.epsilon, "cov_factor": self.cov_factor}

    def training_output(self, repeats: int) -> dict[str, torch.Tensor]:
        """The network's training dict with every image's row repeated ``repeats`` times (image-major)."""
        params = {key: value.repeat_interleave(repeats, dim=0) for key, value in self.parameters_dict().items()}
        maps = params["loc"].reshape(-1, self.num_classes, self.height, self.width)
        return {"logits": foreground_logits(maps, self.num_classes)[:, None], **params}

    @torch.no_grad()
    def sample(self, num_samples: int, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """I x N x H x W foreground logits, drawn as the network's ``_sample`` draws them."""
        params = self.parameters_dict()
        logits = sample_logit_maps(params["loc"], params["cov_factor"], params["cov_diag"], num_samples, generators)
        maps = logits.reshape(len(params["loc"]), num_samples, self.num_classes, self.height, self.width)
        return foreground_logits(maps, self.num_classes)


def default_batch(mc_samples: int) -> int:
    """Rater draws per image and step: ``80 // M`` between 1 and 8 (M x batch logit maps per image and step)."""
    return max(1, min(8, 80 // mc_samples))


@torch.no_grad()
def start_at_truth(model: OracleSSN, items: list[dict], scale: float = 8.0) -> None:
    """Set a one-logit model (``num_classes=1``) to draw each item's truth, as nearly as the family can.

    Background ``-2 s``; lobe ``l``: ``s (w_l + Φ^-1(p_l))`` with factor column ``l mod R`` (included with
    probability ``p_l``, independently of the other lobes when ``R`` >= the lobes); the core ``+2 s``, or, where
    raters miss the lesion with probability ``e``, ``s (w_c + Φ^-1(1 - e))`` on column ``L mod R``; ``D = 0.01``.
    Exact (up to the pixels' small noise) for a lesion the raters never miss and ``R >= L``; for a faint one the
    lobes ignore the core's presence (an AND of two events is no half-space of the Gaussian: the family cannot
    draw it)."""
    if model.num_classes != 1:
        raise ValueError("start_at_truth: the truth-built start is for one foreground logit (num_classes=1).")
    normal = torch.distributions.Normal(0.0, 1.0)
    rank = model.cov_factor.shape[-1]
    model.log_cov_diag.fill_(math.log(1e-2))
    for i, item in enumerate(items):
        modes, real = item["truth_modes"] > 0.5, item["truth_mode_mask"].bool()
        pi = item["truth_probabilities"].double()
        empty = float((pi * (~modes.flatten(1).any(1)) * real).sum())
        region_mask = item["truth_region_mask"].bool()
        regions = (item["truth_regions"] > 0.5)[region_mask].flatten(1)
        lesion = (modes & real[:, None, None]).any(0).flatten()
        loc = torch.full(lesion.shape, -2 * scale)
        factor = torch.zeros(len(loc), rank)
        core = lesion & ~regions.any(0)
        if empty > 0:
            loc[core] = scale * float(normal.icdf(torch.tensor(1 - empty)))
            factor[core, len(regions) % rank] = scale
        else:
            loc[core] = 2 * scale
        for lobe, (region, p) in enumerate(zip(regions, item["truth_region_probabilities"][region_mask], strict=True)):
            loc[region] = scale * float(normal.icdf(torch.tensor(float(p))))
            factor[region] = 0.0
            factor[region, lobe % rank] = scale
        model.loc[i] = loc
        model.cov_factor[i] = factor


class Fit(NamedTuple):
    """One oracle fit: the loss's M, the family's rank, its logit channels, and its start ("random" or "truth")."""

    mc: int
    rank: int
    classes: int = 1
    start: str = "random"


def parse_fit(text: str) -> Fit:
    """``M:R`` (one logit, random start), ``M:R:2`` (the bundle's two classes) or ``M:R:truth`` (truth-built start)."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("2", "truth")):
            raise ValueError
        mc, rank = convergence.positive_int(parts[0]), convergence.positive_int(parts[1])
    except (ValueError, argparse.ArgumentTypeError):
        message = f"a fit is M:R, M:R:2 or M:R:truth with positive M and R, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    extra = parts[2] if len(parts) == 3 else ""
    return Fit(mc, rank, 2 if extra == "2" else 1, "truth" if extra == "truth" else "random")


def fit_oracle(items: list[dict], rank: int, mc_samples: int, steps: int, batch: int | None = None,
               lr: float = 0.1, seed: int = 0, num_classes: int = 1,
               start: str = "random") -> tuple[OracleSSN, dict]:  # fmt: skip
    """Fit the family to each item's truth by the bundle's loss with ``mc_samples`` draws: every step ``batch``
    (default :func:`default_batch`) rater masks per image drawn from the truth; Adam with a cosine decay of
    ``lr`` to 1 % over ``steps``.

    Returns the fitted model and ``{"loss": means of tenths of the run, "flat": bool, "seconds"}``.
    """
    began = time.perf_counter()
    batch = batch or default_batch(mc_samples)
    height, width = items[0]["truth_modes"].shape[1:]
    torch.manual_seed(seed)  # the loss's Monte Carlo draws use the global RNG
    generator = torch.Generator().manual_seed(seed)
    model = OracleSSN(len(items), height, width, rank, num_classes, generator=generator)
    if start == "truth":
        start_at_truth(model, items)
    loss_fn = StochasticSegmentationLoss(num_mc_samples=mc_samples)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr * 0.01)
    losses = []
    for _ in range(steps):
        target = torch.cat([convergence.truth_draws(item, batch, generator) for item in items])[:, None].float()
        loss = loss_fn(model.training_output(batch), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    tenths = [float(np.mean(chunk)) for chunk in np.array_split(np.asarray(losses), min(10, steps))]
    flat = len(tenths) > 1 and abs(tenths[-1] - tenths[-2]) <= 0.01 * abs(tenths[-2])
    return model, {"loss": [round(x, 3) for x in tenths], "flat": bool(flat), "batch": batch, "mc": mc_samples,
                   "classes": num_classes, "seconds": round(time.perf_counter() - began, 1)}  # fmt: skip


def fit_name(fit: Fit) -> str:
    bundle = " (the bundle's)" if (fit.mc, fit.rank) == (BUNDLE_MC, BUNDLE_RANK) else ""
    extra = (", 2 classes" if fit.classes == 2 else "") + (", from the truth" if fit.start == "truth" else "")
    return f"oracle fit, M = {fit.mc}, rank {fit.rank}{extra}{bundle}"


# ------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def network_row(checkpoint: str, dataset_dir: str, samples: int, images: int | None, seed: int,
                row: OracleRow) -> list[dict]:  # fmt: skip
    """Sample the trained bundle through its inference.json inferer (as convergence.py scores it) into ``row``;
    returns the items (with their truth) in the loader's order."""
    parser, _, _, key = convergence.inference_evaluator(METHOD, dataset_dir, [], {"seed": seed}, samples, images)
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)[key])
    network.eval()
    device = next(network.parameters()).device
    inferer = parser.get_parsed_content("infer#inferer")
    items = []
    for batch in parser.get_parsed_content("infer#dataloader"):
        image = batch["image"].to(device)
        pred = inferer(image, network, image_ids=list(batch["case_id"]))
        params = network.distribution_parameters(image)
        for i, item in enumerate(latent_oracle._items(batch)):
            item["case_id"] = batch["case_id"][i]
            items.append(item)
            row.add(item, pred[i] > 0.5)
            factor = params.get("cov_factor")
            row.variance.append(variance_stats(item, None if factor is None else factor[i].cpu(),
                                               params["cov_diag"][i].cpu(), network.num_classes))  # fmt: skip
    return items


def _sampled_row(name: str, model: OracleSSN, items: list[dict], samples: int, seed: int) -> OracleRow:
    """``samples`` masks per item from ``model``, drawn with the inferer's per-(image, sample) generators."""
    row = OracleRow(name)
    logits = model.sample(samples, make_generators(seed, [item["case_id"] for item in items], samples))
    params = {key: value.detach() for key, value in model.parameters_dict().items()}
    for i, item in enumerate(items):
        row.add(item, logits[i] > 0)
        row.variance.append(variance_stats(item, params["cov_factor"][i], params["cov_diag"][i],
                                           model.num_classes))  # fmt: skip
    return row


def oracle_rows(items: list[dict], samples: int, fits: Sequence[Fit], steps: int, batch: int | None = None,
                lr: float = 0.1, seed: int = 0, log=print) -> list[OracleRow]:  # fmt: skip
    """One row per fit (all items fitted at once), sampled with the inferer's generators; before the first fit
    from the truth of each rank, the truth-built start itself (``start at the truth, rank R``, not fitted)."""
    rows = []
    for fit in fits:
        if fit.start == "truth" and not any(r.name == f"start at the truth, rank {fit.rank}" for r in rows):
            height, width = items[0]["truth_modes"].shape[1:]
            model = OracleSSN(len(items), height, width, fit.rank, 1)
            start_at_truth(model, items)
            rows.append(_sampled_row(f"start at the truth, rank {fit.rank}", model, items, samples, seed))
        model, info = fit_oracle(items, fit.rank, fit.mc, steps, batch, lr, seed, fit.classes, fit.start)
        row = _sampled_row(fit_name(fit), model, items, samples, seed)
        row.fit = info
        log(f"{row.name}: loss by tenths {info['loss']}, flat {info['flat']}, {info['seconds']} s")
        rows.append(row)
    return rows


def fit_configs(mc_list: Sequence[int], ranks: Sequence[int], bundle_classes: bool = False) -> list[Fit]:
    """Each M with each rank in one foreground logit, then (``bundle_classes``) the bundle's M = 20, rank 10 with
    its two classes."""
    fits = [Fit(mc, rank) for mc in mc_list for rank in ranks]
    return [*fits, Fit(BUNDLE_MC, BUNDLE_RANK, BUNDLE_CLASSES)] if bundle_classes else fits


def ssn_oracle(dataset_dir: str, samples: int, images: int | None, checkpoint: str | None = None,
               configs: Sequence[Fit] = fit_configs((1, 20, 200), (1, 10)), steps: int = 2000,
               batch: int | None = None, lr: float = 0.1, seed: int = 0, log=print) -> dict:  # fmt: skip
    """Every row on the first ``images`` test images (see the module doc)."""
    network = OracleRow("network") if checkpoint else None
    if network is not None:
        items = network_row(checkpoint, dataset_dir, samples, images, seed, network)
    else:
        items = convergence._truth_items(dataset_dir, images)
    truth = OracleRow("truth")
    generator = torch.Generator().manual_seed(seed)
    for item in items:
        truth.add(item, convergence.truth_draws(item, samples, generator))
    rows = [truth, *([network] if network else []), *oracle_rows(items, samples, configs, steps, batch, lr, seed,
                                                                   log)]  # fmt: skip
    return {"checkpoint": checkpoint, "images": len(items), "steps": steps, "lr": lr,
            "rows": [row.result(items) for row in rows]}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
_f = latent_oracle._f


def print_rows(result: dict) -> None:
    print(f"\nSSN oracle: {result['checkpoint'] or 'no network'}, {result['images']} test images, "
          f"{result['steps']} Adam steps per fit, lr {result['lr']}")  # fmt: skip
    print("| row | samples | GED to truth | mode TV | lobe error | empty error | isolated px | TV unmatched + "
          "TV frequency | exact / IoU < 0.5 / partial lobe | signed error p = 0.25 / 0.5 / 0.75 | faint lobes | "
          "low-rank share (lesion / lobes) | raters x M per step | loss flat |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        scores = " | ".join(_f(r[n]) for n in convergence.SCORES)
        signed = " / ".join(_f(r[f"signed_p{p}"], "{:+.3f}") for p in latent_oracle.PROBABILITIES)
        shape = " / ".join(_f(r[n], "{:.2f}") for n in ("exact", "low_iou", "partial_lobe"))
        share = f"{_f(r['lowrank_share_lesion'], '{:.2f}')} / {_f(r['lowrank_share_lobes'], '{:.2f}')}"
        fit = r.get("fit")
        flat, per_step = (
            ("-", "-") if fit is None else ("yes" if fit["flat"] else "no", f"{fit['batch']} x {fit['mc']}")
        )
        print(f"| {r['row']} | {r['samples']} | {scores} | {_f(r['tv_unmatched'])} + {_f(r['tv_frequency'])} | "
              f"{shape} | {signed} | {r['faint_lobes']} | {share} | {per_step} | {flat} |")  # fmt: skip


def _parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="trained SSN weights (bundle model.pt or convergence "
                        "--save-dir) for the network row; none: no network row")  # fmt: skip
    parser.add_argument("--dataset-dir", default="data/demo")
    parser.add_argument("--samples", type=convergence.positive_int, default=200, help="samples per test image")
    parser.add_argument("--images", type=convergence.positive_int, default=None, help="first N test images")
    parser.add_argument("--steps", type=convergence.positive_int, default=2000, help="Adam steps per fit")
    parser.add_argument("--batch", type=convergence.positive_int, default=None,
                        help="rater draws per image and step (default: 80 // M, between 1 and 8)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=0.1, help="Adam's learning rate (cosine decay to 1 %%)")
    parser.add_argument("--mc-samples", type=convergence.positive_int, nargs="*", default=[1, 20, 200],
                        help="M of the fitted loss, one fit per rank each (the bundle: 20; none: no fits)")  # fmt: skip
    parser.add_argument("--ranks", type=convergence.positive_int, nargs="*", default=[1, 10],
                        help="ranks of the fitted family, one row each (the bundle: 10)")  # fmt: skip
    parser.add_argument("--bundle-classes", action="store_true", help="also fit M = 20, rank 10 with the "
                        "bundle's two logit channels (slower; the others: one foreground logit)")  # fmt: skip
    parser.add_argument("--fits", type=parse_fit, nargs="+", default=None, metavar="M:R[:2|:truth]",
                        help="the fits instead of the --mc-samples x --ranks grid: M:R, M:R:2 (two classes), "
                        "M:R:truth (started at the truth-built distribution)")  # fmt: skip
    parser.add_argument("--threads", type=convergence.positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the truth draws, the fits and the samples "
                        "(also the network row's inferer seed)")  # fmt: skip
    parser.add_argument("--json", default=None, help="write the rows here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    dataset_dir = ensure_demo_dataset(args.dataset_dir)
    start = time.perf_counter()
    configs = args.fits or fit_configs(args.mc_samples, args.ranks, args.bundle_classes)
    result = ssn_oracle(dataset_dir, args.samples, args.images, args.checkpoint, configs, args.steps, args.batch,
                        args.lr, args.seed)  # fmt: skip
    result["seconds"] = round(time.perf_counter() - start, 1)
    print_rows(result)
    print(f"\n{result['seconds']} s, {args.threads} threads")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
