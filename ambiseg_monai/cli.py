"""The ``ambiseg`` command: a thin dispatcher over the library.

Each subcommand lives in the module that does the work; a module registered here provides
``configure_parser(parser)`` (adds its arguments) and ``main(args) -> int | None``.
``ambiseg prepare <dataset>`` converts or generates a dataset in the data contract's format.
"""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
from collections.abc import Sequence

from ambiseg_monai import __version__

# subcommand name -> (module, one-line help). A module is imported only when its command runs.
PREPARE_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ambiseg_monai.data.demo", "generate the deterministic demo dataset with a known ground truth"),
    "lidc": (
        "ambiseg_monai.preprocessing.lidc",
        "convert a TCIA LIDC-IDRI download (DICOM + XML) to 2D nodule crops, 4 readers",
    ),
    "lidc-pickle": ("ambiseg_monai.preprocessing.lidc_pickle", "convert the community LIDC pickle (data_lidc.pickle)"),
    "folder": (
        "ambiseg_monai.preprocessing.folder",
        "convert a folder of 2D images + one mask per rater, listed in a CSV",
    ),
    "ms-isbi2015": (
        "ambiseg_monai.preprocessing.ms_isbi2015",
        "convert the ISBI 2015 longitudinal MS data to 4-channel 2D slices",
    ),
    "qubiq": (
        "ambiseg_monai.preprocessing.qubiq",
        "convert a 2D QUBIQ task (case folders of NIfTI image + rater masks)",
    ),
}
TOP_LEVEL_COMMANDS: dict[str, tuple[str, str]] = {
    "compare": ("ambiseg_monai.reporting.compare", "compare methods across MLflow runs: table, plots, comparison run"),
    "export": ("ambiseg_monai.deploy.export", "export a trained bundle as TorchScript with its configs and metadata"),
    "merge-configs": (
        "ambiseg_monai.bundle.config",
        "write a bundle with the shared base configs merged in (standalone)",
    ),
    "sync": (
        "ambiseg_monai.reporting.sync",
        "copy runs logged offline (e.g. during a server outage) into a tracking server",
    ),
}

# Errors a user can cause with arguments or input files: reported in one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


# Sphinx markup of the docstrings shown as ``--help`` text: roles (:func:`~a.b.c` -> c, :class:`a.B` -> a.B,
# :mod:`text <target>` -> text), inline literals (``x`` -> x) and literal-block markers (Usage:: -> Usage:)
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`<]*?)\s*(?:<[^`>]*>)?`")


def _role_text(match: re.Match) -> str:
    tilde, name = match.group(1), match.group(2)
    return name.rsplit(".", 1)[-1] if tilde else name


def plain_text(text: str) -> str:
    """A docstring (reStructuredText) as plain text for a ``--help`` page: Sphinx roles, double backticks
    and ``::`` literal-block markers removed; the layout (lines, indentation, bullets) kept."""
    text = _ROLE.sub(_role_text, text)
    text = text.replace("``", "")
    text = re.sub(r"(\S)::$", r"\1:", text, flags=re.M)  # "Usage::" -> "Usage:"
    text = re.sub(r"^[ \t]*::[ \t]*\n", "", text, flags=re.M)  # a line of its own "::"
    return text.strip()


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """The description, epilog and argument help of ``parser`` (and of its subparsers) as plain text."""
    parser.description = plain_text(parser.description) if parser.description else parser.description
    parser.epilog = plain_text(parser.epilog) if parser.epilog else parser.epilog
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = plain_text(action.help)
        if isinstance(action.choices, dict):
            for subparser in action.choices.values():
                if isinstance(subparser, argparse.ArgumentParser):
                    _plain_help(subparser)


def _add_command(subparsers, name: str, module_name: str, help_text: str, configure: bool) -> None:
    """Register a subcommand; import its module (and so its dependencies) only when ``configure``."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    if configure:
        module = importlib.import_module(module_name)
        parser.description = (module.__doc__ or help_text).strip()
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        module.configure_parser(parser)
        _plain_help(parser)  # docstrings and argument help are reStructuredText: shown without the markup
        parser.set_defaults(handler=module.main)


def _selected_command(argv: Sequence[str]) -> tuple[str, ...]:
    """The subcommand path named on the command line, e.g. ``("prepare", "demo")``."""
    words = [word for word in argv if not word.startswith("-")]
    if words[:1] == ["prepare"] and len(words) > 1:
        return ("prepare", words[1])
    return tuple(words[:1])


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. Only the module of the subcommand named in ``argv`` is imported
    (all of them when ``argv`` is None), so ``ambiseg prepare demo`` does not load torch."""
    selected = None if argv is None else _selected_command(argv)
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
        _add_command(datasets, name, module_name, help_text, selected in (None, ("prepare", name)))
    for name, (module_name, help_text) in TOP_LEVEL_COMMANDS.items():
        _add_command(commands, name, module_name, help_text, selected in (None, (name,)))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ambiseg`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        status = args.handler(args)
    except USER_ERRORS as error:
        print(f"ambiseg: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        print("ambiseg: interrupted (no partial dataset was left behind)", file=sys.stderr)
        return 128 + getattr(interrupt, "signum", signal.SIGINT)  # the shell's convention: 130 SIGINT, 143 SIGTERM
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
