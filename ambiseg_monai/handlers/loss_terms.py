"""``output_transform`` for StatsHandler / MLFlowHandler: the total loss and each loss term, one way for all
methods."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["LossTerms"]


def _mean(value: Any) -> float:
    return float(torch.as_tensor(value).detach().float().mean())


class LossTerms:
    """``output_transform`` returning ``{"loss": ..., <term>: ...}`` (batch means, floats) of a training step.

    The terms come from where the method computes them:

    - diffusion methods (default, ``loss_function=None``): the ``l_*`` entries of the trainer output's ``pred``,
      the dict of (B,) terms returned by the training inferer (``l_simple``, ``l_vlb``, ``l_amb``); configure
      the ``SupervisedTrainer`` with ``decollate=False`` (a decollated list is read from its first item);
    - latent-variable models (Probabilistic U-Net, PHiSeg): the loss object's ``last_terms`` (``loss``,
      ``reconstruction``, ``kl``, ``l2``, ...), with ``loss_function=@train#loss``.

    The same instance serves ``StatsHandler`` and ``MLFlowHandler``::

        "loss_terms": {"_target_": "ambiseg_monai.handlers.LossTerms", "loss_function": "@train#loss"},
        ... "output_transform": "@train#loss_terms"

    Args:
        loss_function: a loss exposing ``last_terms`` (name -> float, recorded at each call); None to read the
            ``l_*`` terms from the output.
    """

    def __init__(self, loss_function: Any | None = None) -> None:
        if loss_function is not None and not hasattr(loss_function, "last_terms"):
            raise TypeError(
                f"LossTerms: {type(loss_function).__name__} has no 'last_terms'; pass a loss that records its terms "
                "(e.g. ProbUNetELBOLoss, PHiSegELBOLoss) or None to read the l_* terms from the trainer output."
            )
        self.loss_function = loss_function

    def __call__(self, output: Any) -> dict[str, float]:
        if isinstance(output, (list, tuple)):
            output = output[0]
        if not isinstance(output, Mapping) or "loss" not in output:
            raise ValueError("LossTerms: expected a trainer output dict with a 'loss' entry.")
        terms = {"loss": _mean(output["loss"])}
        if self.loss_function is not None:
            terms.update({str(k): float(v) for k, v in self.loss_function.last_terms.items() if k != "loss"})
            return terms
        pred = output.get("pred")
        if isinstance(pred, Mapping):
            terms.update({name: _mean(value) for name, value in pred.items() if name.startswith("l_")})
        return terms
