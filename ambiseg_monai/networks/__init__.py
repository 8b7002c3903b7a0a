"""Networks: conditional denoisers (CIMD, AmbDiffSeg, consensus diffusion), CIMD's AMN/ACN, the RRDB
image encoder, the latent-variable baselines (Probabilistic U-Net family, PHiSeg) and the Stochastic
Segmentation Network."""

import ambiseg_monai.networks.ambdiffseg as _ambdiffseg
import ambiseg_monai.networks.ambiguity as _ambiguity
import ambiseg_monai.networks.cimd as _cimd
import ambiseg_monai.networks.consensus as _consensus
import ambiseg_monai.networks.denoisers as _denoisers
import ambiseg_monai.networks.latent_distributions as _latent_distributions
import ambiseg_monai.networks.phiseg as _phiseg
import ambiseg_monai.networks.prob_unet as _prob_unet
import ambiseg_monai.networks.rrdb as _rrdb
import ambiseg_monai.networks.ssn as _ssn
from ambiseg_monai.networks.ambdiffseg import *  # noqa: F403
from ambiseg_monai.networks.ambiguity import *  # noqa: F403
from ambiseg_monai.networks.cimd import *  # noqa: F403
from ambiseg_monai.networks.consensus import *  # noqa: F403
from ambiseg_monai.networks.denoisers import *  # noqa: F403
from ambiseg_monai.networks.latent_distributions import *  # noqa: F403
from ambiseg_monai.networks.phiseg import *  # noqa: F403
from ambiseg_monai.networks.prob_unet import *  # noqa: F403
from ambiseg_monai.networks.rrdb import *  # noqa: F403
from ambiseg_monai.networks.ssn import *  # noqa: F403

__all__ = [
    *_ambdiffseg.__all__,
    *_ambiguity.__all__,
    *_cimd.__all__,
    *_consensus.__all__,
    *_denoisers.__all__,
    *_latent_distributions.__all__,
    *_phiseg.__all__,
    *_prob_unet.__all__,
    *_rrdb.__all__,
    *_ssn.__all__,
]
