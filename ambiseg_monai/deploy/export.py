"""Export a trained bundle as one TorchScript file with its configs and metadata embedded.

``ambiseg export --bundle-root bundles/cimd --ckpt-file runs/cimd/models/model.pt --out model.ts``

The bundle's ``network_def`` is built from its inference config, the checkpoint loaded, and the
network traced (``torch.jit.trace``: ``DiffusionModelUNet`` cannot be scripted):

- a diffusion denoiser (``encode_condition`` + ``forward(x_t, t, cond, class_labels)``) is traced
  with the arguments of a real first sampling step of the bundle's own ``inferer`` (so timestep dtype,
  condition structure and class labels are what the sampler passes), both methods in one module;
- a latent model (``sample(image, num_samples)``) has its prior sampling traced with the inferer's N.

The traced module is checked against the eager one (on the recorded step and on fresh random inputs
with another batch size: max abs difference reported, the export fails above ``tolerance``), and
optionally the whole sampler is run on both (``check_sampling``). It is saved with MONAI's
:func:`~monai.data.save_net_with_metadata`: ``metadata.json`` = bundle metadata + the
``"ambiseg_export"`` section (see :mod:`ambiseg_monai.deploy.exported`), plus ``inference.json``.
Nothing is written when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.data import save_net_with_metadata

from ambiseg_monai.deploy.exported import (
    EXPORT_FORMAT_VERSION,
    EXPORT_KEY,
    INFERENCE_CONFIG_FILE,
    load_exported_bundle,
)
from ambiseg_monai.deploy.predictor import inferer_samples
from ambiseg_monai.deploy.preprocessing import default_intensity_spec, intensity_spec

#: the library API (the ``ambiseg`` subcommand's ``configure_parser`` and ``main`` are not part of it)
__all__ = [
    "ExportReport",
    "ExportVerificationError",
    "export_bundle",
]

# where bundles define their N-sample inferer: a flat inference config, or our bundles' `infer` section
INFERER_IDS = ("inferer", "infer#inferer", "validate#inferer")
# nested checkpoint keys tried in order: the EMA weights (what the bundles evaluate) before the raw network
CHECKPOINT_KEYS = ("ema", "model", "network", "net", "state_dict")


class ExportVerificationError(ValueError):
    """The traced model does not reproduce the eager one."""


@dataclass
class ExportReport:
    """What :func:`export_bundle` wrote and measured."""

    path: str
    kind: str
    max_abs_diff: float
    tolerance: float
    checks: dict[str, float] = field(default_factory=dict)
    sample_agreement: float | None = None

    def summary(self) -> str:
        lines = [
            f"exported {self.kind} model to {self.path}",
            f"traced vs eager: max abs diff {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})",
        ]
        lines += [f"  {name}: {value:.3g}" for name, value in self.checks.items()]
        if self.sample_agreement is not None:
            lines.append(f"sampler on exported vs eager model: {100 * self.sample_agreement:.2f}% equal mask pixels")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- bundle


def default_config_files(bundle_root: Path) -> list[Path]:
    """``configs/inference.json``, preceded by ``configs/train.json`` when the bundle has one.

    Our bundles' ``inference.json`` is an overlay on ``train.json`` (network, schedulers, device),
    read in that order as with ``monai.bundle run --config_file "['train.json', 'inference.json']"``.
    """
    configs = bundle_root / "configs"
    train = configs / "train.json"
    return ([train] if train.is_file() else []) + [configs / "inference.json"]


def _bundle_parser(
    bundle_root: Path,
    config_files: Sequence[str | os.PathLike] | None,
    meta_file: str | os.PathLike | None,
    overrides: Mapping[str, Any] | None,
) -> ConfigParser:
    configs = [Path(c) for c in (config_files or default_config_files(bundle_root))]
    for config in configs:
        if not config.is_file():
            raise FileNotFoundError(f"bundle config not found: {config}")
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    meta = Path(meta_file) if meta_file is not None else bundle_root / "configs" / "metadata.json"
    if meta_file is not None and not meta.is_file():
        raise FileNotFoundError(f"bundle metadata not found: {meta}")
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(bundle_root)
    parser.update(dict(overrides or {}))
    return parser


def _load_checkpoint(network: torch.nn.Module, ckpt_file: Path, key_in_ckpt: str | None) -> None:
    if not ckpt_file.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_file}")
    checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    expected = set(network.state_dict())
    if key_in_ckpt:
        if not isinstance(checkpoint, Mapping) or key_in_ckpt not in checkpoint:
            keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise ValueError(f"checkpoint {ckpt_file} has no key {key_in_ckpt!r} (it holds {keys}).")
        state = checkpoint[key_in_ckpt]
    elif isinstance(checkpoint, Mapping) and expected & set(checkpoint):
        state = checkpoint  # a plain state dict
    else:
        found = [k for k in CHECKPOINT_KEYS if isinstance(checkpoint, Mapping) and k in checkpoint]
        if not found:
            keys = sorted(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise ValueError(
                f"cannot find the network weights in {ckpt_file} (keys {keys}); name them with --key-in-ckpt."
            )
        state = checkpoint[found[0]]
    # weights saved from DistributedDataParallel carry a "module." prefix
    state = {(k[len("module.") :] if k.startswith("module.") and k not in expected else k): v for k, v in state.items()}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {ckpt_file} does not fit the bundle's network: {error}") from error


def _bundle_image_format(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    return metadata.get("network_data_format", {}).get("inputs", {}).get("image", {}) if metadata else {}


# ----------------------------------------------------------------------------------------- tracing


class _FirstStepRecorded(Exception):
    """Raised by :class:`_RecordingDenoiser` to stop the sampler after the first network call."""


class _RecordingDenoiser(torch.nn.Module):
    """Wraps the eager denoiser and records the arguments of the sampler's first call."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network: Any = network  # the eager denoiser: encode_condition() and forward()
        self.encode_inputs: torch.Tensor | None = None
        self.step_inputs: tuple | None = None

    def encode_condition(self, image: torch.Tensor):
        self.encode_inputs = image
        return self.network.encode_condition(image)

    def forward(self, x_t, timesteps, cond=None, class_labels=None, **kwargs):
        if cond is None:
            raise ValueError("expected the sampler to pass the encoded condition `cond`.")
        self.step_inputs = (x_t, timesteps, cond, class_labels)
        raise _FirstStepRecorded


class _DenoiserForTrace(torch.nn.Module):
    """The protocol without optional arguments: what ``torch.jit.trace`` can record."""

    def __init__(self, network: torch.nn.Module, uses_class_labels: bool) -> None:
        super().__init__()
        self.network: Any = network  # a denoiser: encode_condition() and forward()
        self.uses_class_labels = uses_class_labels

    def forward(self, x_t, timesteps, cond, class_labels=None):
        return self.network(x_t, timesteps, cond=cond, class_labels=class_labels if self.uses_class_labels else None)

    def encode_condition(self, image):
        return self.network.encode_condition(image)


class _LatentSamplerForTrace(torch.nn.Module):
    def __init__(self, network: torch.nn.Module, num_samples: int) -> None:
        super().__init__()
        self.network: Any = network  # a latent-variable model: sample()
        self.num_samples = num_samples

    def forward(self, image):
        return self.network.sample(image, self.num_samples)

    def sample(self, image):
        return self.network.sample(image, self.num_samples)


def _max_abs_diff(a: Any, b: Any) -> float:
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape:
            raise ExportVerificationError(f"traced output shape {tuple(b.shape)} differs from eager {tuple(a.shape)}.")
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    if isinstance(a, Mapping):
        return max(_max_abs_diff(a[k], b[k]) for k in a)
    return max(_max_abs_diff(x, y) for x, y in zip(a, b, strict=True))


def _trace(module: torch.nn.Module, inputs: dict[str, tuple]) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # shape checks inside the networks convert tensors to Python values; the outputs are verified below
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.trace_module(module, inputs, check_trace=False)


def _random_step_inputs(recorded: tuple, eager: _DenoiserForTrace, image: torch.Tensor, generator: torch.Generator):
    """Fresh inputs of another batch size (rows + 1) with the recorded dtypes and timestep range."""
    x_t, timesteps, _, class_labels = recorded
    rows = x_t.shape[0] + 1
    fresh_image = torch.rand((rows, *image.shape[1:]), generator=generator).to(image)
    cond = eager.encode_condition(fresh_image)
    x = torch.randn((rows, *x_t.shape[1:]), generator=generator).to(x_t)
    if timesteps.is_floating_point():
        t = torch.rand(rows, generator=generator).to(timesteps)
    else:
        t = torch.randint(0, max(int(timesteps.max()) + 1, 2), (rows,), generator=generator).to(timesteps)
    labels = None
    if class_labels is not None:
        labels = torch.randint(0, int(class_labels.max()) + 1, (rows,), generator=generator).to(class_labels)
    return fresh_image, (x, t, cond, labels)


def _trace_denoiser(network, inferer, image, class_label, generator) -> tuple[torch.jit.ScriptModule, dict, dict]:
    recorder = _RecordingDenoiser(network)
    labels = None if class_label is None else torch.full((image.shape[0],), int(class_label), dtype=torch.long)
    try:
        inferer(image, recorder, class_labels=None if labels is None else labels.to(image.device))
    except _FirstStepRecorded:
        pass
    if recorder.step_inputs is None or recorder.encode_inputs is None:
        raise ValueError(
            f"the bundle's inferer ({type(inferer).__name__}) never called the denoiser; is it an N-sample "
            "diffusion inferer?"
        )
    recorded = recorder.step_inputs
    uses_class_labels = recorded[3] is not None
    eager = _DenoiserForTrace(network, uses_class_labels).eval()
    step_args = recorded[:3] + ((recorded[3],) if uses_class_labels else ())
    traced = _trace(eager, {"forward": step_args, "encode_condition": (recorder.encode_inputs,)})
    fresh_image, fresh_step = _random_step_inputs(recorded, eager, image, generator)
    fresh_args = fresh_step[:3] + ((fresh_step[3],) if uses_class_labels else ())
    checks = {
        "recorded sampling step": _max_abs_diff(eager(*step_args), traced(*step_args)),
        f"random step (batch {fresh_step[0].shape[0]})": _max_abs_diff(eager(*fresh_args), traced(*fresh_args)),
        "encode_condition": _max_abs_diff(eager.encode_condition(fresh_image), traced.encode_condition(fresh_image)),
    }
    return traced, checks, {"uses_class_labels": uses_class_labels}


def _trace_latent(network, inferer, image, seed) -> tuple[torch.jit.ScriptModule, dict, dict]:
    num_samples = int(getattr(inferer, "num_samples", 1))
    eager = _LatentSamplerForTrace(network, num_samples).eval()
    traced = _trace(eager, {"sample": (image,)})
    checks = {}
    for name, batch in (("prior samples (batch 1)", image), ("prior samples (batch 2)", image.repeat(2, 1, 1, 1))):
        # the same seed gives the same prior draws in both: the traced graph keeps the random ops in order
        torch.manual_seed(seed)
        expected = eager.sample(batch)
        torch.manual_seed(seed)
        checks[name] = _max_abs_diff(expected, traced.sample(batch))
    return traced, checks, {"traced_num_samples": num_samples}


# ------------------------------------------------------------------------------------------ export


def export_bundle(
    bundle_root: str | os.PathLike,
    out: str | os.PathLike,
    ckpt_file: str | os.PathLike | None = None,
    config_files: Sequence[str | os.PathLike] | None = None,
    meta_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    key_in_ckpt: str | None = None,
    network_id: str = "network_def",
    inferer_id: str | None = None,
    spatial_shape: Sequence[int] | None = None,
    image_channels: int | None = None,
    modalities: Sequence[str] | None = None,
    intensity: Mapping[str, Any] | None = None,
    class_label: int | None = None,
    tolerance: float = 1e-4,
    check_sampling: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> ExportReport:
    """Trace a bundle's trained network and write it with its configs and metadata (see module docstring).

    Args:
        bundle_root: the bundle folder (``configs/inference.json``, ``configs/metadata.json``).
        out: the ``.ts`` file to write.
        ckpt_file: trained weights (a state dict, or a training checkpoint dict holding one); default:
            the config's ``ckpt_path`` when it defines one, else ``<bundle_root>/models/model.pt``.
        config_files: configs to read, in order (default: :func:`default_config_files`); together
            they must define ``network_id`` and the inferer.
        meta_file: bundle metadata (default ``<bundle_root>/configs/metadata.json`` when present).
        overrides: config id -> value, applied before building (e.g. ``{"inferer#num_samples": 4}``);
            the embedded ``inference.json`` carries them.
        key_in_ckpt: key of the weights in a nested checkpoint (default: auto-detect).
        network_id: config id of the network.
        inferer_id: config id of the N-sample inferer (default: the first of :data:`INFERER_IDS` present).
        spatial_shape: H W the model runs at (default: the metadata's
            ``network_data_format.inputs.image.spatial_shape``).
        image_channels: image channels (default: metadata ``num_channels``, else the network's
            ``image_channels`` attribute, else 1).
        modalities: modalities the deploy app accepts (default: metadata ``modality``, else CT and MR).
        intensity: normalisation spec (:func:`~ambiseg_monai.deploy.preprocessing.intensity_spec`);
            default: metadata ``preprocessing.intensity`` of the image input, else the modality default.
        class_label: class label passed while recording the first sampling step (models conditioned
            on a consensus level / rater id).
        tolerance: largest accepted max abs difference between traced and eager outputs.
        check_sampling: also run the bundle's inferer on the exported and the eager model (same seed)
            and report the fraction of equal mask pixels (must be >= 99%).
        seed: seed of the random verification inputs.
        overwrite: replace an existing ``out``.
        device: device to trace on: the device the model will run on (a trace bakes in the device of
            tensors the network creates, so a CPU export runs on CPU only).
    """
    bundle_root = Path(bundle_root)
    if not bundle_root.is_dir():
        raise NotADirectoryError(f"bundle folder not found: {bundle_root}")
    out = Path(out)
    if out.suffix == "":
        out = out.with_suffix(".ts")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it.")
    parser = _bundle_parser(bundle_root, config_files, meta_file, overrides)
    configs_read = [str(c) for c in (config_files or default_config_files(bundle_root))]
    if inferer_id is None:
        inferer_id = next((i for i in INFERER_IDS if i in parser), INFERER_IDS[0])
    for config_id in (network_id, inferer_id):
        if config_id not in parser:
            raise ValueError(f"the bundle config has no '{config_id}' (configs: {configs_read}).")
    if ckpt_file is None:
        # the bundle's own checkpoint path (our inference configs define `ckpt_path`), else models/model.pt
        ckpt_file = (
            parser.get_parsed_content("ckpt_path") if "ckpt_path" in parser else bundle_root / "models" / "model.pt"
        )
    metadata = dict(parser.get("_meta_") or {})
    metadata.setdefault("version", "0.0.0")
    # a short name for the algorithm in the DICOM SEG (a DICOM LO value: at most 64 characters)
    bundle_name = str(parser.get("bundle_name") or bundle_root.resolve().name)[:64]
    image_format = _bundle_image_format(metadata)

    shape = _spatial_shape(spatial_shape or image_format.get("spatial_shape"))
    device = torch.device(device)
    network = parser.get_parsed_content(network_id, instantiate=True)
    _load_checkpoint(network, Path(ckpt_file), key_in_ckpt)
    network = network.to(device).eval()
    inferer = parser.get_parsed_content(inferer_id, instantiate=True)

    channels = int(image_channels or image_format.get("num_channels", 0) or getattr(network, "image_channels", 1))
    accepted = [m.upper() for m in (modalities or _as_list(image_format.get("modality")) or ["CT", "MR"])]
    spec = intensity_spec(
        intensity or image_format.get("preprocessing", {}).get("intensity") or default_intensity_spec(accepted)
    )

    generator = torch.Generator().manual_seed(seed)
    image = torch.rand((1, channels, *shape), generator=generator).to(device)
    with torch.no_grad():
        if callable(getattr(network, "encode_condition", None)):
            kind = "diffusion"
            traced, checks, extra = _trace_denoiser(network, inferer, image, class_label, generator)
        elif callable(getattr(network, "sample", None)):
            kind = "latent"
            traced, checks, extra = _trace_latent(network, inferer, image, seed)
        else:
            raise ValueError(
                f"{type(network).__name__} is neither a conditional denoiser (encode_condition) nor a latent "
                "model (sample): nothing to export."
            )
    max_diff = max(checks.values())
    if not max_diff <= tolerance:
        details = ", ".join(f"{k}: {v:.3g}" for k, v in checks.items())
        raise ExportVerificationError(
            f"the traced model differs from the eager one by {max_diff:.3g} (> tolerance {tolerance:.3g}; {details}); "
            "nothing was written."
        )

    export_section = {
        "format_version": EXPORT_FORMAT_VERSION,
        "kind": kind,
        "bundle_name": bundle_name,
        **extra,
        "spatial_shape": shape,
        "image_channels": channels,
        "modalities": accepted,
        "intensity": spec,
        "network_class": f"{type(network).__module__}.{type(network).__qualname__}",
        # a trace bakes the device of tensors created inside the network (e.g. the timestep embedding)
        "device": device.type,
        "inferer_id": inferer_id,
        "verification": {"max_abs_diff": max_diff, "tolerance": tolerance, "checks": checks},
    }
    metadata[EXPORT_KEY] = export_section
    config = {k: v for k, v in parser.get().items() if k != "_meta_"}
    out.parent.mkdir(parents=True, exist_ok=True)
    # write next to the target, then rename: an interrupted export leaves no half-written model
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".ts", delete=False) as tmp:
        tmp_path = tmp.name
    try:
        save_net_with_metadata(
            traced,
            tmp_path,
            meta_values=metadata,
            more_extra_files={INFERENCE_CONFIG_FILE: json.dumps(config).encode()},
        )
        report = ExportReport(str(out), kind, max_diff, tolerance, checks)
        if check_sampling:
            report.sample_agreement = _check_sampling(tmp_path, network, parser, inferer_id, image, class_label)
            if report.sample_agreement < 0.99:
                raise ExportVerificationError(
                    f"sampling with the exported model agrees with the eager model on only "
                    f"{100 * report.sample_agreement:.2f}% of mask pixels; nothing was written."
                )
        os.replace(tmp_path, out)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return report


def _check_sampling(path, network, parser, inferer_id, image, class_label) -> float:
    """Run fresh copies of the bundle inferer on the eager and the exported model; fraction of equal pixels.

    A traced latent model draws from the global RNG, so its inferer is compared with ``seed=None`` (global
    RNG, same seed for both) rather than with per-sample generators.
    """
    bundle = load_exported_bundle(path, image.device)
    exported = bundle.network.to(image.device)
    if bundle.export["kind"] == "latent":
        parser = ConfigParser(parser.get())
        parser[f"{inferer_id}#seed"] = None
    labels = None if class_label is None else torch.full((image.shape[0],), int(class_label), dtype=torch.long)
    labels = None if labels is None else labels.to(image.device)
    results = []
    for model in (network, exported):
        torch.manual_seed(0)  # latent models draw from the global generator
        inferer = parser.get_parsed_content(inferer_id, instantiate=True, lazy=False)  # a fresh image counter
        kwargs = {} if labels is None else {"class_labels": labels}
        with torch.no_grad():
            results.append(inferer_samples(inferer(image, model, **kwargs)))
    return float((results[0] == results[1]).float().mean())


def _spatial_shape(value: Any) -> list[int]:
    try:
        shape = [int(s) for s in value]
        if len(shape) == 2 and all(s > 0 and s == float(v) for s, v in zip(shape, value, strict=True)):
            return shape
    except (TypeError, ValueError):
        pass
    raise ValueError(
        "the model's spatial shape (H W) is needed: pass --spatial-size or set network_data_format.inputs.image"
        f".spatial_shape in the bundle metadata (got {value if value else 'nothing'})."
    )


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# --------------------------------------------------------------------------------------------- CLI


def _override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"overrides look like ID=VALUE (VALUE in JSON), got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ambiseg export``."""
    parser.add_argument(
        "--bundle-root", required=True, help="bundle folder (configs/inference.json, configs/metadata.json)"
    )
    parser.add_argument("--out", required=True, help="TorchScript file to write (e.g. models/model.ts)")
    parser.add_argument(
        "--ckpt-file", help="trained weights (default: the config's ckpt_path, else BUNDLE_ROOT/models/model.pt)"
    )
    parser.add_argument(
        "--config-file",
        nargs="+",
        help="config file(s), in order (default: BUNDLE_ROOT/configs/train.json if present, then inference.json)",
    )
    parser.add_argument("--meta-file", help="bundle metadata (default: BUNDLE_ROOT/configs/metadata.json)")
    parser.add_argument("--key-in-ckpt", help="key of the network weights in a nested checkpoint (default: auto)")
    parser.add_argument(
        "--override",
        type=_override,
        action="append",
        default=[],
        metavar="ID=VALUE",
        help="config override, VALUE in JSON (repeatable), e.g. inferer#num_samples=8",
    )
    parser.add_argument("--network-id", default="network_def")
    parser.add_argument(
        "--inferer-id", help=f"config id of the N-sample inferer (default: first of {', '.join(INFERER_IDS)})"
    )
    parser.add_argument(
        "--spatial-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="model input size (default: from the bundle metadata)",
    )
    parser.add_argument("--image-channels", type=int)
    parser.add_argument(
        "--modality", nargs="+", help="modalities the deploy app accepts (default: metadata, else CT MR)"
    )
    norm = parser.add_mutually_exclusive_group()  # the intensity normalisation: a LOW HIGH range, or none
    for flag, help_text in (
        ("--window", "intensity window in scanner units (HU for CT) mapped to [0, 1]"),
        ("--percentiles", "per-slice percentile min-max normalisation to [0, 1]"),
    ):
        norm.add_argument(flag, type=float, nargs=2, metavar=("LOW", "HIGH"), help=help_text)
    norm.add_argument("--no-normalisation", action="store_true", help="images are used as they are")
    parser.add_argument("--class-label", type=int, help="class label for models conditioned on a level / rater id")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference traced vs eager")
    parser.add_argument("--check-sampling", action="store_true", help="also compare full sampling runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="trace on this device: the one the model will run on")
    parser.add_argument("--overwrite", action="store_true")


def main(args: argparse.Namespace) -> int:
    """Run ``ambiseg export``."""
    intensity = None
    if args.window:
        intensity = {"mode": "window", "window": args.window}
    elif args.percentiles:
        intensity = {"mode": "percentile", "percentiles": args.percentiles}
    elif args.no_normalisation:
        intensity = {"mode": "none"}
    report = export_bundle(
        args.bundle_root,
        args.out,
        ckpt_file=args.ckpt_file,
        config_files=args.config_file,
        meta_file=args.meta_file,
        overrides=dict(args.override),
        key_in_ckpt=args.key_in_ckpt,
        network_id=args.network_id,
        inferer_id=args.inferer_id,
        spatial_shape=args.spatial_size,
        image_channels=args.image_channels,
        modalities=args.modality,
        intensity=intensity,
        class_label=args.class_label,
        tolerance=args.tolerance,
        check_sampling=args.check_sampling,
        seed=args.seed,
        overwrite=args.overwrite,
        device=args.device,
    )
    print(report.summary())
    return 0
