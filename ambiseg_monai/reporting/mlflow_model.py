"""A trained bundle as an MLflow model: a ``pyfunc`` that draws N masks per image, with their mean and variance maps.

Logged at the end of every training by :class:`ambiseg_monai.handlers.MLflowModelLogger` (the bundles' switch
``log_mlflow_model``, on by default), it loads in any process where ambiseg-monai is installed, without the
bundle's files, and serves over REST (docs/deploy.md, "MLflow model")::

    model = mlflow.pyfunc.load_model("models:/<model id>")
    out = model.predict(images, params={"num_samples": 8, "seed": 1})  # images: B x C x H x W float32
    out["masks"]     # B x N x H x W uint8 {0, 1}
    out["mean"]      # B x H x W float32: fraction of the N masks marking each pixel
    out["variance"]  # B x H x W float32: p (1 - p) of the same

    mlflow models serve -m models:/<model id> --env-manager local -h 127.0.0.1 -p 5001

What the model holds:

- ``artifacts/config.json``: the bundle config as its ``inference.json`` runs: the executed training config (files
  merged, macros expanded, command-line overrides applied) with the bundle's ``inference.json`` on top, and the
  values the config computes from the dataset (e.g. ``num_raters``, the consensus levels) written in, so that
  nothing reads the dataset (:func:`model_bundle_config`);
- ``artifacts/network.pt``: the weights the bundle's ``inference.json`` loads (the ``ckpt_load_dict`` entry of the
  best checkpoint ``model.pt``: the EMA weights where the bundle evaluates them), as a plain state dict;
- ``ambiseg_model.py``: MLflow "models from code" (nothing is pickled): it builds
  :class:`AmbiguousSegmentationModel`, whose settings (config ids, image shape, parameter defaults) are the
  MLmodel's ``model_config``;
- the signature: input a float32 tensor B x C x H x W (the training images' channels and size, intensities as
  the prepared dataset stores them); outputs ``masks``, ``mean``, ``variance``; params: the sampler settings the
  bundle's N-sample inferer has (``num_samples``, ``num_inference_steps``, ``seed``; consensus diffusion:
  ``num_generations`` in place of ``num_samples``), defaulting to the bundle's inference values.

The sampling is the bundle's own: its ``infer#inferer`` and ``infer#postprocessing`` built from the config, run
as ``inference.json``'s evaluator runs them (one call for the batch, then the post-processing on
``{"image", "pred"}``). Sample ``n`` of image ``b`` of a request is seeded from ``(seed, b, n)``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import logging
import math
import numbers
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from ambiseg_monai import __version__

__all__ = [
    "MODEL_NAME",
    "SAMPLER_PARAMS",
    "AmbiguousSegmentationModel",
    "LoggedSegmentationModel",
    "checkpoint_state_dict",
    "model_bundle_config",
    "model_signature",
    "model_requirements",
    "sampler_param_defaults",
    "segmentation_outputs",
    "save_segmentation_model",
    "log_segmentation_model",
]

#: The logged model's name (``runs:/<run id>/model`` resolves to it).
MODEL_NAME = "model"
#: Settings of a bundle's N-sample inferer that a request may set (``params``), where the inferer has them.
SAMPLER_PARAMS = ("num_samples", "num_generations", "num_inference_steps", "seed")
#: Config ids whose values come from the dataset: nothing the served model builds may still depend on them.
DATASET_IDS = ("dataset_path", "input_dir")
CONFIG_ARTIFACT = "config"
WEIGHTS_ARTIFACT = "weights"
#: The model's code (MLflow "models from code"): builds the model class; everything else is in artifacts and
#: model_config.
MODEL_CODE = '''"""MLflow model code of an ambiseg-monai model: see ambiseg_monai.reporting.mlflow_model."""

import mlflow

from ambiseg_monai.reporting.mlflow_model import AmbiguousSegmentationModel

mlflow.models.set_model(AmbiguousSegmentationModel())
'''
MODEL_CODE_FILE = "ambiseg_model.py"
#: ``model_config`` keys the model needs (besides the optional ``device``).
MODEL_SETTINGS = ("network_id", "inferer_id", "postprocessing_id", "image_shape", "params")


# ------------------------------------------------------------------------------------------- the model


def _normalise_id(config_id: str) -> str:
    return str(config_id).replace("::", "#")


def segmentation_outputs(samples: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """The served outputs of B x N x H x W samples in [0, 1] (binary masks, or soft maps).

    Returns:
        ``{"masks": B x N x H x W uint8 (sample >= 0.5), "mean": B x H x W float32 (mean over the N samples),
        "variance": B x H x W float32 (variance over the N samples, p (1 - p) for binary masks)}``: the maps
        ``inference.json`` writes as NIfTI.
    """
    values = torch.as_tensor(samples).detach().float().cpu()
    if values.ndim != 4:
        raise ValueError(f"samples must be B x N x H x W, got shape {tuple(values.shape)}.")
    return {
        "masks": (values >= 0.5).to(torch.uint8).numpy(),
        "mean": values.mean(dim=1).numpy().astype(np.float32),
        "variance": values.var(dim=1, unbiased=False).numpy().astype(np.float32),
    }


def _bad_input(message: str) -> mlflow.exceptions.MlflowException:
    """An input error as MLflow reports it: ``INVALID_PARAMETER_VALUE`` (the REST endpoint answers 400 with the
    message)."""
    return mlflow.exceptions.MlflowException.invalid_parameter_value(message)


def _prediction_samples(prediction: Any) -> torch.Tensor:
    """The B x N x H x W samples of an evaluator output's ``pred`` (a tensor, or a dict holding ``pred``)."""
    if isinstance(prediction, Mapping):
        prediction = prediction.get("pred", prediction.get("samples"))
    if not isinstance(prediction, torch.Tensor) or prediction.ndim != 4:
        raise ValueError(
            "the bundle's inferer and post-processing must give B x N x H x W samples under 'pred', got "
            f"{getattr(prediction, 'shape', type(prediction).__name__)}."
        )
    return prediction


class AmbiguousSegmentationModel(PythonModel):
    """The ``pyfunc`` of a trained bundle: ``predict(images B x C x H x W) -> {"masks", "mean", "variance"}``.

    Built by the model's code file; :meth:`load_context` reads its settings (``model_config``: ``network_id``,
    ``inferer_id``, ``postprocessing_id``, ``image_shape`` C H W, ``params`` defaults, optional ``device``:
    ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``, ...) and artifacts (``config``, ``weights``).
    The device can be chosen when loading: ``mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})``.
    """

    def load_context(self, context) -> None:
        """Build the network from the packaged config and load its weights (the bundle's files are not needed)."""
        from monai.bundle import ConfigParser

        settings = dict(context.model_config or {})
        missing = [key for key in MODEL_SETTINGS if key not in settings]
        if missing:
            raise ValueError(f"this MLflow model's model_config lacks {missing}: it was not written by ambiseg-monai.")
        self.network_id = str(settings["network_id"])
        self.inferer_id = str(settings["inferer_id"])
        self.postprocessing_id = settings["postprocessing_id"] or None
        self.image_shape = tuple(int(s) for s in settings["image_shape"])
        self.param_defaults = {str(k): int(v) for k, v in dict(settings["params"]).items()}
        device = str(settings.get("device") or "auto")
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.config = json.loads(Path(context.artifacts[CONFIG_ARTIFACT]).read_text(encoding="utf-8"))
        network = ConfigParser(copy.deepcopy(self.config)).get_parsed_content(self.network_id, instantiate=True)
        state = torch.load(context.artifacts[WEIGHTS_ARTIFACT], map_location="cpu", weights_only=True)
        network.load_state_dict(state, strict=True)
        self.network = network.to(self.device).eval()

    def check_images(self, model_input: Any) -> np.ndarray:
        """``model_input`` as a float32 B x C x H x W array of the model's C, H, W.

        Raises:
            MlflowException (INVALID_PARAMETER_VALUE, HTTP 400 when served): not numbers, another shape, NaN or
            infinite values; the message names the expected shape.
        """
        channels, height, width = self.image_shape
        expected = f"B x {channels} x {height} x {width} (float32 images, intensities as in the prepared dataset)"
        try:
            images = np.asarray(model_input, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise _bad_input(
                f"the model takes images {expected}; could not read the input as numbers ({error})."
            ) from None
        if images.ndim != 4 or tuple(images.shape[1:]) != (channels, height, width) or images.shape[0] < 1:
            raise _bad_input(f"the model takes images {expected}, got shape {tuple(images.shape)}.")
        if not np.isfinite(images).all():
            raise _bad_input("the images contain NaN or infinite values.")
        return images

    def sampler_settings(self, params: Mapping[str, Any] | None) -> dict[str, int]:
        """The inferer settings of a request: the model's defaults, updated with ``params`` (integers; counts >= 1).

        Raises:
            MlflowException (INVALID_PARAMETER_VALUE): a value that is not an integer, or a count below 1.
        """
        settings = dict(self.param_defaults)
        for name, value in dict(params or {}).items():
            if name not in settings or value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
                raise _bad_input(f"param {name} must be an integer, got {value!r}.")
            settings[name] = int(float(value))
        low = [f"{k}={v}" for k, v in settings.items() if k != "seed" and v < 1]
        if low:
            raise _bad_input(f"params {', '.join(low)}: sample, generation and step counts must be >= 1.")
        return settings

    def sampler(self, settings: Mapping[str, int]) -> tuple[Callable, Callable | None]:
        """The bundle's N-sample inferer (with ``settings``, no progress bar) and post-processing, built anew."""
        from monai.bundle import ConfigParser

        parser = ConfigParser(copy.deepcopy(self.config))
        inferer_config = parser.get(self.inferer_id) or {}
        overrides: dict[str, Any] = {f"{self.inferer_id}#{k}": v for k, v in settings.items()}
        if isinstance(inferer_config, Mapping) and "progress" in inferer_config:
            overrides[f"{self.inferer_id}#progress"] = False
        parser.update(overrides)
        inferer = parser.get_parsed_content(self.inferer_id, instantiate=True)
        post = None
        if self.postprocessing_id and self.postprocessing_id in parser and parser.get(self.postprocessing_id):
            post = parser.get_parsed_content(self.postprocessing_id, instantiate=True)
        return inferer, post

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """images B x C x H x W float32 -> ``{"masks": B x N x H x W uint8, "mean": B x H x W float32,
        "variance": B x H x W float32}`` (see :func:`segmentation_outputs`).

        ``params``: ``num_samples`` (N; consensus diffusion: ``num_generations`` per level, N = the number of
        levels), ``num_inference_steps``, ``seed``, where the bundle's inferer has them.
        """
        images = self.check_images(model_input)
        settings = self.sampler_settings(params)
        inputs = torch.from_numpy(images).to(self.device)
        try:
            # the bundle's components check their settings (e.g. more steps than the model was trained with)
            inferer, post = self.sampler(settings)
            with torch.no_grad():
                prediction = inferer(inputs, self.network, image_ids=list(range(len(images))))
                output: Any = {"image": inputs, "pred": prediction}
                if post is not None:
                    output = post(output)
        except ValueError as error:
            raise _bad_input(f"sampling with {settings} failed: {error}") from error
        return segmentation_outputs(_prediction_samples(output["pred"]))


# ----------------------------------------------------------------------------------- building the model


def checkpoint_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """The network weights in a checkpoint file, read as the bundles' ``CheckpointLoader(load_dict={key: net})``
    reads them: ``checkpoint[key]`` (e.g. ``"ema"``), or the file itself when it is a plain state dict (what
    Ignite's checkpoint writes for a ``best_model_dict`` of one entry, or ``key`` None). A ``module.`` prefix
    (DistributedDataParallel) is removed.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: neither ``checkpoint[key]`` nor the file is a state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary.")

    def is_state_dict(value: Any) -> bool:
        return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())

    if key is not None and key in checkpoint:
        checkpoint = checkpoint[key]
    elif not is_state_dict(checkpoint):
        entries = sorted(str(k) for k in checkpoint)
        shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
        wanted = f"no '{key}' entry" if key is not None else "no plain state dict"
        raise ValueError(f"checkpoint {path} has {wanted} (it holds {shown}).")
    if not is_state_dict(checkpoint):
        raise ValueError(f"{path} [{key}] is not a state dict of tensors.")
    state = {str(k): v for k, v in checkpoint.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _references(parser, config_id: str) -> set[str]:
    from monai.bundle.reference_resolver import ReferenceResolver

    return {_normalise_id(r) for r in ReferenceResolver.find_refs_in_config(parser[config_id], config_id)}


def _reached(parser, roots: Sequence[str]) -> set[str]:
    """The config ids ``roots`` refer to, directly or not (``@`` references, in expressions too), and the roots."""
    seen: set[str] = set()
    stack = [_normalise_id(r) for r in roots]
    while stack:
        config_id = stack.pop()
        if config_id in seen or config_id not in parser:
            continue
        seen.add(config_id)
        stack.extend(_references(parser, config_id) - seen)
    return seen


def _is_literal(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (list, tuple)) and all(_is_literal(v) and not isinstance(v, (list, tuple)) for v in value)


def model_bundle_config(
    config: Mapping[str, Any],
    inference_config: Mapping[str, Any] | None,
    component_ids: Sequence[str],
    resolve: Callable[[str], Any] | None = None,
    dataset_ids: Sequence[str] = DATASET_IDS,
) -> dict[str, Any]:
    """The config a served model builds its components from, with no file or dataset behind it.

    ``config`` (the executed training config, macros expanded) with the top-level entries of ``inference_config``
    (the bundle's ``inference.json``, macros expanded) set on top, as ``monai.bundle run`` merges a list of config
    files. Every value the components (``component_ids``, e.g. ``network_def``, ``infer#inferer``) refer to that
    the config computes from the dataset (a ``$`` expression referring, directly or not, to one of
    ``dataset_ids``: e.g. ``num_raters``) is replaced by its value, ``resolve(id)`` (the training's parser).

    Raises:
        ValueError: a component still depends on the dataset (a value that cannot be written into the config).
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser(copy.deepcopy(dict(config)))
    for key, value in (inference_config or {}).items():
        if key != "_meta_":
            parser[key] = copy.deepcopy(value)
    for config_id in component_ids:
        if config_id not in parser:
            raise ValueError(f"the bundle config has no '{config_id}' to build the model from.")
    dataset = {_normalise_id(d) for d in dataset_ids}
    for config_id in sorted(_reached(parser, component_ids) - dataset):
        value = parser[config_id]
        if not (isinstance(value, str) and value.startswith("$") and _reached(parser, [config_id]) & dataset):
            continue
        if resolve is None:
            raise ValueError(f"'{config_id}' ({value}) is computed from the dataset: give its value (resolve).")
        resolved = resolve(config_id)
        if not _is_literal(resolved):
            raise ValueError(
                f"'{config_id}' is computed from the dataset and its value ({type(resolved).__name__}) cannot be "
                "written into the model's config."
            )
        parser[config_id] = list(resolved) if isinstance(resolved, tuple) else resolved
    still = sorted(_reached(parser, component_ids) & dataset)
    if still:
        raise ValueError(f"the model's components {list(component_ids)} still refer to the dataset ({still}).")
    return json.loads(json.dumps(parser.get(), default=str))


def sampler_param_defaults(config: Mapping[str, Any], inferer_id: str) -> dict[str, int]:
    """The request params of a model: the :data:`SAMPLER_PARAMS` its inferer config sets, with their values."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(copy.deepcopy(dict(config)))
    inferer = parser.get(inferer_id)
    if not isinstance(inferer, Mapping):
        raise ValueError(f"'{inferer_id}' is not a component (a dict with _target_) in the model's config.")
    defaults = {}
    for name in SAMPLER_PARAMS:
        if name in inferer:
            value = parser.get_parsed_content(f"{inferer_id}#{name}", instantiate=False)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
                defaults[name] = int(value)
    return defaults


def model_signature(image_shape: Sequence[int], param_defaults: Mapping[str, int]) -> ModelSignature:
    """Input: a float32 tensor ``(-1, C, H, W)``; outputs ``masks`` ``(-1, -1, H, W)`` uint8, ``mean`` and
    ``variance`` ``(-1, H, W)`` float32; params: the sampler settings (``long``, with their defaults)."""
    channels, height, width = (int(s) for s in image_shape)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, height, width))]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.uint8), (-1, -1, height, width), "masks"),
                TensorSpec(np.dtype(np.float32), (-1, height, width), "mean"),
                TensorSpec(np.dtype(np.float32), (-1, height, width), "variance"),
            ]
        ),
        params=ParamSchema([ParamSpec(name, "long", int(value)) for name, value in param_defaults.items()]),
    )


def model_requirements() -> list[str]:
    """The model's pip requirements, pinned to this environment (local version labels such as ``+cpu`` dropped):
    the libraries loading it imports. ambiseg-monai itself must be installed where the model is served."""
    names = ("mlflow", "torch", "monai", "pytorch-ignite", "numpy")
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return [*pins, f"ambiseg-monai=={__version__}"]


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """No artifact progress bars and no INFO lines from MLflow while a model is written and uploaded: a training
    prints one line for the model, not MLflow's steps."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    name = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name
    previous = os.environ.get(name)
    os.environ[name] = "false"
    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    mlflow_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        mlflow_logger.setLevel(level)
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def save_segmentation_model(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    image_shape: Sequence[int],
    network_id: str = "network_def",
    inferer_id: str = "infer#inferer",
    postprocessing_id: str | None = "infer#postprocessing",
    metadata: Mapping[str, Any] | None = None,
    mlflow_model: Model | None = None,
) -> Model:
    """Write the MLflow model folder of a bundle's network (``mlflow.pyfunc.save_model``, models from code).

    Args:
        path: the folder to write (must not exist).
        config: the self-contained config (:func:`model_bundle_config`).
        state_dict: the network's weights.
        image_shape: C H W of the images the model takes.
        network_id, inferer_id, postprocessing_id: config ids of the network, the N-sample inferer and the
            evaluator post-processing (None or a null entry: none).
        metadata: the MLmodel's ``metadata``.
        mlflow_model: the ``Model`` to fill (a logged model's ids), default a new one.

    Returns:
        the saved ``Model`` (its signature and ``model_config`` included).
    """
    if len(image_shape) != 3 or min(int(s) for s in image_shape) < 1:
        raise ValueError(f"image_shape must be C H W, got {list(image_shape)}.")
    params = sampler_param_defaults(config, inferer_id)
    settings = {
        "network_id": network_id,
        "inferer_id": inferer_id,
        "postprocessing_id": postprocessing_id or "",
        "image_shape": [int(s) for s in image_shape],
        "params": params,
        "device": "auto",
    }
    mlflow_model = mlflow_model or Model()
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp)
        (files / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, files / "network.pt")
        (files / MODEL_CODE_FILE).write_text(MODEL_CODE, encoding="utf-8")
        with _quiet_mlflow():
            mlflow.pyfunc.save_model(
                path=str(path),
                python_model=str(files / MODEL_CODE_FILE),
                artifacts={CONFIG_ARTIFACT: str(files / "config.json"), WEIGHTS_ARTIFACT: str(files / "network.pt")},
                model_config=settings,
                signature=model_signature(image_shape, params),
                # what the MLflow UI shows and MLflow writes as serving_input_example.json (the REST request body)
                input_example=(np.zeros((1, *(int(s) for s in image_shape)), dtype=np.float32), params),
                pip_requirements=model_requirements(),
                metadata=dict(metadata or {}),
                mlflow_model=mlflow_model,
            )
    return mlflow_model


class LoggedSegmentationModel:
    """What :func:`log_segmentation_model` logged: the model id, its ``models:/`` URI and the time it took."""

    def __init__(self, model_id: str, run_id: str, seconds: float) -> None:
        self.model_id = model_id
        self.run_id = run_id
        self.seconds = seconds

    @property
    def model_uri(self) -> str:
        """``models:/<model id>``: what ``mlflow.pyfunc.load_model`` and ``mlflow models serve -m`` take."""
        return f"models:/{self.model_id}"


def _link_metrics(client: mlflow.MlflowClient, run_id: str, model_id: str, step: int) -> None:
    """Link the run's metrics logged at ``step`` to the model, as ``mlflow.<flavor>.log_model(step=...)`` does
    (the MLflow UI lists them with the model)."""
    from mlflow.entities import Metric

    linked = []
    for key in client.get_run(run_id).data.metrics:
        for metric in client.get_metric_history(run_id, key):
            if metric.step == step and getattr(metric, "model_id", None) is None:
                linked.append(Metric(key, metric.value, metric.timestamp, metric.step, model_id=model_id))
    if linked:
        client.log_batch(run_id, metrics=linked)


def log_segmentation_model(
    client: mlflow.MlflowClient,
    run_id: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    image_shape: Sequence[int],
    network_id: str = "network_def",
    inferer_id: str = "infer#inferer",
    postprocessing_id: str | None = "infer#postprocessing",
    name: str = MODEL_NAME,
    step: int = 0,
    tags: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> LoggedSegmentationModel:
    """Log a bundle's network to a run as an MLflow model (an MLflow 3 logged model, output of the run).

    The model is written by :func:`save_segmentation_model`, its artifacts uploaded through ``client`` (so a
    failover client keeps working), the run's metrics at ``step`` linked to it, and it is marked READY (FAILED,
    and the error raised, when a step fails). Arguments as :func:`save_segmentation_model`, and:

    Args:
        client: the run's MLflow client.
        run_id: the run the model is an output of.
        name: the model's name (``runs:/<run id>/<name>`` resolves to it).
        step: the training step of the weights (the epoch of the best checkpoint).
        tags: model tags.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    started = time.perf_counter()
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, tags=dict(tags or {}), model_type="ambiguous-segmentation"
    )
    try:
        mlflow_model = Model(
            artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id, model_id=logged.model_id
        )
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / name
            save_segmentation_model(
                folder,
                config,
                state_dict,
                image_shape,
                network_id,
                inferer_id,
                postprocessing_id,
                metadata,
                mlflow_model,
            )
            with _quiet_mlflow():
                client.log_model_artifacts(logged.model_id, str(folder))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=int(step))])
        _link_metrics(client, run_id, logged.model_id, int(step))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return LoggedSegmentationModel(logged.model_id, run_id, time.perf_counter() - started)
