"""Gradient-norm clipping for MONAI's ``SupervisedTrainer`` (AmbDiffSeg clips at 1.0)."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

__all__ = ["GradientClipping"]


class GradientClipping:
    """Clip the global gradient norm after the backward pass and before the optimiser step.

    Attached to ``IterationEvents.BACKWARD_COMPLETED``. Under mixed precision the gradients are
    unscaled first (``GradScaler.unscale_``), so ``max_norm`` applies to the true gradients.

    Args:
        max_norm: largest allowed global L2 norm.
        norm_type: the norm (2 = L2).
    """

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}.")
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)
        self.last_norm: float | None = None

    def attach(self, engine: Engine) -> None:
        if IterationEvents.BACKWARD_COMPLETED not in engine._allowed_events:
            engine.register_events(*IterationEvents, event_to_attr=None)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, norm_type=self.norm_type)
        self.last_norm = float(norm)
