"""CIMD (Rahman et al., CVPR 2023): a concat-conditioned denoiser trained with AMN/ACN.

One module holds every trainable part (denoiser, AMN, ACN) so that the optimiser, DDP, the
checkpoints and the EMA all see one network. At sampling time only the denoiser runs.
"""

from __future__ import annotations

import torch

from ambiseg_monai.networks.ambiguity import AxisAlignedGaussianEncoder, ambiguity_kl
from ambiseg_monai.networks.denoisers import ConcatConditionedDenoiser, ConditionalDenoiser, condition_of

__all__ = ["CIMDNetwork"]


class CIMDNetwork(ConditionalDenoiser):
    """Denoiser + optional ambiguity networks; ``forward`` follows the conditional-denoiser protocol.

    Args:
        denoiser: a :class:`ConcatConditionedDenoiser` (outputs ε and the learned-range v).
        amn: the Ambiguity Modelling Network (posterior); None disables ``L_amb`` (DDPM-Prob-Seg,
            DDPM-det-Seg ablations).
        acn: the Ambiguity Controlling Network (prior); required with ``amn``.
        freeze_ambiguity: reproduce the official code, where AMN and ACN are never given to the
            optimiser and stay at their random initialisation: their parameters get
            ``requires_grad=False``, while ``L_amb`` still back-propagates into the denoiser through
            ACN's input. The paper (and our default) trains them jointly.

    In training (``target`` given) ``forward`` returns ``(output, {"l_amb": (B,)})``, where ACN sees
    the denoiser's ε prediction, as in the paper (eq. 13: ``x̂_b = f_θ(x̃_b, t)``) and the official code.
    """

    def __init__(
        self,
        denoiser: ConcatConditionedDenoiser,
        amn: AxisAlignedGaussianEncoder | None = None,
        acn: AxisAlignedGaussianEncoder | None = None,
        freeze_ambiguity: bool = False,
    ) -> None:
        super().__init__()
        if (amn is None) != (acn is None):
            raise ValueError("CIMD needs both AMN and ACN, or neither (no L_amb).")
        self.denoiser = denoiser
        self.amn = amn
        self.acn = acn
        self.freeze_ambiguity = bool(freeze_ambiguity)
        if amn is not None and acn is not None and freeze_ambiguity:
            amn.requires_grad_(False)
            acn.requires_grad_(False)

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        return self.denoiser.encode_condition(image)

    def denoise(self, x_t, timesteps, cond, class_labels=None):
        return self.denoiser.denoise(x_t, timesteps, cond, class_labels)

    def forward(self, x_t, timesteps, cond=None, class_labels=None, image=None, target=None):
        cond = condition_of(self, cond, image)
        output = self.denoise(x_t, timesteps, cond, class_labels)
        if target is None or self.amn is None or self.acn is None:
            return output
        prediction = output[:, : x_t.shape[1]]  # the ε part of [ε, v]
        return output, {"l_amb": ambiguity_kl(self.amn, self.acn, cond, target, prediction)}
