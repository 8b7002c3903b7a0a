"""ELBO losses of the latent-variable baselines (Probabilistic U-Net family, PHiSeg).

``SupervisedTrainer(..., inferer=LatentTrainingInferer(), loss_function=ProbUNetELBOLoss(network=net) |
PHiSegELBOLoss())``: the network's training dict (logits and KL terms, see
:class:`~ambiseg_monai.inferers.latent.LatentTrainingInferer`) and the training mask -> the loss. Add the
loss object to ``train_handlers`` so that a divergence error names the trainer's iteration; its
``last_terms`` hold the individual terms for logging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Events
from torch import nn

__all__ = ["ProbUNetELBOLoss", "PHiSegELBOLoss"]


class _LatentELBOLoss(nn.Module):
    """Shared machinery: L2 term, divergence check naming the iteration and term, per-term logging."""

    name = "latent ELBO"
    network: nn.Module | None  # set through __dict__ in __init__

    def __init__(self, l2_weight: float, network: nn.Module | None) -> None:
        super().__init__()
        if l2_weight < 0:
            raise ValueError(f"{type(self).__name__}: l2_weight must be >= 0, got {l2_weight}.")
        if l2_weight > 0 and network is None:
            raise ValueError(
                f"{type(self).__name__}: l2_weight={l2_weight} needs the network whose parameters it "
                "regularises (pass network=...)."
            )
        self.l2_weight = float(l2_weight)
        # A plain attribute (not a submodule) so the loss does not re-register or save the network's weights.
        self.__dict__["network"] = network
        self.iteration = 0
        self.last_terms: dict[str, float] = {}

    def attach(self, engine: Any) -> None:
        """Ignite handler protocol: take the trainer's iteration number for error messages."""

        def _sync_iteration(engine: Any) -> None:
            self.iteration = engine.state.iteration - 1  # forward() adds 1

        engine.add_event_handler(Events.ITERATION_STARTED, _sync_iteration)

    def _l2(self, reference: torch.Tensor) -> torch.Tensor:
        if self.l2_weight == 0 or self.network is None:  # no network only with l2_weight == 0 (see __init__)
            return reference.new_zeros(())
        total = sum(p.pow(2).sum() for p in self.network.parameters() if p.requires_grad)
        return total if isinstance(total, torch.Tensor) else reference.new_zeros(())  # 0: nothing is trained

    @staticmethod
    def _check_pred(owner: str, pred: Any, keys: tuple[str, ...]) -> None:
        if not isinstance(pred, Mapping) or any(key not in pred for key in keys):
            got = sorted(pred) if isinstance(pred, Mapping) else type(pred).__name__
            raise TypeError(
                f"{owner} expects the network's training output, a dict with keys {list(keys)}, got {got}; "
                "train with DiffusionTrainingPrepareBatch + LatentTrainingInferer so that the network receives "
                "`target`."
            )

    @staticmethod
    def _check_target(owner: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(
                f"{owner}: target must have shape {tuple(logits.shape)} (B x 1 x H x W), got {tuple(target.shape)}."
            )
        return target.to(logits.dtype)

    def _finish(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Record the terms, fail clearly on divergence, return ``terms["loss"]``."""
        self.iteration += 1
        # one device sync for all terms
        values = dict(
            zip(terms, torch.stack([value.detach().float() for value in terms.values()]).tolist(), strict=True)
        )
        self.last_terms = values
        if not torch.isfinite(terms["loss"]):
            bad = [key for key, value in values.items() if key != "loss" and not math.isfinite(value)]
            listing = ", ".join(f"{key}={value:.6g}" for key, value in values.items())
            raise FloatingPointError(
                f"{self.name} loss became non-finite at iteration {self.iteration}: non-finite term(s) "
                f"{bad or ['loss']} ({listing}). Training diverged: lower the learning rate or the KL weight, "
                "or resume from the last checkpoint."
            )
        return terms["loss"]


def _summed_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over all non-batch dims: ``B x ...`` -> ``B``."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)


class ProbUNetELBOLoss(_LatentELBOLoss):
    """Probabilistic U-Net loss: ``mean_b [sum_pixels BCE + beta * KL] + l2_weight * sum ||theta||^2``.

    Args:
        beta: KL weight (Kohl et al.: 1; METHODS.md: 10 works better on LIDC).
        l2_weight: weight of the squared L2 norm of the trainable network parameters (paper: 1e-5).
        network: the trained network (required when ``l2_weight > 0``).

    ``forward(pred, target)``: ``pred`` is the network's training dict (``"logits"``: ``B x 1 x H x W``,
    ``"kl"``: ``B``), ``target`` the ``B x 1 x H x W`` binary mask. After each call ``last_terms`` holds
    ``loss``, ``reconstruction``, ``kl`` and ``l2`` (floats, batch means) for logging.
    Raises ``FloatingPointError`` naming the iteration and the non-finite term if the loss is not finite.
    """

    name = "Probabilistic U-Net"

    def __init__(self, beta: float = 10.0, l2_weight: float = 1e-5, network: nn.Module | None = None) -> None:
        super().__init__(l2_weight, network)
        self.beta = float(beta)

    def forward(self, pred: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        self._check_pred(type(self).__name__, pred, ("logits", "kl"))
        logits = pred["logits"]
        target = self._check_target(type(self).__name__, logits, target)
        reconstruction = _summed_bce(logits, target).mean()
        kl = pred["kl"].mean()
        l2 = self._l2(reconstruction)
        loss = reconstruction + self.beta * kl + self.l2_weight * l2
        return self._finish({"loss": loss, "reconstruction": reconstruction, "kl": kl, "l2": l2})


class PHiSegELBOLoss(_LatentELBOLoss):
    """PHiSeg loss: ``mean_b [sum_l w_l KL_l + reconstruction_weight * sum_l sum_pixels BCE(s_l, y)]``.

    ``w_l = kl_weight * 4^l`` with ``exponential_kl_weighting`` (paper; level 0 is the finest latent, whose
    KL sums over 4x more pixels than the next), ``kl_weight`` otherwise. ``s_l`` is the residual prediction
    of level ``l`` (``pred["level_logits"][:, l]``); every level is trained to reconstruct the mask.

    Args:
        kl_weight: overall KL weight (paper: 1).
        exponential_kl_weighting: weight level ``l`` by ``4^l`` (paper: yes).
        reconstruction_weight: weight of the per-level cross-entropy (paper: 1).
        l2_weight: optional squared-L2 weight on the network parameters (paper: 0).
        network: the trained network (required when ``l2_weight > 0``).

    After each call ``last_terms`` holds ``loss``, ``reconstruction``, ``kl`` (weighted sums),
    ``reconstruction_level{l}``, ``kl_level{l}`` (unweighted) and ``l2``.
    """

    name = "PHiSeg"

    def __init__(
        self,
        kl_weight: float = 1.0,
        exponential_kl_weighting: bool = True,
        reconstruction_weight: float = 1.0,
        l2_weight: float = 0.0,
        network: nn.Module | None = None,
    ) -> None:
        super().__init__(l2_weight, network)
        self.kl_weight = float(kl_weight)
        self.exponential_kl_weighting = bool(exponential_kl_weighting)
        self.reconstruction_weight = float(reconstruction_weight)

    def level_kl_weights(self, num_levels: int) -> torch.Tensor:
        """``L`` weights of the per-level KL terms."""
        base = 4.0 if self.exponential_kl_weighting else 1.0
        return self.kl_weight * base ** torch.arange(num_levels, dtype=torch.float64)

    def forward(self, pred: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        self._check_pred(type(self).__name__, pred, ("logits", "level_logits", "kl"))
        level_logits, kl = pred["level_logits"], pred["kl"]
        target = self._check_target(type(self).__name__, pred["logits"], target)
        if kl.ndim != 2 or kl.shape[1] != level_logits.shape[1]:
            raise ValueError(
                f"PHiSegELBOLoss: kl must be B x L with L = {level_logits.shape[1]} levels, got {tuple(kl.shape)}."
            )
        level_reconstruction = torch.stack(
            [_summed_bce(level_logits[:, level : level + 1], target) for level in range(level_logits.shape[1])], dim=1
        ).mean(0)  # L
        level_kl = kl.mean(0)  # L
        weights = self.level_kl_weights(level_kl.shape[0]).to(level_kl)
        reconstruction = level_reconstruction.sum()
        weighted_kl = (weights * level_kl).sum()
        l2 = self._l2(reconstruction)
        loss = self.reconstruction_weight * reconstruction + weighted_kl + self.l2_weight * l2
        terms = {"loss": loss, "reconstruction": reconstruction, "kl": weighted_kl, "l2": l2}
        terms.update({f"reconstruction_level{level}": value for level, value in enumerate(level_reconstruction)})
        terms.update({f"kl_level{level}": value for level, value in enumerate(level_kl)})
        return self._finish(terms)
