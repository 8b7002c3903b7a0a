"""What a diffusion network predicts (x_0, v, ε or a flow velocity) and the conversions between them, in one place.

For a variance-preserving process ``x_t = α x_0 + σ ε`` with α² + σ² = 1 (Salimans & Ho 2022):

- ``x_0 = (x_t - σ ε) / α``            ``ε = (x_t - α x_0) / σ``
- ``v = α ε - σ x_0``                  ``x_0 = α x_t - σ v``        ``ε = σ x_t + α v``

The flow velocity ``u = x_0 - ε`` (prediction type ``"flow"``) is the target of rectified flow / flow
matching (Liu et al. 2023; the sign and name of MONAI's ``RFlowScheduler``: the velocity points from noise
to data, ``x_0 = x_t + t u`` on ``x_t = (1 - t) x_0 + t ε``). Its conversions hold for any linear
interpolation ``x_t = α x_0 + σ ε`` with α + σ > 0, variance preserving or not:

- ``x_0 = (x_t + σ u) / (α + σ)``      ``ε = (x_t - α u) / (α + σ)``

α and σ are tensors broadcastable against the samples (B x 1 x 1 x 1 per-row coefficients) or floats.
The ε -> x_0 conversion divides by α and the x_0 -> ε conversion by σ: both are finite only while
the schedule keeps α, σ > 0 (the continuous schedule's log-SNR clipping does). The x_0 / ε / v formulas
above assume α² + σ² = 1; the flow formulas do not (the rectified-flow scheduler,
:mod:`ambiseg_monai.schedulers.flow`, has α + σ = 1 and accepts only ``"flow"`` and ``"x"``).

:class:`DiffusionParameterization` is the one place that switches on the prediction type: the
discrete schedulers (:mod:`ambiseg_monai.schedulers.respaced`, MONAI's names "epsilon" / "sample" /
"v_prediction"), the continuous-time and rectified-flow schedulers, the VLB term, the training inferer
and the oracle denoiser all go through it. MONAI's ``RFlowScheduler`` calls its velocity
"v_prediction"; here that name is the variance-preserving v, and the flow velocity is ``"flow"``.
"""

from __future__ import annotations

import torch

__all__ = [
    "PREDICTION_TYPES",
    "x0_from_eps",
    "eps_from_x0",
    "x0_from_v",
    "eps_from_v",
    "velocity",
    "x0_from_flow",
    "eps_from_flow",
    "flow_velocity",
    "DiffusionParameterization",
]

Coefficient = torch.Tensor | float

#: Accepted names (MONAI's "sample" / "epsilon" / "v_prediction" included) -> canonical name.
PREDICTION_TYPES: dict[str, str] = {
    "x": "x",
    "x0": "x",
    "sample": "x",
    "v": "v",
    "v_prediction": "v",
    "eps": "eps",
    "epsilon": "eps",
    "flow": "flow",
    "rectified_flow": "flow",
    "flow_velocity": "flow",
}


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha: Coefficient, sigma: Coefficient) -> torch.Tensor:
    """x_0 = (x_t - σ ε) / α."""
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha: Coefficient, sigma: Coefficient) -> torch.Tensor:
    """ε = (x_t - α x_0) / σ."""
    return (x_t - alpha * x0) / sigma


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha: Coefficient, sigma: Coefficient) -> torch.Tensor:
    """x_0 = α x_t - σ v (variance preserving)."""
    return alpha * x_t - sigma * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha: Coefficient, sigma: Coefficient) -> torch.Tensor:
    """ε = σ x_t + α v (variance preserving)."""
    return sigma * x_t + alpha * v


def velocity(x0: torch.Tensor, eps: torch.Tensor, alpha: Coefficient, sigma: Coefficient) -> torch.Tensor:
    """v = α ε - σ x_0."""
    return alpha * eps - sigma * x0


def x0_from_flow(x_t: torch.Tensor, u: torch.Tensor, alpha: Coefficient, sigma: Coefficient) -> torch.Tensor:
    """x_0 = (x_t + σ u) / (α + σ) for the flow velocity u = x_0 - ε (any linear interpolation)."""
    return (x_t + sigma * u) / (alpha + sigma)


def eps_from_flow(x_t: torch.Tensor, u: torch.Tensor, alpha: Coefficient, sigma: Coefficient) -> torch.Tensor:
    """ε = (x_t - α u) / (α + σ) for the flow velocity u = x_0 - ε (any linear interpolation)."""
    return (x_t - alpha * u) / (alpha + sigma)


def flow_velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """u = x_0 - ε: the rectified-flow velocity (from noise to data; MONAI's ``RFlowScheduler`` target)."""
    return x0 - eps


class DiffusionParameterization:
    """The network's prediction type and how to turn its output into (x̂_0, ε̂).

    Args:
        prediction_type: "x" (the paper's), "v", "eps" or "flow" (the rectified-flow velocity x_0 - ε;
            aliases in :data:`PREDICTION_TYPES`).
        tanh_x_output: with x-prediction, pass the network output through tanh so that x̂_0 lies in
            (-1, 1) like the masks (the official code's ``final_act: tanh_if_x``). Ignored for v / ε / flow,
            whose targets are unbounded, so a prediction-type ablation changes only ``prediction_type``.
    """

    def __init__(self, prediction_type: str = "x", tanh_x_output: bool = True) -> None:
        key = str(prediction_type).lower()
        if key not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {sorted(PREDICTION_TYPES)}, got {prediction_type!r}.")
        self.prediction_type = PREDICTION_TYPES[key]
        self.tanh_x_output = bool(tanh_x_output)

    @property
    def uses_tanh(self) -> bool:
        """Whether the network output goes through tanh (x-prediction with ``tanh_x_output``)."""
        return self.prediction_type == "x" and self.tanh_x_output

    def prediction(self, model_output: torch.Tensor) -> torch.Tensor:
        """The predicted quantity (x_0, v or ε) from the raw network output: tanh applied when :attr:`uses_tanh`."""
        return torch.tanh(model_output) if self.uses_tanh else model_output

    def predict_x0(
        self, model_output: torch.Tensor, x_t: torch.Tensor, alpha: Coefficient, sigma: Coefficient
    ) -> torch.Tensor:
        """x̂_0 from the network output at x_t (B x C x H x W)."""
        if self.prediction_type == "x":
            return self.prediction(model_output)
        if self.prediction_type == "v":
            return x0_from_v(x_t, model_output, alpha, sigma)
        if self.prediction_type == "flow":
            return x0_from_flow(x_t, model_output, alpha, sigma)
        return x0_from_eps(x_t, model_output, alpha, sigma)

    def predict(
        self, model_output: torch.Tensor, x_t: torch.Tensor, alpha: Coefficient, sigma: Coefficient
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) from the network output at x_t; all tensors B x C x H x W."""
        x0 = self.predict_x0(model_output, x_t, alpha, sigma)
        if self.prediction_type == "x":
            return x0, eps_from_x0(x_t, x0, alpha, sigma)
        if self.prediction_type == "v":
            return x0, eps_from_v(x_t, model_output, alpha, sigma)
        if self.prediction_type == "flow":
            return x0, eps_from_flow(x_t, model_output, alpha, sigma)
        return x0, model_output

    def target(self, x0: torch.Tensor, eps: torch.Tensor, alpha: Coefficient, sigma: Coefficient) -> torch.Tensor:
        """The quantity the network regresses (before any tanh): x_0, v, ε or the flow velocity x_0 - ε."""
        if self.prediction_type == "x":
            return x0
        if self.prediction_type == "v":
            return velocity(x0, eps, alpha, sigma)
        if self.prediction_type == "flow":
            return flow_velocity(x0, eps)
        return eps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prediction_type={self.prediction_type!r}, tanh_x_output={self.tanh_x_output})"
