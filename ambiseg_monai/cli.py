"""The ``ambiseg`` command: a thin dispatcher over the library.

Each subcommand lives in the module that does the work; a module registered here provides
``configure_parser(parser)`` (adds its arguments) and ``main(args) -> int | None``.
``ambiseg prepare <dataset>`` converts or generates a dataset in the data contract's format.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ambiseg_monai import __version__

# subcommand name -> (module, one-line help). Modules are imported only to build their parser.
PREPARE_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ambiseg_monai.data.demo", "generate the deterministic demo dataset with a known ground truth"),
}
TOP_LEVEL_COMMANDS: dict[str, tuple[str, str]] = {}

# Errors a user can cause with arguments or input files: reported in one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def _add_module_command(subparsers, name: str, module_name: str, help_text: str) -> None:
    module = importlib.import_module(module_name)
    parser = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
    module.configure_parser(parser)
    parser.set_defaults(handler=module.main)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every subcommand registered)."""
    parser = argparse.ArgumentParser(
        prog="ambiseg", description="Ambiguous (multi-rater) medical image segmentation with MONAI."
    )
    parser.add_argument("--version", action="version", version=f"ambiseg-monai {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    prepare = commands.add_parser("prepare", help="convert or generate a dataset in the standard format")
    datasets = prepare.add_subparsers(dest="dataset", metavar="DATASET")
    datasets.required = True
    for name, (module_name, help_text) in PREPARE_COMMANDS.items():
        _add_module_command(datasets, name, module_name, help_text)
    for name, (module_name, help_text) in TOP_LEVEL_COMMANDS.items():
        _add_module_command(commands, name, module_name, help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ambiseg`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.handler(args)
    except USER_ERRORS as error:
        print(f"ambiseg: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ambiseg: interrupted (no partial dataset was left behind)", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
