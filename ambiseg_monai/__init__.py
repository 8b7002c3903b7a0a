"""ambiseg-monai: ambiguous (multi-rater) medical image segmentation with diffusion models on MONAI."""

__version__ = "0.1.0"
