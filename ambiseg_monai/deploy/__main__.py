"""Launcher of the deploy application: ``python -m ambiseg_monai.deploy -i INPUT -o OUTPUT -m MODEL``.

The Holoscan runtime needs a 32 MiB stack (``ulimit -s 32768``); with a smaller soft limit the
launcher raises it (up to the hard limit) and re-executes itself, because a process's main-thread
stack and its threads' default stack size are fixed when it starts. Inside a container started with
``--ulimit stack=33554432`` nothing happens. Paths default to the MONAI Deploy environment variables
(``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH``, ``HOLOSCAN_MODEL_PATH``) as in an application
package; the CPU inference engine and precision default to ``AMBISEG_DEPLOY_ENGINE`` and
``AMBISEG_DEPLOY_PRECISION`` (a container's ``docker run -e``). Errors a user can cause (missing model,
folder without DICOM, wrong modality, bad slice selection, an engine whose package is missing) are
reported in one line with exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

STACK_BYTES = 32 * 1024 * 1024
_REEXEC_MARKER = "AMBISEG_DEPLOY_STACK_RAISED"


def ensure_stack_size(argv: Sequence[str]) -> None:
    """Re-execute this module with a soft stack limit of at least 32 MiB when it is lower (Linux/macOS)."""
    try:
        import resource
    except ImportError:  # Windows: no rlimits
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == resource.RLIM_INFINITY or soft >= STACK_BYTES or os.environ.get(_REEXEC_MARKER):
        return
    target = STACK_BYTES if hard == resource.RLIM_INFINITY else min(STACK_BYTES, hard)
    if target <= soft:
        print(
            f"ambiseg-deploy: warning: stack limit {soft // 1024} KiB is below the 32 MiB Holoscan needs and "
            "cannot be raised (hard limit); run `ulimit -s 32768` first.",
            file=sys.stderr,
        )
        return
    resource.setrlimit(resource.RLIMIT_STACK, (target, hard))
    os.environ[_REEXEC_MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "ambiseg_monai.deploy", *argv])


def build_parser() -> argparse.ArgumentParser:
    # imported here, not at the top: the launcher must re-execute itself before torch and MONAI are imported
    from ambiseg_monai.deploy.predictor import PRECISIONS
    from ambiseg_monai.inferers.cpu_engine import ENGINES

    parser = argparse.ArgumentParser(
        prog="python -m ambiseg_monai.deploy",
        description="Ambiguous segmentation of a DICOM study or NIfTI image with an exported ambiseg bundle: "
        "a DICOM SEG with N plausible masks + consensus, NIfTI mean and variance maps.",
    )
    env = os.environ.get
    parser.add_argument(
        "-i",
        "--input",
        default=env("HOLOSCAN_INPUT_PATH", "input"),
        help="DICOM folder or NIfTI file (default: $HOLOSCAN_INPUT_PATH or ./input)",
    )
    parser.add_argument(
        "-o",
        "--output",
        default=env("HOLOSCAN_OUTPUT_PATH", "output"),
        help="output folder (default: $HOLOSCAN_OUTPUT_PATH or ./output)",
    )
    parser.add_argument(
        "-m",
        "--model",
        default=env("HOLOSCAN_MODEL_PATH", "models"),
        help="exported model.ts or a folder with one (default: $HOLOSCAN_MODEL_PATH or ./models)",
    )
    parser.add_argument("--slices", default="all", help="'all' or 0-based slice indices/ranges, e.g. '0,3,5-7'")
    parser.add_argument("--num-samples", type=int, help="N plausible masks per slice (default: the bundle's)")
    parser.add_argument("--num-inference-steps", type=int, help="diffusion sampling steps (default: the bundle's)")
    parser.add_argument("--class-label", type=int, help="class label for level / rater conditioned models")
    parser.add_argument("--batch-size", type=int, default=4, help="slices per inferer call")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--engine",
        default=env("AMBISEG_DEPLOY_ENGINE") or "torch",
        choices=ENGINES,
        help="where a diffusion model's denoiser calls run: torch, or a CPU inference engine (needs "
        "pip install 'ambiseg-monai[cpu-engines]') (default: $AMBISEG_DEPLOY_ENGINE or torch)",
    )
    parser.add_argument(
        "--precision",
        default=env("AMBISEG_DEPLOY_PRECISION") or None,
        choices=PRECISIONS,
        help="precision of the denoiser calls; bfloat16 with torch or openvino (default: $AMBISEG_DEPLOY_PRECISION, "
        "else the bundle's with torch and float32 with an engine)",
    )
    parser.add_argument(
        "-l", "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and run the application (in this process: no re-execution); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    import logging

    logging.basicConfig(level=args.log_level, format="[%(asctime)s] [%(levelname)s] (%(name)s) - %(message)s")
    from ambiseg_monai.deploy.app import DeploySettings, run_application

    settings = DeploySettings(
        input=args.input,
        output=args.output,
        model=args.model,
        slices=args.slices,
        num_samples=args.num_samples,
        num_inference_steps=args.num_inference_steps,
        class_label=args.class_label,
        batch_size=args.batch_size,
        device=args.device,
        engine=args.engine,
        precision=args.precision,
    )
    try:
        output = run_application(settings)
    except (ValueError, ImportError, FileNotFoundError, NotADirectoryError) as error:
        print(f"ambiseg-deploy: error: {error}", file=sys.stderr)
        return 1
    print(f"ambiseg-deploy: outputs written to {output}")
    return 0


if __name__ == "__main__":
    ensure_stack_size(sys.argv[1:])
    sys.exit(main())
