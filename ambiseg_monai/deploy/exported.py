"""Exported models: the TorchScript file format and the adapters that let the samplers run on it.

An exported model is one TorchScript file (``model.ts``) written with MONAI's
:func:`monai.data.save_net_with_metadata`. Besides the traced network it embeds, as extra files:

- ``metadata.json``: the bundle's ``metadata.json`` plus MONAI's version values and an
  ``"ambiseg_export"`` section (:data:`EXPORT_KEY`) describing how to call the traced methods and how
  to prepare images for them (spatial shape, channels, modality, intensity normalisation);
- ``inference.json``: the bundle's inference config (with the overrides used at export), from which
  the deploy application builds the bundle's own N-sample ``inferer``.

Two kinds of traced module (``"kind"`` in the export section):

- ``"diffusion"``: methods ``forward(x_t, timesteps, cond[, class_labels]) -> B x C_out x H x W`` and
  ``encode_condition(image) -> cond``: the conditional-denoiser protocol of
  :mod:`ambiseg_monai.networks.denoisers` without optional arguments (a traced module takes no
  ``None``). :class:`ExportedDenoiser` restores the protocol (``cond=None, image=..., class_labels=None``
  keywords) so :class:`~ambiseg_monai.inferers.diffusion.DiffusionSamplingInferer` runs on it unchanged.
- ``"latent"``: method ``sample(image) -> B x N_traced x H x W`` logits (the prior sampling of the
  Probabilistic U-Net / PHiSeg with the global RNG, traced with a fixed number of samples ``N_traced``).
  :class:`ExportedLatentModel` provides ``sample(image, num_samples, generators=None)`` for any
  ``num_samples`` by concatenating independent draws, so
  :class:`~ambiseg_monai.inferers.latent.LatentSampleInferer` runs on it unchanged (per-row
  generators become one seed for the traced graph: see :meth:`ExportedLatentModel.sample`).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.data import load_net_with_metadata

from ambiseg_monai.networks.denoisers import condition_of

__all__ = [
    "EXPORT_KEY",
    "EXPORT_FORMAT_VERSION",
    "INFERENCE_CONFIG_FILE",
    "ExportedBundle",
    "ExportedDenoiser",
    "ExportedLatentModel",
    "load_exported_bundle",
]

EXPORT_KEY = "ambiseg_export"
EXPORT_FORMAT_VERSION = 1
INFERENCE_CONFIG_FILE = "inference.json"
KINDS = ("diffusion", "latent")


class ExportedDenoiser(torch.nn.Module):
    """A traced conditional denoiser behind the protocol the diffusion samplers call.

    Args:
        traced: TorchScript module with ``forward(x_t, timesteps, cond[, class_labels])`` and
            ``encode_condition(image)``.
        uses_class_labels: whether ``forward`` was traced with class labels (then they are required).
    """

    def __init__(self, traced: torch.jit.ScriptModule, uses_class_labels: bool) -> None:
        super().__init__()
        self.traced = traced
        self.uses_class_labels = bool(uses_class_labels)

    def encode_condition(self, image: torch.Tensor) -> Any:
        """B x C x H x W image -> the condition (a tensor or a tuple of tensors)."""
        return self.traced.encode_condition(image)

    def traced_inputs(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Any = None,
        class_labels: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> tuple[Any, ...]:
        """The protocol's arguments -> the traced ``forward``'s positional ``(x_t, timesteps, cond[, class_labels])``.

        :class:`~ambiseg_monai.inferers.cpu_engine.CPUEngineDenoiser` feeds the same inputs to ``traced``
        exported to ONNX, so both paths check class labels here.
        """
        cond = condition_of(self, cond, image)
        if self.uses_class_labels:
            if class_labels is None:
                raise ValueError(
                    "this exported model was traced with class labels (e.g. a consensus level or rater id); "
                    "pass class_labels (B,) to the inferer."
                )
            return x_t, timesteps, cond, class_labels.to(device=x_t.device, dtype=torch.long)
        if class_labels is not None:
            raise ValueError("this exported model was traced without class labels; do not pass class_labels.")
        return x_t, timesteps, cond

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Any = None,
        class_labels: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t B x C x H x W, timesteps (B,) -> B x C_out x H x W (``target`` is ignored: no training losses)."""
        return self.traced(*self.traced_inputs(x_t, timesteps, cond, class_labels, image))


class ExportedLatentModel(torch.nn.Module):
    """A traced prior sampler (``sample(image) -> B x N_traced x H x W`` logits) with the latent-model API.

    Args:
        traced: TorchScript module with a traced ``sample`` method.
        traced_num_samples: N_traced, the number of samples one traced call draws.
    """

    def __init__(self, traced: torch.jit.ScriptModule, traced_num_samples: int) -> None:
        super().__init__()
        if traced_num_samples < 1:
            raise ValueError(f"traced_num_samples must be >= 1, got {traced_num_samples}.")
        self.traced = traced
        self.traced_num_samples = int(traced_num_samples)

    def sample(
        self, image: torch.Tensor, num_samples: int, generators: Sequence[torch.Generator] | None = None
    ) -> torch.Tensor:
        """B x C x H x W -> B x num_samples x H x W logits.

        Prior draws are independent, so traced calls (N_traced samples each) are concatenated. The traced
        graph draws its latent noise from the global RNG: with ``generators`` (one per row, as the
        latent inferer passes them) it runs under a forked global RNG seeded from their seeds, so a
        result is reproducible for the same images and ids, but, unlike the eager model, a mask also
        depends on the other images of its batch.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        calls = math.ceil(num_samples / self.traced_num_samples)
        if generators is None:
            logits = torch.cat([self.traced.sample(image) for _ in range(calls)], dim=1)
            return logits[:, :num_samples]
        seed = zlib.crc32(b"".join(int(g.initial_seed()).to_bytes(8, "little") for g in generators))
        devices = [image.device] if image.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            logits = torch.cat([self.traced.sample(image) for _ in range(calls)], dim=1)
        return logits[:, :num_samples]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Prior samples of one traced call: B x N_traced x H x W logits."""
        return self.traced.sample(image)


@dataclass
class ExportedBundle:
    """An exported model read back: the protocol adapter, the export section and the embedded configs.

    Attributes:
        network: :class:`ExportedDenoiser` or :class:`ExportedLatentModel` (in eval mode).
        export: the ``"ambiseg_export"`` section (kind, bundle_name, spatial_shape, image_channels,
            modalities, intensity, verification, ...).
        metadata: the whole embedded ``metadata.json`` (bundle metadata + MONAI version values).
        inference_config: the embedded ``inference.json`` as a dict.
        path: the file it was read from.
    """

    network: torch.nn.Module
    export: dict[str, Any]
    metadata: dict[str, Any]
    inference_config: dict[str, Any]
    path: str

    @property
    def spatial_shape(self) -> tuple[int, int]:
        """H x W the model was trained (and is run) at."""
        height, width = self.export["spatial_shape"]
        return int(height), int(width)

    @property
    def image_channels(self) -> int:
        return int(self.export["image_channels"])


def load_exported_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> ExportedBundle:
    """Read a ``model.ts`` written by :func:`ambiseg_monai.deploy.export.export_bundle`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not TorchScript, or was not written by ``ambiseg export``
            (no ``"ambiseg_export"`` metadata or no embedded ``inference.json``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model file not found: {path} (export one with `ambiseg export --bundle-root ... --out {path}`)."
        )
    try:
        # read on the CPU first: the device check below must not need the device
        traced, metadata, extra = load_net_with_metadata(
            path, map_location=torch.device("cpu"), more_extra_files=(INFERENCE_CONFIG_FILE,)
        )
    except RuntimeError as error:
        raise ValueError(f"{path} is not a TorchScript model file ({str(error).splitlines()[0]}).") from error
    if not isinstance(traced, torch.jit.ScriptModule):
        raise ValueError(f"{path} holds a {type(traced).__name__}, not a TorchScript module.")
    export = metadata.get(EXPORT_KEY)
    if not isinstance(export, dict):
        raise ValueError(
            f"{path} has no '{EXPORT_KEY}' metadata: it was not written by `ambiseg export`, "
            "which records how to call the traced network."
        )
    if int(export.get("format_version", -1)) != EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: export format version {export.get('format_version')} is not supported "
            f"(this version of ambiseg-monai reads version {EXPORT_FORMAT_VERSION})."
        )
    traced_on = export.get("device", "cpu")
    if torch.device(device).type != traced_on:
        raise ValueError(
            f"{path} was traced on {traced_on} and cannot run on {torch.device(device)} (a trace bakes in the device "
            f"of tensors the network creates); export it again with "
            f"`ambiseg export ... --device {torch.device(device).type}`."
        )
    raw_config = extra.get(INFERENCE_CONFIG_FILE) or ""
    if not raw_config:
        raise ValueError(f"{path} embeds no '{INFERENCE_CONFIG_FILE}' (the bundle's inference config).")
    inference_config = json.loads(raw_config)
    kind = export.get("kind")
    if kind == "diffusion":
        network: torch.nn.Module = ExportedDenoiser(traced, bool(export.get("uses_class_labels", False)))
    elif kind == "latent":
        network = ExportedLatentModel(traced, int(export["traced_num_samples"]))
    else:
        raise ValueError(f"{path}: unknown exported model kind {kind!r} (expected one of {KINDS}).")
    return ExportedBundle(network.to(device).eval(), export, metadata, inference_config, path)
