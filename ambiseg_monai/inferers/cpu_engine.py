"""CPU inference engines for the N-sample diffusion inferer: the denoiser exported to ONNX and run there.

:class:`CPUEngineDenoiser` wraps a conditional denoiser (the protocol of
:mod:`ambiseg_monai.networks.denoisers`, or a TorchScript one such as the deploy app's
:class:`~ambiseg_monai.deploy.exported.ExportedDenoiser`) behind the same protocol:
``encode_condition(image)`` stays in PyTorch (it runs once per image), while every denoiser call
``network(x_t, timesteps, cond=..., class_labels=...)`` of the sampling loop runs in the engine:

- ``"onnxruntime"``: ONNX Runtime's CPU execution provider, float32;
- ``"openvino"``: OpenVINO on the CPU, float32, or bfloat16 when asked (``precision="bfloat16"``; on a
  CPU with AMX / AVX512-BF16 this is OpenVINO's own default, which is why it is set explicitly here).

The denoiser is exported on first use with ``torch.onnx.export(..., dynamo=False)`` (a trace; MONAI's
``DiffusionModelUNet`` cannot be scripted) with the rows, height and width as dynamic axes, one
export per call signature (timestep dtype, with or without class labels). A TorchScript denoiser
(``traced`` and ``traced_inputs``, see :class:`CPUEngineDenoiser`) has its TorchScript module
exported as it is: a loaded TorchScript module cannot be called inside a new trace. A change of the wrapped
network's weights (a new checkpoint loaded, an EMA update) is detected through the parameters'
in-place version counters and triggers a new export. Both engines use ``torch.get_num_threads()``
threads, read when the export is made.

The engines are optional dependencies (``pip install 'ambiseg-monai[cpu-engines]'``);
:func:`require_engine` raises a short ``ImportError`` naming the missing package and the pip command.
Measured speed and accuracy: docs/benchmarks.md, "CPU inference engines".
"""

from __future__ import annotations

import importlib
import os
import tempfile
import warnings
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ambiseg_monai.networks.denoisers import condition_of, unwrap_network

__all__ = ["ENGINES", "ENGINE_PACKAGES", "PRECISIONS", "CPUEngineDenoiser", "check_precision", "require_engine"]

#: ``engine`` values of :class:`~ambiseg_monai.inferers.diffusion.DiffusionSamplingInferer`.
ENGINES = ("torch", "onnxruntime", "openvino")

#: engine -> the packages it imports and their pinned versions (the ``cpu-engines`` extra of setup.py).
ENGINE_PACKAGES = {
    "onnxruntime": {"onnxruntime": "1.32.0", "onnx": "1.23.2"},
    "openvino": {"openvino": "2026.4.1", "onnx": "1.23.2"},
}


#: precisions of the denoiser calls: float32, or bfloat16 (PyTorch autocast, or OpenVINO's bf16 inference).
PRECISIONS = ("float32", "bfloat16")


def check_precision(engine: str, precision: str) -> None:
    """Raise ValueError for a precision that is not in :data:`PRECISIONS` or that ``engine`` cannot run
    (onnxruntime's CPU kernels are float32 only)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if precision == "bfloat16" and engine not in ("torch", "openvino"):
        raise ValueError(f"engine={engine!r} runs float32 only; bfloat16 is available with engine='openvino'.")


def require_engine(engine: str) -> ModuleType:
    """Import the runtime of ``engine`` (and ``onnx``, which the export needs); a clear error if missing.

    Returns:
        the engine's module (``onnxruntime`` or ``openvino``).

    Raises:
        ValueError: ``engine`` is not an exported-model engine.
        ImportError: a package is missing; the message names it and the pip command that installs it.
    """
    if engine not in ENGINE_PACKAGES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}.")
    packages = ENGINE_PACKAGES[engine]
    modules, missing = {}, []
    for name in packages:
        try:
            modules[name] = importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        pins = " ".join(f"{package}=={version}" for package, version in packages.items())
        raise ImportError(
            f"engine={engine!r} needs {' and '.join(repr(name) for name in missing)} (not installed): "
            f"pip install {pins}   (or: pip install 'ambiseg-monai[cpu-engines]')"
        )
    return modules[engine]


def _as_numpy(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous().numpy()


class _Signature(torch.nn.Module):
    """The traced call: ``(x_t, timesteps, cond[, class_labels]) -> network(...)`` with no optional inputs."""

    def __init__(self, network: torch.nn.Module, with_labels: bool) -> None:
        super().__init__()
        self.network = network
        self.with_labels = with_labels

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor, *labels: torch.Tensor):
        return self.network(x_t, timesteps, cond=cond, class_labels=labels[0] if self.with_labels else None)


class CPUEngineDenoiser(torch.nn.Module):
    """A conditional denoiser whose denoising calls run in ONNX Runtime or OpenVINO on the CPU.

    Args:
        network: the PyTorch denoiser (``encode_condition(image)`` and
            ``network(x_t, timesteps, cond=..., class_labels=...) -> rows x C_out x H x W``); DDP /
            DataParallel wrappers are looked through. Its condition must be one tensor. A TorchScript
            denoiser (the deploy app's :class:`~ambiseg_monai.deploy.exported.ExportedDenoiser`) has a
            ``traced`` ``torch.jit.ScriptModule`` with ``forward(x_t, timesteps, cond[, class_labels])``
            and ``traced_inputs(x_t, timesteps, cond, class_labels, image)`` giving those positional
            inputs; ``traced`` is what is exported then.
        engine: ``"onnxruntime"`` or ``"openvino"``.
        precision: ``"float32"``, or ``"bfloat16"`` (OpenVINO only: its bf16 inference precision).

    Raises:
        ImportError: the engine's package (or ``onnx``) is not installed (see :func:`require_engine`).
    """

    def __init__(self, network: torch.nn.Module, engine: str, precision: str = "float32") -> None:
        super().__init__()
        self.runtime = require_engine(engine)
        check_precision(engine, precision)
        self.network = unwrap_network(network)
        # a TorchScript denoiser is exported as it is (it cannot be traced again inside _Signature)
        self.scripted = isinstance(getattr(self.network, "traced", None), torch.jit.ScriptModule)
        self.engine = engine
        self.precision = precision
        self._sessions: dict[tuple, Any] = {}
        self._weights_version: tuple[int, ...] | None = None

    def encode_condition(self, image: torch.Tensor) -> Any:
        """B x C x H x W image -> the condition, computed by the PyTorch network (once per image)."""
        return self.network.encode_condition(image)

    def _current_weights(self) -> tuple[int, ...]:
        # every in-place change of a parameter or buffer (load_state_dict, EMA, optimiser) bumps its version
        tensors = [*self.network.parameters(), *self.network.buffers()]
        return (*(id(t) for t in tensors), *(t._version for t in tensors))

    def _export(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor, labels: list[torch.Tensor]):
        """Trace the network on these inputs to ONNX and load it into the engine; returns the runner."""
        names = ["x_t", "timesteps", "cond", *(["class_labels"] if labels else [])]
        dynamic = {name: {0: "rows"} for name in [*names, "output"]}
        for name in ("x_t", "cond"):
            dynamic[name].update({2: "height", 3: "width"})
        dynamic["output"].update({2: "height", 3: "width"})
        inputs = tuple(t.detach().cpu() for t in (x_t, timesteps, cond, *labels))
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "denoiser.onnx")
            # no enclosing autocast (an evaluator's amp) may leak its casts into the exported graph
            with warnings.catch_warnings(), torch.no_grad(), torch.autocast("cpu", enabled=False):
                # the legacy (trace) exporter's deprecation notice and the tracer's notes on shape checks,
                # which only read channel counts (constants of the network)
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # a TorchScript module's positional inputs need no keyword matching (which it cannot do)
                warnings.filterwarnings("ignore", "no signature found for", UserWarning)
                torch.onnx.export(
                    self.network.traced if self.scripted else _Signature(self.network, bool(labels)).eval(),
                    inputs,
                    path,
                    dynamo=False,
                    input_names=names,
                    output_names=["output"],
                    dynamic_axes=dynamic,
                    opset_version=17,
                )
            return self._load(path, names)

    def _load(self, path: str, names: list[str]):
        threads = torch.get_num_threads()
        if self.engine == "onnxruntime":
            options = self.runtime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors only
            session = self.runtime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            return lambda feeds: session.run(None, feeds)[0]
        precision = "bf16" if self.precision == "bfloat16" else "f32"
        compiled = self.runtime.Core().compile_model(
            path,
            "CPU",
            {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"},
        )
        request = compiled.create_infer_request()
        output = compiled.output(0)
        return lambda feeds: request.infer(feeds)[output]

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Any = None,
        class_labels: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t rows x C x H x W, timesteps (rows,), cond rows x C_cond x H x W -> rows x C_out x H x W.

        The output is float32 (x_t must be on the CPU, where the engines run). ``target`` is ignored
        (no training losses at sampling time).
        """
        if self.scripted:  # its own checks (class labels as traced) and positional inputs
            x_t, timesteps, cond, *labels = self.network.traced_inputs(x_t, timesteps, cond, class_labels, image)
        else:
            cond = condition_of(self, cond, image)
            labels = [] if class_labels is None else [class_labels.to(dtype=torch.long)]
        if x_t.device.type != "cpu":
            raise ValueError(f"engine={self.engine!r} runs on the CPU; the samples are on {x_t.device}.")
        if not isinstance(cond, torch.Tensor):
            raise TypeError(
                f"engine={self.engine!r} exports denoisers whose condition is one tensor; got {type(cond).__name__}. "
                "Use engine='torch' for this network."
            )
        weights = self._current_weights()
        if weights != self._weights_version:
            self._sessions.clear()
            self._weights_version = weights
        key = (timesteps.dtype, bool(labels))
        if key not in self._sessions:
            self._sessions[key] = self._export(x_t.float(), timesteps, cond.float(), labels)
        feeds = {"x_t": _as_numpy(x_t, torch.float32), "timesteps": _as_numpy(timesteps, timesteps.dtype)}
        feeds["cond"] = _as_numpy(cond, torch.float32)
        if labels:
            feeds["class_labels"] = _as_numpy(labels[0], torch.long)
        return torch.from_numpy(np.asarray(self._sessions[key](feeds)))
