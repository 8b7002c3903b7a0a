"""Sampling throughput of every method: official CIMD loop vs paper setting vs our fast setting.

Masks per second for N = 16 samples of one image (default 128 x 128), with each bundle's own network
(``bundles/<method>/configs/train.json``, untrained: speed does not depend on the weights):

- ``official loop`` (CIMD only): a re-creation of improved-diffusion's ``p_sample_loop`` as the
  official CIMD code runs it: one sample per call (batch 1), all 1000 ancestral steps, the network
  fed the raw image at every step (``network(x, t, image=image)``), fresh device noise per step.
- ``paper``: the method's published sampler setting through our batched inferer (CIMD and consensus
  diffusion: 1000 DDPM steps; AmbDiffSeg: 10 steps; Prob. U-Net / PHiSeg / SSN: one ``sample`` call per mask;
  an SSN's ``fast`` row draws the N logit maps from one backbone pass).
- ``fast``: our setting: the N masks batched (on a GPU all N in one call; on a CPU ``--cpu-max-rows``
  per call, 4 by default, because a CPU forward pass gets slower per row once the batch outgrows
  the caches), the image encoded once, respaced steps (CIMD 25, consensus 20, AmbDiffSeg 10), mixed
  precision for the network calls (CUDA: fp16 autocast and channels-last; CPU: bfloat16 autocast where
  the CPU has native bfloat16, e.g. AVX512-BF16 or AMX; ``--no-amp`` turns it off).
  The scheduler arithmetic stays float32.

``--engines onnxruntime openvino`` adds, per diffusion method, the fast setting with the denoiser calls in
that CPU inference engine (the inferer's ``engine`` option; onnxruntime float32, openvino bfloat16 where
the fast setting uses bf16 autocast, else float32), with its ratio to the official loop and to the
PyTorch fast setting.

``--flow-steps 5 10`` adds, per method with a ``flow_matching.json`` overlay (CIMD, AmbDiffSeg), the fast
setting of the flow-matching bundle (the same U-Net without the variance output, trained as a rectified
flow) with that many Euler steps, in PyTorch and in each ``--engines`` engine: fewer steps rather than
faster steps. Whether K steps lose quality is measured on the demo truth, not here
(docs/flow_matching.md: a flow-matching CIMD is as good with 5 Euler steps as with 50).

Long chains are timed on their first ``--timed-steps`` steps and extrapolated linearly (every step
of a chain costs the same: one network call plus one scheduler step); the printout says so.
``sampler overhead`` is the fast setting's time beyond the same number of bare network forward
passes on the same batch (the goal is < 10 %).

    python benchmarks/sampling_methods.py                       # CPU default: 10 timed steps
    python benchmarks/sampling_methods.py --timed-steps 1000    # full chains (GPU)
    python benchmarks/sampling_methods.py --methods cimd --threads 1 --engines onnxruntime openvino
    python benchmarks/sampling_methods.py --methods cimd --threads 1 --engines openvino --flow-steps 5 10
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from ambiseg_monai.diffusion.sampler import repeat_rows, take_rows
from ambiseg_monai.inferers.cpu_engine import ENGINES

try:
    from benchmarks._common import print_table
    from benchmarks.timing import best_seconds
except ImportError:  # run as a script: this folder is sys.path[0]
    from _common import print_table
    from timing import best_seconds

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
# (paper steps, fast steps) per diffusion method
DIFFUSION_STEPS = {"cimd": (1000, 25), "ambdiffseg": (10, 10), "consensus_diffusion": (1000, 20)}
LATENT = ("prob_unet", "phiseg", "ssn")
FLOW_OVERLAY = "flow_matching.json"  # the flow-matching variant of a diffusion bundle (issue #20)
METHODS = (*DIFFUSION_STEPS, *LATENT)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--timed-steps", type=int, default=10, help="steps timed per long chain (then extrapolated)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (best is kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-amp", action="store_true", help="fast setting in float32")
    parser.add_argument("--cpu-max-rows", type=int, default=4,
                        help="fast setting on a CPU: masks per network call (0: all N; GPUs always use all N)")
    parser.add_argument("--engines", nargs="+", default=[], choices=[e for e in ENGINES if e != "torch"],
                        help="also time the fast setting in these CPU inference engines (the inferer's engine option)")
    parser.add_argument("--flow-steps", nargs="+", type=int, default=[], metavar="K",
                        help="also time the fast setting of the method's flow-matching bundle with K Euler steps")
    return parser.parse_args()


def load_method(
    method: str, device: torch.device, overlays: Sequence[str] = (), overrides: Mapping[str, Any] | None = None
) -> ConfigParser:
    """The bundle's training config with the device set (network, schedulers, inferers are read from it).

    ``overlays``: config files of the bundle read after ``train.json`` (e.g. ``lidc.json``, the paper's
    network); ``overrides``: config id -> value, applied last.
    """
    parser = ConfigParser()
    configs = BUNDLES / method / "configs"
    parser.read_config([str(configs / "train.json"), *(str(configs / name) for name in overlays)])
    parser["device"] = f"$torch.device('{device}')"
    parser["num_raters"] = 4  # the demo's rater count; avoids generating a dataset for a speed test
    parser.update(dict(overrides or {}))
    return parser


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The fast setting's autocast dtype: fp16 on CUDA, bf16 on a CPU with native bf16, else None."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def official_cimd_loop(network, scheduler, image: torch.Tensor, num_samples: int, steps: int) -> None:
    """improved-diffusion's p_sample_loop, one sample per call, the first ``steps`` of 1000 steps."""
    scheduler.set_timesteps(scheduler.num_train_timesteps)
    for _ in range(num_samples):
        x = torch.randn(1, 1, *image.shape[2:], device=image.device)
        for t in scheduler.timesteps[:steps].tolist():  # improved-diffusion iterates Python ints
            out = network(x, torch.full((1,), t, device=image.device), image=image)
            x, _ = scheduler.step(out, t, x, noise=torch.randn_like(x))


def diffusion_inferer(
    method: str,
    parser: ConfigParser,
    num_samples: int,
    steps: int,
    max_rows: int | None = None,
    engine: str = "torch",
    autocast_dtype: str | None = None,
):
    """The method's N-sample inferer read from ``parser`` (edited): ``num_samples`` masks per image in ``steps`` steps,
    ``max_rows`` masks per network call (None: all), the denoiser calls in ``engine`` (a CPU inference engine runs
    at ``autocast_dtype``). Called as ``inferer(image 1 x C x H x W, network)``."""
    inferer_id = "consensus_inferer" if method == "consensus_diffusion" else "validate#inferer"
    if engine != "torch":
        parser[f"{inferer_id}#engine"] = engine
        parser[f"{inferer_id}#autocast_dtype"] = autocast_dtype
    if method == "consensus_diffusion":
        parser["consensus_inferer#num_generations"] = max(1, num_samples // 4)
        parser["consensus_inferer#num_inference_steps"] = steps
        parser["consensus_inferer#return_samples"] = False
        parser["consensus_inferer#max_rows"] = max_rows
        return parser.get_parsed_content("consensus_inferer", lazy=False)
    parser["validate#inferer#num_samples"] = num_samples
    parser["validate#inferer#num_inference_steps"] = steps
    parser["validate#inferer#max_rows"] = max_rows
    return parser.get_parsed_content("validate#inferer", lazy=False)


def fast_max_rows(requested: int, device: torch.device) -> int | None:
    """Rows per network call in the fast setting: all of them on a GPU; on a CPU ``requested`` (0: all).

    On one CPU thread a forward pass costs more per row as the batch grows past what the caches hold
    (CIMD bundle network at 128 x 128, bf16: 160 ms per row up to 4 rows, 318 ms at 16).
    """
    if device.type == "cuda" or requested == 0:
        return None
    return requested


def bare_forward_time(
    network, inferer, image: torch.Tensor, num_samples: int, steps: int, method: str, repeats: int,
    max_rows: int | None = None,
) -> float:
    """Seconds of ``steps`` network calls on the fast setting's rows (no scheduler, no noise draws)."""
    model = getattr(network, "module", network)
    cond = repeat_rows(model.encode_condition(image), num_samples)
    x = torch.randn(num_samples, 1, *image.shape[2:], device=image.device)
    labels = torch.arange(num_samples, device=image.device) % 4 if method == "consensus_diffusion" else None
    timesteps = inferer.scheduler.timesteps

    chunk = max_rows or num_samples

    def run() -> None:
        for i in range(steps):
            t = timesteps[i % len(timesteps)]
            for start in range(0, num_samples, chunk):
                rows = slice(start, start + chunk)
                network(x[rows], t.reshape(1).expand(x[rows].shape[0]), cond=take_rows(cond, rows),
                        class_labels=None if labels is None else labels[rows])  # fmt: skip

    run()  # warm-up
    return best_seconds(run, image.device, repeats)


Row = tuple[str, str, float, str]  # (method, setting, masks/s, ratio note)


def method_rows(
    method: str,
    make_parser: Callable[[], ConfigParser],
    image: torch.Tensor,
    num_samples: int,
    timed_steps: int,
    repeats: int,
    amp: torch.dtype | None,
    max_rows: int | None,
    official_rate: float | None = None,
    engines: Sequence[str] = (),
    flow_steps: Sequence[int] = (),
) -> tuple[list[Row], float | None]:
    """The rows of one method: official loop (CIMD), paper setting, fast setting (see the module docstring).

    Args:
        method: a bundle name.
        make_parser: returns a fresh :func:`load_method` parser of the bundle (the fast setting needs its own);
            takes :func:`load_method`'s ``overlays`` keyword (the flow-matching rows).
        image: 1 x C x H x W, on the device to measure on.
        num_samples: N masks per image.
        timed_steps: steps timed per long chain (then extrapolated).
        repeats: timed runs per setting (best is kept).
        amp: the fast setting's autocast dtype (None: float32).
        max_rows: the fast setting's masks per network call (None: all N).
        official_rate: masks/s of the official CIMD loop, for the ratio notes (measured here for ``cimd``).
        engines: CPU inference engines ("onnxruntime", "openvino") whose fast setting is timed too (CPU only).
        flow_steps: Euler step counts at which the fast setting of the method's flow-matching bundle is timed
            too (in PyTorch and in each engine); methods without a ``flow_matching.json`` overlay ignore it.

    Returns:
        the rows and the official loop's masks/s (``official_rate`` unless ``method`` is CIMD).
    """
    device, n, r = image.device, num_samples, repeats
    torch.manual_seed(0)
    parser = make_parser()
    network = parser.get_parsed_content("network").eval()
    rows: list[Row] = []
    if method in LATENT:
        inferer = parser.get_parsed_content("validate#inferer", lazy=False)
        one = type(inferer)(num_samples=1, seed=0)
        batched = type(inferer)(num_samples=n, seed=0)
        with torch.no_grad():
            batched(image, network, image_ids=["warm"])
            paper_s = best_seconds(lambda: [one(image, network, image_ids=[f"s{i}"]) for i in range(n)], device, r)
            fast_s = best_seconds(lambda: batched(image, network, image_ids=["x"]), device, r)
        rows.append((method, "paper (1 mask per call)", n / paper_s, ""))
        rows.append((method, "fast (N masks in 1 call)", n / fast_s, f"{paper_s / fast_s:.1f}x vs paper"))
        return rows, official_rate
    paper_steps, fast_steps = DIFFUSION_STEPS[method]
    if method == "cimd":
        scheduler = parser.get_parsed_content("sampling_scheduler")
        timed = min(timed_steps, 1000)
        with torch.no_grad():
            official_cimd_loop(network, scheduler, image, 1, 2)  # warm-up
            seconds = best_seconds(lambda: official_cimd_loop(network, scheduler, image, n, timed), device, r)
        official_rate = n / (seconds * 1000 / timed)
        rows.append((method, f"official loop (1000 steps, batch 1; {timed} timed)", official_rate, "1.0x"))
    # paper setting through our batched inferer (long chains: timed prefix, extrapolated)
    timed = min(timed_steps, paper_steps)
    paper = diffusion_inferer(method, parser, n, timed)
    with torch.no_grad():
        paper(image, network, image_ids=["warm"])
        seconds = best_seconds(lambda: paper(image, network, image_ids=["x"]), device, r) * paper_steps / timed
    paper_rate = n / seconds
    note = f"{paper_rate / official_rate:.1f}x vs official" if method == "cimd" and official_rate else ""
    rows.append((method, f"paper ({paper_steps} steps, batched; {timed} timed)", n / seconds, note))
    # our fast setting
    fast = diffusion_inferer(method, make_parser(), n, fast_steps, max_rows)
    if device.type == "cuda":
        network = network.to(memory_format=torch.channels_last)
    with torch.no_grad(), _autocast(device, amp):
        fast(image, network, image_ids=["warm"])
        fast_s = best_seconds(lambda: fast(image, network, image_ids=["x"]), device, r)
        bare_s = bare_forward_time(network, fast, image, n, fast_steps, method, r, max_rows)
    note = f"{(n / fast_s) / official_rate:.0f}x vs official, " if method == "cimd" and official_rate else ""
    note += f"{(n / fast_s) / paper_rate:.1f}x vs paper; "
    note += f"sampler overhead {100 * (fast_s - bare_s) / bare_s:.1f}%"
    precision = "" if amp is None else f", {str(amp).removeprefix('torch.')} autocast"
    layout = ", channels-last" if device.type == "cuda" else ""
    layout += f", {max_rows} rows per call" if max_rows else ""
    rows.append((method, f"fast ({fast_steps} steps, batched{precision}{layout})", n / fast_s, note))
    cpu_engines = [e for e in engines if device.type == "cpu"]
    for engine in cpu_engines:
        note, engine_dtype, rate = _time_variant(method, make_parser, network, image, n, fast_steps, r, amp,
                                                 max_rows, engine, official_rate, fast_s)  # fmt: skip
        rows.append((method, f"fast ({fast_steps} steps, {engine} {engine_dtype or 'float32'}{layout})", rate, note))
    if flow_steps and (BUNDLES / method / "configs" / FLOW_OVERLAY).is_file():
        make_flow_parser = partial(make_parser, overlays=(FLOW_OVERLAY,))
        torch.manual_seed(0)
        flow_network = make_flow_parser().get_parsed_content("network").eval()
        for steps in flow_steps:
            for engine in ("torch", *cpu_engines):
                note, engine_dtype, rate = _time_variant(method, make_flow_parser, flow_network, image, n, steps, r,
                                                         amp, max_rows, engine, official_rate, fast_s)  # fmt: skip
                if engine == "torch":
                    dtype = "" if amp is None else f", {str(amp).removeprefix('torch.')} autocast"
                else:
                    dtype = f", {engine} {engine_dtype or 'float32'}"
                rows.append((method, f"fast, flow matching ({steps} Euler steps{dtype}{layout})", rate, note))
    return rows, official_rate


def _time_variant(
    method: str,
    make_parser: Callable[[], ConfigParser],
    network,
    image: torch.Tensor,
    num_samples: int,
    steps: int,
    repeats: int,
    amp: torch.dtype | None,
    max_rows: int | None,
    engine: str,
    official_rate: float | None,
    fast_seconds: float,
) -> tuple[str, str | None, float]:
    """Time one more fast-setting variant (``steps`` steps of ``make_parser``'s bundle in ``engine``).

    Returns the ratio note (against the official loop for CIMD and against the PyTorch fast setting's
    ``fast_seconds``), the engine's dtype (None: float32) and the masks/s.
    """
    device, n = image.device, num_samples
    # openvino runs bf16 where the PyTorch fast setting does; onnxruntime's CPU kernels are float32
    engine_dtype = "bfloat16" if engine == "openvino" and amp == torch.bfloat16 else None
    inferer = diffusion_inferer(method, make_parser(), n, steps, max_rows, engine, engine_dtype)
    autocast = _autocast(device, amp) if engine == "torch" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        inferer(image, network, image_ids=["warm"])  # an engine's ONNX export and set-up
        seconds = best_seconds(lambda: inferer(image, network, image_ids=["x"]), device, repeats)
    note = f"{(n / seconds) / official_rate:.0f}x vs official, " if method == "cimd" and official_rate else ""
    note += f"{fast_seconds / seconds:.2f}x vs PyTorch fast"
    return note, engine_dtype if engine != "torch" else None, n / seconds


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, size = args.num_samples, args.image_size
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}) "
          f"threads={torch.get_num_threads()} N={n} size={size} timed_steps={args.timed_steps}")  # fmt: skip
    image = torch.randn(1, 1, size, size, device=device)
    amp = None if args.no_amp else amp_dtype(device)
    max_rows = fast_max_rows(args.cpu_max_rows, device)
    rows: list[Row] = []
    official_rate = None
    for method in args.methods:
        method_result, official_rate = method_rows(
            method, partial(load_method, method, device), image, n, args.timed_steps, args.repeats, amp, max_rows,
            official_rate, args.engines, args.flow_steps,
        )  # fmt: skip
        rows += method_result
    print_table(("method", "setting", "masks/s", "ratio"), ((m, s, f"{rate:.3g}", n) for m, s, rate, n in rows))


if __name__ == "__main__":
    main()
