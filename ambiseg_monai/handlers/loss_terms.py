"""``output_transform`` for StatsHandler / MLFlowHandler: the total loss and each loss term."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["loss_terms_from_output"]


def loss_terms_from_output(output) -> dict[str, float]:
    """``{"loss": ..., "l_simple": ..., "l_vlb": ..., "l_amb": ...}`` (batch means) from a trainer's output.

    Works on the non-decollated output of :class:`monai.engines.SupervisedTrainer` whose ``pred`` is
    the dict of (B,) terms returned by :class:`~ambiseg_monai.engines.DiffusionTrainingInferer`
    (configure the trainer with ``decollate=False``), and on a decollated list (first item).
    """
    if isinstance(output, (list, tuple)):
        output = output[0]
    if not isinstance(output, Mapping) or "loss" not in output:
        raise ValueError("expected a trainer output dict with a 'loss' entry.")
    terms = {"loss": float(torch.as_tensor(output["loss"]).detach().float().mean())}
    pred = output.get("pred")
    if isinstance(pred, Mapping):
        for name, value in pred.items():
            if name.startswith("l_"):
                terms[name] = float(torch.as_tensor(value).detach().float().mean())
    return terms
