"""Loss weightings w(t) of the x-space diffusion loss ``E_t[w(t) ||x_0 - x̂_0||²]`` (AmbDiffSeg eq. 8).

==================  ===============================  ==========================================
name                w as a function of λ = logSNR     note
==================  ===============================  ==========================================
``snr``             ``SNR = e^λ``                     ε-prediction's MSE expressed in x-space
``truncated_snr``   ``max(SNR, 1)``                   the paper's choice with x-prediction
``snr_plus_one``    ``SNR + 1``                       v-prediction's MSE in x-space
``uniform``         ``1``
``sigmoid``         ``sigmoid(λ - bias)``             Kingma & Gao 2023 / SiD2; bias ≈ -6 works
==================  ===============================  ==========================================

Any of them can be multiplied by ``-dλ/dt`` (``times_neg_dlogsnr_dt``; the official code's
``decouple_loss_weights``), which turns the time integral into an integral over log-SNR.

Sign of the sigmoid bias: the paper prints ``sigmoid(λ + b̃)`` but describes b̃ = 2 as "similar to
SNR" and smaller biases as weighting the noisy end more, which is ``sigmoid(λ - bias)``; the official
code computes ``sigmoid(logsnr - bias)``. We follow the code and the description (METHODS.md §3).
"""

from __future__ import annotations

import torch

__all__ = ["LOSS_WEIGHTINGS", "loss_weight", "LossWeighting"]

#: Accepted names (the official code's spellings included) -> canonical name.
LOSS_WEIGHTINGS: dict[str, str] = {
    "snr": "snr",
    "truncated_snr": "truncated_snr",
    "snr_trunc": "truncated_snr",
    "max_snr_1": "truncated_snr",
    "snr_plus_one": "snr_plus_one",
    "snr_plus1": "snr_plus_one",
    "uniform": "uniform",
    "sigmoid": "sigmoid",
}


def _canonical(name: str) -> str:
    key = str(name).lower()
    if key not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {sorted(set(LOSS_WEIGHTINGS.values()))}, got {name!r}.")
    return LOSS_WEIGHTINGS[key]


def loss_weight(logsnr: torch.Tensor, weighting: str = "truncated_snr", sigmoid_bias: float = -6.0) -> torch.Tensor:
    """w(λ) for log-SNR values ``logsnr`` (any shape); returns a tensor of the same shape and dtype.

    Args:
        logsnr: λ = log SNR(t).
        weighting: a name from :data:`LOSS_WEIGHTINGS`.
        sigmoid_bias: the bias of the ``sigmoid`` weighting, ``sigmoid(λ - bias)``.
    """
    kind = _canonical(weighting)
    logsnr = torch.as_tensor(logsnr)
    if kind == "snr":
        return torch.exp(logsnr)
    if kind == "truncated_snr":
        return torch.exp(logsnr.clamp(min=0.0))  # max(SNR, 1) = exp(max(λ, 0))
    if kind == "snr_plus_one":
        return torch.exp(logsnr) + 1.0
    if kind == "uniform":
        return torch.ones_like(logsnr)
    return torch.sigmoid(logsnr - float(sigmoid_bias))


class LossWeighting:
    """A configured weighting: ``__call__(t, schedule) -> (B,)`` weights at times t.

    Args:
        weighting: a name from :data:`LOSS_WEIGHTINGS` ("truncated_snr" is the paper's).
        sigmoid_bias: bias of the ``sigmoid`` weighting (ignored by the others).
        times_neg_dlogsnr_dt: multiply by ``-d logSNR / dt``.
    """

    def __init__(
        self, weighting: str = "truncated_snr", sigmoid_bias: float = -6.0, times_neg_dlogsnr_dt: bool = False
    ) -> None:
        self.weighting = _canonical(weighting)
        self.sigmoid_bias = float(sigmoid_bias)
        self.times_neg_dlogsnr_dt = bool(times_neg_dlogsnr_dt)

    def __call__(self, t: torch.Tensor, schedule) -> torch.Tensor:
        """(B,) weights at the times ``t`` of ``schedule``.

        ``schedule`` is a continuous-time schedule (a ContinuousVPSchedule, with ``logsnr``; ``t`` in
        [0, 1]), a rectified-flow scheduler (its own ``logsnr`` = 2 log((1 - t) / t) of its time input) or
        any training scheduler of the protocol (with ``signal_variance``, e.g. the discrete
        RespacedDDPMScheduler with integer ``t``), whose λ is ``log(α² / (1 - α²))`` (variance preserving).
        """
        if hasattr(schedule, "logsnr"):
            logsnr = schedule.logsnr(t)
        else:
            if self.times_neg_dlogsnr_dt:
                raise TypeError(
                    f"times_neg_dlogsnr_dt needs a continuous-time schedule; {type(schedule).__name__} has no logsnr."
                )
            gamma = torch.as_tensor(schedule.signal_variance(t)).double()
            logsnr = torch.logit(gamma)  # log(α² / (1 - α²))
        weights = loss_weight(logsnr, self.weighting, self.sigmoid_bias)
        if self.times_neg_dlogsnr_dt:
            weights = weights * -schedule.dlogsnr_dt(t)
        return weights

    def __repr__(self) -> str:
        extra = f", sigmoid_bias={self.sigmoid_bias}" if self.weighting == "sigmoid" else ""
        return f"{type(self).__name__}({self.weighting!r}{extra}, times_neg_dlogsnr_dt={self.times_neg_dlogsnr_dt})"
