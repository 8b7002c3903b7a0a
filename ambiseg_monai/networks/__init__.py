"""Networks: conditional denoisers (CIMD, AmbDiffSeg, consensus diffusion), CIMD's AMN/ACN, the RRDB
image encoder, and the latent-variable baselines (Probabilistic U-Net family, PHiSeg)."""

from ambiseg_monai.networks.ambdiffseg import ContinuousTimeDenoiser
from ambiseg_monai.networks.ambiguity import AxisAlignedGaussianEncoder, ambiguity_kl
from ambiseg_monai.networks.cimd import CIMDNetwork
from ambiseg_monai.networks.consensus import ConsensusDenoiser
from ambiseg_monai.networks.denoisers import ConcatConditionedDenoiser, ConditionalDenoiser, unwrap_network
from ambiseg_monai.networks.latent_distributions import (
    AxisAlignedGaussian,
    FullCovarianceGaussian,
    MixtureOfAxisAlignedGaussians,
    MixtureOfFullCovarianceGaussians,
    latent_kl_divergence,
)
from ambiseg_monai.networks.phiseg import PHiSeg
from ambiseg_monai.networks.prob_unet import ProbabilisticUNet
from ambiseg_monai.networks.rrdb import RRDBEncoder

__all__ = [
    "AxisAlignedGaussian",
    "AxisAlignedGaussianEncoder",
    "CIMDNetwork",
    "ConcatConditionedDenoiser",
    "ConditionalDenoiser",
    "ConsensusDenoiser",
    "ContinuousTimeDenoiser",
    "FullCovarianceGaussian",
    "MixtureOfAxisAlignedGaussians",
    "MixtureOfFullCovarianceGaussians",
    "PHiSeg",
    "ProbabilisticUNet",
    "RRDBEncoder",
    "ambiguity_kl",
    "latent_kl_divergence",
    "unwrap_network",
]
