"""The bundle command line's input errors: short messages instead of tracebacks.

A bundle's config calls library functions (:mod:`ambiseg_monai.bundle.dataset`) that check what the
user gave it; their errors derive from :class:`BundleInputError`. Decorated with
:func:`short_errors_in_bundle_cli`, such a function ends ``python -m monai.bundle run`` with one line
naming the file or setting and the fix (:class:`BundleExit`) unless ``AMBISEG_DEBUG=1`` is set.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from ambiseg_monai.data.datalist import DatalistError

__all__ = [
    "DEBUG_ENV",
    "BundleInputError",
    "DatasetNotPreparedError",
    "InferenceInputError",
    "BundleExit",
    "debug_enabled",
    "short_errors_in_bundle_cli",
]


#: environment switch: set to 1 to get the full traceback of a bundle run's input error
DEBUG_ENV = "AMBISEG_DEBUG"

_P = ParamSpec("_P")
_R = TypeVar("_R")


class BundleInputError(ValueError):
    """An input or setting of a bundle run is wrong (a dataset not prepared, a wrong ``--input_dir``,
    ``image_channels`` not matching the data); the message names the file or setting and the fix."""


class DatasetNotPreparedError(BundleInputError, DatalistError):
    """``dataset_dir`` holds no ``datalist.json``: the dataset was not prepared (``ambiseg prepare ...``)."""


class InferenceInputError(BundleInputError, FileNotFoundError):
    """Inference's ``input_dir`` does not exist or is not a folder of NIfTI images or a dataset."""


class BundleExit(SystemExit):
    """Ends ``python -m monai.bundle run`` with a short message instead of a chained traceback.

    Raised (from the original error) by :func:`prepare_dataset` and :func:`inference_items` only when
    the process is the bundle command line and ``AMBISEG_DEBUG`` is not set: MONAI's config
    expressions wrap every ``Exception`` in ``RuntimeError("Failed to evaluate ...")``, but a
    ``SystemExit`` passes through them, and Python prints its message to stderr and exits with status 1.
    Called from Python (``ConfigWorkflow``, tests, scripts), the helpers raise the ordinary errors
    (:class:`BundleInputError`, :class:`~ambiseg_monai.data.datalist.DatalistError`), which can be caught.
    """


def debug_enabled() -> bool:
    """True when ``AMBISEG_DEBUG`` is set (and not ``0`` / ``false`` / ``no``): errors keep their traceback."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _in_bundle_cli() -> bool:
    """True in a ``python -m monai.bundle ...`` process (also each ``torchrun -m monai.bundle`` worker)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and str(spec.name).startswith("monai.bundle")


def short_errors_in_bundle_cli(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """In the bundle command line, turn the function's user errors into a :class:`BundleExit`."""

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return function(*args, **kwargs)
        except (BundleInputError, DatalistError) as error:
            if not _in_bundle_cli() or debug_enabled():
                raise
            raise BundleExit(f"ambiseg: error: {error}\n(set {DEBUG_ENV}=1 to see the full traceback)") from error

    return wrapper
