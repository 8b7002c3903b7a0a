"""Deprecated module path: :class:`ProvenanceHandler` lives in :mod:`ambiseg_monai.handlers.mlflow_logging`
(and is exported as ``ambiseg_monai.handlers.ProvenanceHandler``). Kept only because bundle configs name
``ambiseg_monai.handlers.provenance.ProvenanceHandler``; delete this module once they target
``ambiseg_monai.handlers.ProvenanceHandler``."""

from ambiseg_monai.handlers.mlflow_logging import ProvenanceHandler

__all__ = ["ProvenanceHandler"]
