"""Networks: conditional denoisers, CIMD's AMN/ACN, and the latent-variable baselines (own modules)."""

from ambiseg_monai.networks.ambiguity import AxisAlignedGaussianEncoder, ambiguity_kl
from ambiseg_monai.networks.cimd import CIMDNetwork
from ambiseg_monai.networks.denoisers import ConcatConditionedDenoiser, ConditionalDenoiser, unwrap_network

__all__ = [
    "AxisAlignedGaussianEncoder",
    "CIMDNetwork",
    "ConcatConditionedDenoiser",
    "ConditionalDenoiser",
    "ambiguity_kl",
    "unwrap_network",
]
